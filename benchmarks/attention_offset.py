"""Where a trained agent's attention lands around the object each word names, and where its
encoder's cells really look.

    python benchmarks/attention_offset.py RUN_DIR [RUN_DIR ...] [--scenes 500] [--beam 1]

Attention correctness (``rl_attn.evaluation.attention_correctness``) counts the attention on
the cells inside the named object's box, each cell taken as the square of pixels it covers
on the grid. A cell's vector, though, is computed from a receptive field of 47 pixels (the
default encoder), and training can move the centre of that field away from the cell's square.
For each object word of the greedy captions of the run's test scenes (the size, colour and
shape words of the k-th object named) this prints:

- in box: the attention inside the box (over the shape words alone: the correctness metric);
- near: the attention within one cell of the box (the box grown by one cell side);
- offset: the attention's centroid minus the box centre, in pixels (x right, y down);
- field: the encoder's receptive-field offset, the centroid of the input gradient of the
  cells' vectors minus their squares' centres, over the grid's inner cells;
- in box, field: the attention inside the box when every cell is moved by that offset.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rl_attn.build import build_task
from rl_attn.cli import run_cli
from rl_attn.envs.sensors import GridSensor
from rl_attn.errors import UserError
from rl_attn.evaluate import load_trained
from rl_attn.evaluation import cell_overlap, decode_split, object_words

COLUMNS = ("in box", "near", "offset x", "offset y", "in box, field")


def receptive_field_offset(encoder: torch.nn.Module, images: torch.Tensor) -> tuple[float, float]:
    """Mean ``(dx, dy)`` in pixels from each inner cell's square centre to the centroid of the
    absolute input gradient of that cell's squared vector, over ``images: (N, 3, S, S)``."""
    x = images.float().clone().requires_grad_(True)
    grid = encoder.feature_map(x)
    h, w = grid.shape[-2:]
    size = images.shape[-1]
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    inner = [(i, j) for i in range(h) for j in range(w) if min(i, j, h - 1 - i, w - 1 - j) >= 2]
    if not inner:
        inner = [(h // 2, w // 2)]
    offsets = []
    for i, j in inner:
        (grad,) = torch.autograd.grad(grid[:, :, i, j].pow(2).sum(), x, retain_graph=True)
        mass = grad.abs().sum((0, 1)).numpy()
        mass = mass / mass.sum()
        offsets.append(
            ((mass * xs).sum() - (j + 0.5) * size / w, (mass * ys).sum() - (i + 0.5) * size / h)
        )
    dx, dy = np.mean(offsets, axis=0)
    return float(dx), float(dy)


def word_rows(
    captions: Sequence[str],
    maps: Sequence[np.ndarray],
    boxes: Sequence[Sequence[tuple[int, int, int, int]]],
    grid_hw: tuple[int, int],
    image_size: int,
    field: tuple[float, float],
) -> dict[str, list[list[float]]]:
    """Per word kind (``size``, ``colour``, ``shape``), one row of :data:`COLUMNS` per object
    word of :func:`~rl_attn.evaluation.object_words`."""
    h, w = grid_hw
    cx = (np.arange(h * w) % w + 0.5) * image_size / w
    cy = (np.arange(h * w) // w + 0.5) * image_size / h
    grow = (image_size / w, image_size / h)
    rows: dict[str, list[list[float]]] = {"size": [], "colour": [], "shape": []}
    for caption, alpha, objs in zip(captions, maps, boxes):
        for t, kind, box in object_words(caption.split(), objs):
            x0, y0, x1, y1 = box
            a = alpha[t]
            mass = a.sum() if a.sum() > 0 else np.nan  # an agent that reads nothing
            near = (x0 - grow[0], y0 - grow[1], x1 + grow[0], y1 + grow[1])
            moved = (x0 - field[0], y0 - field[1], x1 - field[0], y1 - field[1])
            rows[kind].append(
                [
                    float(a @ cell_overlap(box, grid_hw, image_size)),
                    float(a @ cell_overlap(near, grid_hw, image_size)),
                    float(a @ cx / mass - (x0 + x1) / 2),
                    float(a @ cy / mass - (y0 + y1) / 2),
                    float(a @ cell_overlap(moved, grid_hw, image_size)),
                ]
            )
    return rows


def offsets(run: str, scenes: int, beam: int) -> tuple[tuple[float, float], dict[str, list[float]]]:
    """The encoder's field offset and, for shape words and for all object words, the mean of
    each column over the first ``scenes`` test scenes of the run in ``run``."""
    path = Path(run)
    checkpoint = path / "checkpoints" / "last.pt" if path.is_dir() else path
    agent, cfg, vocab, _ = load_trained(checkpoint, "cpu", None)
    if not isinstance(agent.sensor, GridSensor):
        raise UserError(f"{run}: attention offsets need a grid sensor (sensor=grid)")
    data = build_task(cfg)["test"]
    if getattr(data, "boxes", None) is None:
        raise UserError(f"{run}: attention offsets need a task with object boxes (task=scenes)")
    images = data.images[:scenes]
    size = images.shape[-1]
    grid_hw = agent.grid_shape(size)
    field = receptive_field_offset(agent.encoder, images[:32])
    captions, maps = decode_split(agent, images, vocab, beam)
    rows = word_rows(captions, maps, data.boxes[:scenes], grid_hw, size, field)
    every = [r for kind in ("size", "colour", "shape") for r in rows[kind]]
    means = {
        name: np.mean(r, axis=0).tolist() if r else [float("nan")] * len(COLUMNS)
        for name, r in (("shape words", rows["shape"]), ("object words", every))
    }
    return field, means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (or their checkpoint files)")
    parser.add_argument("--scenes", type=int, default=500, help="test scenes decoded per run")
    parser.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [(run, *run_cli(offsets, run, args.scenes, args.beam)) for run in args.runs]
    print("| run | words | " + " | ".join(COLUMNS) + " | field x | field y |")
    print("|-" * (len(COLUMNS) + 4) + "|")
    for run, field, means in results:
        for words, values in means.items():
            cells = " | ".join(
                f"{v:+.1f}" if column.startswith("offset") else f"{v:.2f}"
                for column, v in zip(COLUMNS, values)
            )
            print(f"| {run} | {words} | {cells} | {field[0]:+.1f} | {field[1]:+.1f} |")


if __name__ == "__main__":
    main()
