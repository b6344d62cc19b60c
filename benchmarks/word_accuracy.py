"""Where a trained caption agent's errors come from: teacher-forced word accuracy by kind.

    python benchmarks/word_accuracy.py RUN_DIR [--images 500]

Feeds each test caption word by word (teacher forcing) and counts how often the agent's most
probable next word is right, for size, colour and shape words and for the rest ("other": "a",
",", "and", <end>). Three ways of choosing what the decoder reads at each word:

* ``policy``: the agent's own attention (its argmax cell for hard attention, its map for soft);
* ``box centre``: the one cell under the centre of the box of the object the word names (the
  object's earlier words included), whatever the attention says: how well one well-placed cell
  shows the object to this encoder and decoder;
* ``expectation``: the expected context of the agent's attention map (every cell, weighted);
* ``best cell``: right when *any* one cell read at this word gives the right word (each cell
  tried from the state the policy's reads led to): the most any one-cell policy could get from
  this encoder and decoder (sensor=grid only; other sensors get the first three).

A hard agent whose shape words are wrong even at the box centre, or at its best cell, has an
encoder whose cells do not show shapes; one that is right there but wrong under its policy looks
in the wrong places.
Generated scenes only (the boxes come from the scene generator).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from rl_attn.build import build_task
from rl_attn.evaluate import load_trained
from rl_attn.scenes import WORD_KINDS

MODES = ("policy", "box centre", "expectation", "best cell")
READS = MODES[:3]  # the reads that lead the state; "best cell" tries every cell beside "policy"


def box_centre_cells(caption: str, boxes, steps: int, cells: int, side: float) -> list[int]:
    """Per target word, the cell under the centre of the box of the object it belongs to."""
    out, obj = [], 0
    for t, word in enumerate(caption.split()[:steps]):
        obj += word == "a" and t > 0
        x0, y0, x1, y1 = boxes[min(obj, len(boxes) - 1)]
        out.append(int((y0 + y1) / 2 // side) * cells + int((x0 + x1) / 2 // side))
    return out + [0] * (steps - len(out))


@torch.no_grad()
def word_accuracy(run: str, images: int) -> dict[str, dict[str, float]]:
    """``{mode: {kind: accuracy}}`` over the first ``images`` test scenes of a run."""
    agent, cfg, vocab, _ = load_trained(run, torch.device("cpu"))
    data = build_task(cfg)["test"]
    n = min(images, len(data))
    tokens, _ = vocab.encode_batch(data.captions[:n])
    steps = tokens.shape[1] - 1
    h, w = agent.grid_shape(data.images.shape[-1])
    if h != w:
        raise SystemExit(f"needs a square grid, got {h}x{w}")
    side = data.images.shape[-1] / w
    centre = torch.tensor(
        [box_centre_cells(data.captions[i], data.boxes[i], steps, w, side) for i in range(n)]
    )
    kinds = [
        [WORD_KINDS.get(word, "other") for word in c.split()] + ["other"] * (steps - len(c.split()))
        for c in data.captions[:n]
    ]
    view = agent.observe(data.images[:n])
    # every cell's share of a step, once (the best-cell reads: sensor=grid only)
    cells = agent.decoder.cell_inputs(view.grid) if hasattr(view, "grid") else None
    result = {}
    for mode in READS:
        right, best = _count(agent, view, tokens, kinds, mode, centre, cells, vocab.pad)
        result[mode] = {k: a / b for k, (a, b) in sorted(right.items())}
        if best:
            result["best cell"] = {k: a / b for k, (a, b) in sorted(best.items())}
    return result


def _count(agent, view, tokens, kinds, mode, centre, cells, pad):
    """``{kind: [right, words]}`` for one way of reading, teacher-forced; in ``policy`` mode
    (with ``cells``) also the same counts for the best of every cell at each word."""
    state = agent.init_state(view)
    right: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    best_right: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t in range(tokens.shape[1] - 1):
        logits = agent.attention_logits(state)
        best = None
        if mode == "policy":
            read = agent.locate(logits, state).action
            if cells is not None:
                best = _any_cell_right(agent, state, tokens[:, t], cells, tokens[:, t + 1])
        elif mode == "box centre":
            read = centre[:, t]
        else:
            read = torch.softmax(logits, dim=1)
        state, word_logits = agent.decoder.step(state, tokens[:, t], view.read(read))
        correct = word_logits.argmax(dim=1) == tokens[:, t + 1]
        for i in (tokens[:, t + 1] != pad).nonzero().flatten().tolist():
            kind = kinds[i][t]
            right[kind][0] += int(correct[i])
            right[kind][1] += 1
            if best is not None:
                best_right[kind][0] += int(best[i])
                best_right[kind][1] += 1
    return right, best_right


def _any_cell_right(agent, state, word: torch.Tensor, cells, target: torch.Tensor) -> torch.Tensor:
    """``(B,)``: whether any one cell of the grid (``cells``: its
    :meth:`~rl_attn.decoder.Decoder.cell_inputs`), read as this word's context from ``state``,
    makes the decoder's most probable word ``target``."""
    every = agent.decoder.step_every_cell(state, word, cells)
    return (every.argmax(dim=2) == target.unsqueeze(1)).any(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run directory of python -m rl_attn.train (or a .pt)")
    parser.add_argument("--images", type=int, default=500, help="test scenes to feed")
    args = parser.parse_args()
    result = word_accuracy(args.run, args.images)
    kinds = list(next(iter(result.values())))
    print("| reads | " + " | ".join(kinds) + " |\n|-|" + "-|" * len(kinds))
    for mode, acc in result.items():
        print(f"| {mode} | " + " | ".join(f"{acc[k]:.3f}" for k in kinds) + " |")


if __name__ == "__main__":
    main()
