"""Update time with denormal floats kept or flushed to zero, from a finished run's checkpoint.

``python benchmarks/denormals.py RUN_DIR on|off`` resumes ``RUN_DIR``'s last checkpoint and times
8 rounds of 10 training updates on one thread, with ``torch.set_flush_denormal`` set as asked
after the trainer's own set-up (which flushes). One setting per process: once flushed, weights
stay zero. Run ``off`` and ``on`` alternately, nothing else on the machine.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from rl_attn.trainer import Trainer, build_run


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[2] not in ("on", "off"):
        sys.exit("usage: python benchmarks/denormals.py RUN_DIR on|off")
    source = Path(sys.argv[1])
    last = source / "checkpoints" / "last.pt"
    if not last.is_file():
        sys.exit(f"error: {source} has no checkpoints/last.pt")
    cfg = OmegaConf.load(source / "config.yaml")
    cfg.trainer.resume = str(last)
    cfg.trainer.threads = 1
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(build_run(cfg, Path(scratch)))
        torch.set_flush_denormal(sys.argv[2] == "on")
        rounds = []
        for _ in range(8):
            start = time.perf_counter()
            for _ in range(10):
                trainer.step()
            rounds.append((time.perf_counter() - start) / 10)
    print(f"{source}: flush {sys.argv[2]}: {1000 * statistics.median(rounds):.1f} ms per update")


if __name__ == "__main__":
    main()
