"""Markdown table of finished runs: ``python benchmarks/summarize.py RUN_DIR [RUN_DIR ...]``.

Reads each run's ``metrics.json`` (written by ``python -m rl_attn.train``) and prints one row per
run: the agent, test metrics of the final (beam) decoding, attention correctness, cells read per
word, training time and samples/s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(run: Path) -> str:
    m = json.loads((run / "metrics.json").read_text())
    test = m[m["split"]][m["decoding"]]
    agent = m["agent"].rsplit(".", 1)[-1]
    cells = f"{test['cells_read_per_word']:.0f}" if "cells_read_per_word" in test else ""
    return (
        f"| {agent} | {test['BLEU-1']:.3f} | {test['BLEU-4']:.3f} | {test['ROUGE-L']:.3f} "
        f"| {test['CIDEr']:.2f} | {test.get('METEOR', float('nan')):.3f} "
        f"| {test['attention_correctness']:.3f} | {cells} | {m['train_time_s']:.0f} "
        f"| {m['total_time_s']:.0f} | {m['train_samples_per_s']:.0f} |"
    )


def main() -> None:
    print(
        "| agent | BLEU-1 | BLEU-4 | ROUGE-L | CIDEr | METEOR | attention correctness "
        "| cells read / word | train s | total s | samples/s |"
    )
    print("|-|-|-|-|-|-|-|-|-|-|-|")
    for arg in sys.argv[1:]:
        print(row(Path(arg)))


if __name__ == "__main__":
    main()
