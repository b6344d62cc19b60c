"""What a caption agent gets wrong on the generated scenes, object by object.

    python benchmarks/caption_errors.py RUN_DIR [RUN_DIR ...] [--reads]

Reads the decoded test captions of each run's final evaluation (``test_captions.json``) and
splits every caption into its objects (``a <size> <colour> <shape>``, joined by ``,`` and
``and``). An object named in the wrong place is counted as one of:

* ``other object``: it is another object of the same scene (the agent described the wrong
  object here: a skipped or repeated one);
* ``1 attribute`` / ``2 attributes`` / ``3 attributes``: it is no object of the scene and
  differs from the one due in that many words;
* and a caption with the wrong number of objects is counted once, as ``count``.

Those counts tell an agent that reads the right object badly from one that reads the wrong
object. With ``--reads`` the run's checkpoint decodes the test split again (beam 3, as the
final evaluation) and, for each "other object", reports where its attribute words' cells
(the argmax of each word's map) lie: on the object the reference names there, on the object
the caption named instead, or on neither; and how far apart the two objects' centres are, as
a share below one cell's width against that share among all neighbouring objects.
Generated scenes only (the boxes come from the scene generator).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

KINDS = ("other object", "1 attribute", "2 attributes", "3 attributes", "count")


def objects(caption: str) -> list[tuple[str, ...]]:
    """``"a small red circle , a large blue square"`` -> its objects' words, in order."""
    return [tuple(o.split()) for o in re.split(r" , | and ", caption.strip()) if o]


def classify(generated: str, reference: str) -> list[tuple[int, str]]:
    """``(object index, kind)`` for every object of ``generated`` not where ``reference``
    has it; ``[(-1, "count")]`` when the two name a different number of objects."""
    got, due = objects(generated), objects(reference)
    if len(got) != len(due):
        return [(-1, "count")]
    out = []
    for k, (g, r) in enumerate(zip(got, due)):
        if g == r:
            continue
        if g in due:
            out.append((k, "other object"))
        else:
            n = sum(a != b for a, b in zip(g, r)) + abs(len(g) - len(r))
            out.append((k, f"{min(n, 3)} attribute" + ("s" if n > 1 else "")))
    return out


def caption_errors(run: Path) -> dict[str, int]:
    """Counts of :data:`KINDS` (and of wrong captions) over a run's test captions."""
    path = run / "test_captions.json"
    if not path.is_file():
        raise SystemExit(f"error: no {path}: give a run directory of the default task")
    counts = Counter({k: 0 for k in ("wrong captions", *KINDS)})
    for entry in json.loads(path.read_text()):
        found = classify(entry["generated"], entry["references"][0])
        counts["wrong captions"] += bool(found)
        counts.update(kind for _, kind in found)
    return dict(counts)


def where_read(run: Path, beam_size: int = 3) -> dict[str, float]:
    """For the "other object" errors of ``run``'s checkpoint: where the attribute words' cells
    lie and how close the two objects are (see the module's docstring)."""
    import torch

    from rl_attn.build import build_task
    from rl_attn.evaluate import load_trained
    from rl_attn.evaluation import cell_overlap, decode_split

    agent, cfg, vocab, _ = load_trained(run, torch.device("cpu"))
    data = build_task(cfg)["test"]
    with torch.no_grad():
        captions, maps = decode_split(agent, data.images, vocab, beam_size=beam_size)
    hw, size = agent.grid_shape(data.images.shape[-1]), data.images.shape[-1]
    cell_width = size / hw[1]
    reads = Counter(
        dict.fromkeys(("on the reference's object", "on the named object", "on neither"), 0)
    )
    close, neighbours = [], []
    for caption, alpha, refs, boxes in zip(captions, maps, data.references, data.boxes):
        centres = [(x0 + x1) / 2 for x0, _, x1, _ in boxes]
        neighbours += [abs(b - a) < cell_width for a, b in zip(centres, centres[1:])]
        got, due = objects(caption), objects(refs[0])
        for k, kind in classify(caption, refs[0]):
            if kind != "other object":
                continue
            named = due.index(got[k])
            close.append(abs(centres[named] - centres[k]) < cell_width)
            on_due, on_named = (cell_overlap(boxes[j], hw, size) > 0 for j in (k, named))
            first = sum(len(o) + 1 for o in got[:k])  # the object's "a"
            for t in range(first + 1, min(first + 4, len(alpha))):
                cell = int(alpha[t].argmax())
                if on_due[cell]:
                    reads["on the reference's object"] += 1
                elif on_named[cell]:
                    reads["on the named object"] += 1
                else:
                    reads["on neither"] += 1
    return {
        **{f"reads {k}": float(v) for k, v in reads.items()},
        "share of them closer than a cell": float(np.mean(close)) if close else float("nan"),
        "share of all neighbours closer than a cell": float(np.mean(neighbours)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--reads", action="store_true", help="decode again to see the reads")
    args = parser.parse_args()
    for run in args.runs:
        counts = caption_errors(run)
        print(f"{run}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if args.reads:
            for k, v in where_read(run).items():
                print(f"  {k}: {v:.3g}")


if __name__ == "__main__":
    main()
