"""An auxiliary loss that keeps each cell of the feature grid about its own square.

A hard-attention agent trains the encoder through the one cell it reads per word. When that
cell is beside the object the word names, the encoder learns to carry the object into the
neighbour, the neighbour becomes as good a glimpse, and the cells' receptive fields move off
their squares (benchmarks/RESULTS.md, issue 14, "A twelfth session"). This loss asks every
cell's vector to say, through one linear head, what its own square of the image looks like:
the square's pixels, pooled to ``side x side`` and centred on the image's mean value. It uses
no label and no attention: the policy still learns where to look from reward alone.

The head starts at zero, so the loss starts at 1 and sends the encoder no gradient until the
head has learned what the cells already say about their squares. With PyTorch's default
initialisation the first updates' loss was about 3, and its gradient, in a random direction,
reshaped the cells while the policy was learning to read them: the policy sharpened later and
the captions lagged by about 150 updates (RESULTS, issue 14, "A fourteenth session").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rl_attn.encoder import to_float


def square_pixels(images: torch.Tensor, grid_shape: tuple[int, int], side: int) -> torch.Tensor:
    """``(B, 3, H, W)`` images -> ``(B, h * w, 3 * side * side)``: for each cell of an
    ``h x w`` grid, in the encoder's order (row by row), the pixels of its square of the image,
    average-pooled to ``side x side``, minus the mean of the image's pixel values."""
    h, w = grid_shape
    x = F.adaptive_avg_pool2d(to_float(images), (h * side, w * side))
    x = x - x.mean(dim=(1, 2, 3), keepdim=True)
    b = x.shape[0]
    x = x.view(b, 3, h, side, w, side).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, h * w, 3 * side * side)


def grid_shape_of(images: torch.Tensor, cells: int) -> tuple[int, int]:
    """The ``(h, w)`` of a grid of ``cells`` cells over ``images`` (the grid keeps the images'
    aspect ratio, as a convolutional encoder's does)."""
    height, width = images.shape[-2:]
    h = max(1, round((cells * height / width) ** 0.5))
    if cells % h:
        raise ValueError(f"a grid of {cells} cells does not tile {height}x{width} images")
    return h, cells // h


class CellReconstruction(nn.Module):
    """The loss and its linear head: ``dim``-d cell vectors -> ``3 * side * side`` pixels.

    The loss is the mean squared error over every cell of every image, divided by the mean
    square of the targets: 1 is what predicting the image's mean value everywhere scores, 0 a
    perfect reconstruction."""

    def __init__(self, dim: int, side: int = 8):
        super().__init__()
        if side < 1:
            raise ValueError(f"side must be >= 1, got {side}")
        self.side = side
        self.head = nn.Linear(dim, 3 * side * side)
        nn.init.zeros_(self.head.weight)  # no gradient into the cells before the head learns
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """``images: (B, 3, H, W)``, their ``grid: (B, L, D)`` -> the scalar loss."""
        target = square_pixels(images, grid_shape_of(images, grid.shape[1]), self.side)
        error = (self.head(grid) - target).pow(2).mean()
        return error / target.pow(2).mean().clamp_min(1e-8)
