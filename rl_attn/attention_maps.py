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
