"""Decode a split and score it: COCO caption metrics and attention correctness."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rl_attn.agents.base import CaptionAgent
from rl_attn.metrics import caption_metrics
from rl_attn.scenes import SHAPES
from rl_attn.vocab import Vocabulary


def cell_overlap(
    box: tuple[int, int, int, int], grid_hw: tuple[int, int], image_size: int
) -> np.ndarray:
    """Share of each grid cell's area inside ``box`` (pixels, right/bottom exclusive): ``(L,)``."""
    h, w = grid_hw
    x0, y0, x1, y1 = box
    xs = np.linspace(0, image_size, w + 1)
    ys = np.linspace(0, image_size, h + 1)
    fx = np.clip(np.minimum(xs[1:], x1) - np.maximum(xs[:-1], x0), 0, None) / np.diff(xs)
    fy = np.clip(np.minimum(ys[1:], y1) - np.maximum(ys[:-1], y0), 0, None) / np.diff(ys)
    return np.outer(fy, fx).reshape(-1)


def attention_correctness(
    words: Sequence[Sequence[str]],
    weights: Sequence[np.ndarray],
    boxes: Sequence[Sequence[tuple[int, int, int, int]]],
    grid_hw: tuple[int, int],
    image_size: int,
) -> float:
    """Mean share of attention mass inside the box of the object each generated noun names.

    The k-th shape word of a generated caption names the k-th object of the scene in caption
    (left-to-right) order; words past the scene's last object name nothing. Attention on a cell
    is spread evenly over the cell, so a cell half inside the box contributes half its weight.

    Args:
        words: per image, the generated words.
        weights: per image, ``(T, L)`` attention maps, row ``t`` used to emit ``words[t]``.
        boxes: per image, the object boxes in caption order.
    Returns:
        the mean over all naming words, in [0, 1]; NaN when no word names an object.
    """
    shapes = set(SHAPES)
    shares = []
    for ws, alpha, objs in zip(words, weights, boxes):
        k = 0
        for t, word in enumerate(ws):
            if word not in shapes:
                continue
            if k < len(objs):
                shares.append(float(alpha[t] @ cell_overlap(objs[k], grid_hw, image_size)))
            k += 1
    return float(np.mean(shares)) if shares else float("nan")


@torch.no_grad()
def decode_split(
    agent: CaptionAgent,
    images: torch.Tensor,
    vocab: Vocabulary,
    beam_size: int = 1,
    max_len: int = 24,
    batch_size: int = 250,
    device: torch.device | str = "cpu",
) -> tuple[list[str], list[np.ndarray]]:
    """Captions (strings) and their ``(T, L)`` attention maps for ``images: (N, 3, H, W)``."""
    was_training = agent.training
    agent.eval()
    captions: list[str] = []
    maps: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        out = agent.caption(images[start : start + batch_size].to(device), max_len, beam_size)
        for tokens, alpha in zip(out.tokens.cpu(), out.weights.cpu()):
            ids = tokens.tolist()
            end = ids.index(vocab.end) if vocab.end in ids else len(ids)
            # the words decode() keeps, and the map that emitted each of them
            keep = [t for t in range(end) if ids[t] not in (vocab.pad, vocab.start)]
            captions.append(vocab.decode(ids))
            maps.append(alpha[keep].numpy())
    agent.train(was_training)
    return captions, maps


def score(
    captions: Sequence[str],
    maps: Sequence[np.ndarray],
    references: Sequence[Sequence[str]],
    boxes: Sequence[Sequence[tuple[int, int, int, int]]] | None,
    grid_hw: tuple[int, int],
    image_size: int,
    with_meteor: bool = True,
) -> dict[str, float]:
    """COCO caption metrics, the cells read per generated word, and attention correctness when
    boxes are known."""
    refs = {i: list(r) for i, r in enumerate(references)}
    hyps = {i: c for i, c in enumerate(captions)}
    result = caption_metrics(refs, hyps, with_meteor=with_meteor)
    reads = [int((m > 0).sum()) for m in maps]
    words = sum(len(m) for m in maps)
    result["cells_read_per_word"] = sum(reads) / words if words else float("nan")
    if boxes is not None:
        result["attention_correctness"] = attention_correctness(
            [c.split() for c in captions], maps, boxes, grid_hw, image_size
        )
    return result
