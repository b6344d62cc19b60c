"""Where a trained caption agent's errors come from: teacher-forced word accuracy by kind.

    python benchmarks/word_accuracy.py RUN_DIR [--images 500]

Feeds each test caption word by word (teacher forcing) and counts how often the agent's most
probable next word is right, for size, colour and shape words and for the rest ("other": "a",
",", "and", <end>). Three ways of choosing what the decoder reads at each word:

* ``policy``: the agent's own attention (its argmax cell for hard attention, its map for soft);
* ``box centre``: the one cell under the centre of the box of the object the word names (the
  object's earlier words included), whatever the attention says: how well one well-placed cell
  shows the object to this encoder and decoder;
* ``expectation``: the expected context of the agent's attention map (every cell, weighted).

A hard agent whose shape words are wrong even at the box centre has an encoder whose cells do not
show shapes; one that is right there but wrong under its policy looks in the wrong places.
Generated scenes only (the boxes come from the scene generator).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from rl_attn.build import build_task
from rl_attn.evaluate import load_trained
from rl_attn.scenes import WORD_KINDS

MODES = ("policy", "box centre", "expectation")


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
    result = {}
    for mode in MODES:
        state = agent.init_state(view)
        right: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for t in range(steps):
            logits = agent.attention_logits(state)
            if mode == "policy":
                read = agent.locate(logits, state).action
            elif mode == "box centre":
                read = centre[:, t]
            else:
                read = torch.softmax(logits, dim=1)
            state, word_logits = agent.decoder.step(state, tokens[:, t], view.read(read))
            correct = word_logits.argmax(dim=1) == tokens[:, t + 1]
            for i in (tokens[:, t + 1] != vocab.pad).nonzero().flatten().tolist():
                right[kinds[i][t]][0] += int(correct[i])
                right[kinds[i][t]][1] += 1
        result[mode] = {k: a / b for k, (a, b) in sorted(right.items())}
    return result


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
