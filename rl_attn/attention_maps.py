"""Pictures of where an agent looked: one panel per generated word, the map over the image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

_SCALE = 2  # panel pixels per image pixel for small images
_LABEL = 12  # label strip height in pixels


def _heat(alpha: np.ndarray, grid_hw: tuple[int, int], side: int) -> np.ndarray:
    """A ``(h*w,)`` map upsampled to ``(side, side)`` in [0, 1] (bilinear, max-normalised)."""
    h, w = grid_hw
    peak = float(alpha.max()) if alpha.size else 0.0
    small = Image.fromarray((255 * alpha.reshape(h, w) / max(peak, 1e-12)).astype(np.uint8))
    return np.asarray(small.resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0


def attention_panels(
    image: np.ndarray,
    words: Sequence[str],
    weights: np.ndarray,
    grid_hw: tuple[int, int],
    columns: int = 8,
) -> np.ndarray:
    """One picture: the image, then one panel per word with its attention map lit up.

    Args:
        image: ``(H, W, 3)`` uint8.
        words: the generated words; ``weights[t]`` is the map used to emit ``words[t]``.
        weights: ``(T, L)`` attention maps, ``L = h * w``.
        grid_hw: ``(h, w)`` of the feature grid.
    Returns:
        ``(rows * (side + label), columns * side, 3)`` uint8.
    """
    side = image.shape[0] * (_SCALE if image.shape[0] < 128 else 1)
    base = np.asarray(Image.fromarray(image).resize((side, side), Image.NEAREST), dtype=np.float32)
    panels = [(base.astype(np.uint8), "(image)")]
    for word, alpha in zip(words, weights):
        heat = _heat(np.asarray(alpha, dtype=np.float32), grid_hw, side)[..., None]
        lit = base * (0.25 + 0.75 * heat) + np.array([255.0, 255.0, 255.0]) * 0.35 * heat
        panels.append((np.clip(lit, 0, 255).astype(np.uint8), word))
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    canvas = Image.new("RGB", (columns * side, rows * (side + _LABEL)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (pixels, label) in enumerate(panels):
        x, y = (k % columns) * side, (k // columns) * (side + _LABEL)
        canvas.paste(Image.fromarray(pixels), (x, y))
        draw.text((x + 2, y + side), label, fill=(0, 0, 0))
    return np.asarray(canvas)


def reads_a_part(weights: np.ndarray) -> bool:
    """Whether an episode's ``(T, L)`` maps read only part of the grid at every step (a hard
    agent, whose glimpse path is worth drawing), rather than every cell at some step."""
    return (
        bool(len(weights)) and int((np.asarray(weights) > 0).sum(axis=1).max()) < weights.shape[1]
    )


def stack_pictures(rows: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """Pictures one above the other, each under a title strip, padded white to one width: the
    same image seen by several agents."""
    width = max(p.shape[1] for _, p in rows)
    height = sum(p.shape[0] + _LABEL + 2 for _, p in rows)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for title, picture in rows:
        draw.text((2, y), title, fill=(0, 0, 128))
        canvas.paste(Image.fromarray(picture), (0, y + _LABEL))
        y += picture.shape[0] + _LABEL + 2
    return np.asarray(canvas)


def glimpse_path(
    image: np.ndarray,
    weights: np.ndarray,
    grid_hw: tuple[int, int],
    labels: Sequence[str] | None = None,
) -> np.ndarray:
    """The path of an episode's glimpses over the image: the most-weighted cell of each step,
    outlined and numbered in order, joined by lines (the RAM paper's glimpse-path figure).

    Args:
        image: ``(H, W, 3)`` uint8.
        weights: ``(T, L)`` attention maps, one per step.
        labels: per step, a word to write beside the number (e.g. the word emitted).
    Returns:
        ``(side + label lines, side, 3)`` uint8, ``side`` the enlarged image's side.
    """
    h, w = grid_hw
    scale = _SCALE * 2 if image.shape[0] < 128 else 1
    side = image.shape[0] * scale
    base = Image.fromarray(image).resize((side, side), Image.NEAREST)
    lines = _wrap([f"{t + 1}:{word}" for t, word in enumerate(labels or [])], side)
    canvas = Image.new("RGB", (side, side + _LABEL * max(len(lines), 1)), (255, 255, 255))
    canvas.paste(base, (0, 0))
    draw = ImageDraw.Draw(canvas)
    cell_w, cell_h = side / w, side / h
    centres, visits = [], {}
    for t, alpha in enumerate(np.asarray(weights)):
        cell = int(np.argmax(alpha))
        r, c = divmod(cell, w)
        box = (c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1)
        shade = int(255 * t / max(len(weights) - 1, 1))
        colour = (255, shade, 0)  # red early, yellow late
        draw.rectangle(box, outline=colour, width=2)
        centres.append(((c + 0.5) * cell_w, (r + 0.5) * cell_h))
        nth = visits[cell] = visits.get(cell, -1) + 1  # numbers of revisits side by side
        draw.text(
            (box[0] + 3 + 9 * (nth % 3), box[1] + 2 + 10 * (nth // 3)), str(t + 1), fill=colour
        )
    if len(centres) > 1:
        draw.line(centres, fill=(0, 255, 255), width=1)
    for i, line in enumerate(lines):
        draw.text((2, side + i * _LABEL), line, fill=(0, 0, 0))
    return np.asarray(canvas)


def _wrap(items: Sequence[str], width: int) -> list[str]:
    """``items`` joined by spaces into lines no wider than ``width`` pixels."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for item in items:
        if lines and measure.textlength(f"{lines[-1]} {item}") <= width - 4:
            lines[-1] = f"{lines[-1]} {item}"
        else:
            lines.append(item)
    return lines
