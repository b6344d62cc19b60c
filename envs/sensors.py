"""Sensors: what a glimpse at a cell is, and what it costs.

A sensor turns a batch of images into a :class:`SensorView`, which the glimpse environment
reads from. The view has two faces:

* ``summary: (B, L, Dk)``, what the location policy sees of the whole image before any glimpse
  (the attention keys and the decoder's initial state come from it);
* ``read(location) -> (B, D)``, the glimpse at a location: an index ``(B,)`` (one cell), indices
  ``(B, k)`` (k cells, averaged) or a probability vector ``(B, L)`` (the weighted sum of every
  cell, differentiable).

Two sensors:

* :class:`GridSensor` (Show, Attend and Tell): the encoder runs once over the whole image and
  a glimpse gathers from its feature grid. Reading one cell or all of them costs the same
  encoder work, so hard attention saves nothing here.
* :class:`PatchSensor` (Recurrent Attention Model): a glimpse at a cell *encodes only the image
  region under it*, on demand, optionally at several scales; the policy chooses from a cheap
  low-resolution *gist* of the image plus what it has read so far. Hard attention with K
  glimpses encodes K regions, soft attention must encode all L (once per image, then reused).

Weighted sums go through :class:`CellReader`, a module, as a batched matmul, so that
``torch.utils.flop_counter.FlopCounterMode`` counts them and attributes them to attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from rl_attn.encoder import Encoder, to_float, with_coordinates
from rl_attn.errors import UserError


class CellReader(nn.Module):
    """``cells: (B, L, D)`` and a location -> the glimpse ``(B, D)``: the cell of an index
    ``(B,)``, the mean of the cells of indices ``(B, k)``, the weighted sum (a matmul) for a
    probability vector ``(B, L)``."""

    def forward(self, cells: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(cells.shape[0], device=cells.device)
        if location.dim() == 2 and not location.is_floating_point():
            return cells[rows.unsqueeze(1), location].mean(dim=1)
        if location.dim() == 1:
            return cells[rows, location]
        return torch.einsum("bl,bld->bd", location, cells)


class SensorView:
    """What a sensor knows about one batch of images. Subclasses implement :meth:`read`
    and :meth:`index`."""

    summary: torch.Tensor

    @property
    def num_cells(self) -> int:
        return int(self.summary.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.summary.shape[0])

    @property
    def dim(self) -> int:
        """``D``, the size of a glimpse."""
        raise NotImplementedError

    def read(self, location: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """The glimpses ``(B, D)`` at ``location``. ``active: (B,)`` bool marks the rows whose
        episodes still run; a sensor may skip the others' work (their glimpse is then 0)."""
        raise NotImplementedError

    def index(self, rows: torch.Tensor) -> SensorView:
        """The view of the given rows (repeated or reordered, as beam search and several
        samples per image need)."""
        raise NotImplementedError


class GridView(SensorView):
    """A precomputed feature grid ``(B, L, D)``; the policy sees the grid itself."""

    def __init__(self, grid: torch.Tensor, reader: CellReader | None = None):
        self.grid = self.summary = grid
        self.reader = reader if reader is not None else CellReader()

    @property
    def dim(self) -> int:
        return int(self.grid.shape[2])

    def read(self, location: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        return self.reader(self.grid, location)  # a gather or one matmul: nothing to skip

    def index(self, rows: torch.Tensor) -> GridView:
        # index_select, not grid[rows]: the same rows, and its backward (index_add) is about
        # three times faster on a CPU than advanced indexing's (index_put with accumulation)
        return GridView(self.grid.index_select(0, rows), self.reader)


class Sensor(nn.Module):
    """Base class. ``observe(encoder, images)`` returns a :class:`SensorView`; ``key_dim`` is
    the size of the summary the policy sees; ``grid_shape`` the cell layout ``(h, w)``."""

    def key_dim(self, encoder: Encoder) -> int:
        raise NotImplementedError

    def grid_shape(self, encoder: Encoder, image_size: int) -> tuple[int, int]:
        raise NotImplementedError

    def check_image_size(self, encoder: Encoder, image_size: int) -> None:
        """Raise :class:`UserError` when the sensor cannot work on images of this size."""

    def observe(self, encoder: Encoder, images: torch.Tensor) -> SensorView:
        raise NotImplementedError


class GridSensor(Sensor):
    """The encoder runs over the whole image; a glimpse gathers from its grid. No parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.reader = CellReader()

    def key_dim(self, encoder: Encoder) -> int:
        return encoder.out_dim

    def grid_shape(self, encoder: Encoder, image_size: int) -> tuple[int, int]:
        return encoder.grid_shape(image_size)

    def observe(self, encoder: Encoder, images: torch.Tensor) -> GridView:
        return GridView(encoder(images), self.reader)


class PatchSensor(Sensor):
    """Glimpses encoded on demand from the image region under a cell (RAM-style retina).

    The image is cut into ``cells x cells`` cells. The glimpse at cell ``l`` is the encoder run
    on the ``patch_size``-pixel square centred on the cell, and, for each further scale, on a
    square twice as wide average-pooled down to ``patch_size`` (zero padding outside the
    image). Each scale's encoder output is averaged over its positions; several scales are
    joined by a linear layer; a learned embedding of the cell (the "where" of RAM) is added.

    The policy sees a *gist*: the image average-pooled to ``2*cells`` pixels a side, with
    coordinate channels, through one 3x3 stride-2 convolution to ``gist_dim`` channels, one
    vector per cell. Its cost is a small fraction of one glimpse. With ``gist_kernel=1`` the
    image is pooled to ``cells`` pixels a side and a 1x1 convolution (a linear map of each
    cell's mean colour and position) gives the gist: cheaper again, and blinder.

    Args:
        dim: ``D``, the encoder's output size (set by the builder).
        cells: cells per image side (``L = cells**2``).
        patch_size: side of the finest patch in pixels.
        scales: number of scales (1 = one patch per glimpse).
        gist_dim: channels of the gist.
        gist_kernel: 3 (the 3x3 convolution above) or 1 (the 1x1 one).
    """

    def __init__(
        self,
        dim: int,
        cells: int = 8,
        patch_size: int = 16,
        scales: int = 2,
        gist_dim: int = 32,
        gist_kernel: int = 3,
    ):
        super().__init__()
        for name, value in (("cells", cells), ("patch_size", patch_size), ("scales", scales)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"sensor.{name} must be a positive integer, got {value!r}")
        if not isinstance(gist_dim, int) or gist_dim < 1:
            raise UserError(f"sensor.gist_dim must be a positive integer, got {gist_dim!r}")
        self.dim, self.cells, self.patch_size, self.scales = dim, cells, patch_size, scales
        if gist_kernel not in (1, 3):
            raise UserError(f"sensor.gist_kernel must be 1 or 3, got {gist_kernel!r}")
        self.gist_dim, self.gist_kernel = gist_dim, gist_kernel
        # a 1x1 convolution is a linear map of each cell's 5 channels (one matmul on a CPU)
        first = (
            nn.Conv2d(5, gist_dim, 3, stride=2, padding=1)
            if gist_kernel == 3
            else nn.Linear(5, gist_dim)
        )
        self.gist = nn.Sequential(first, nn.ReLU())
        self.combine = nn.Linear(scales * dim, dim) if scales > 1 else None
        self.where = nn.Embedding(cells * cells, dim)
        self.reader = CellReader()
        self._offset_tables: dict[tuple, tuple[torch.Tensor, ...]] = {}  # see _gather_table

    def key_dim(self, encoder: Encoder) -> int:
        return self.gist_dim

    def grid_shape(self, encoder: Encoder, image_size: int) -> tuple[int, int]:
        return self.cells, self.cells

    def check_image_size(self, encoder: Encoder, image_size: int) -> None:
        if self.patch_size > image_size:
            raise UserError(
                f"sensor.patch_size={self.patch_size} is larger than the {image_size}-pixel "
                "images; choose a patch no wider than the image"
            )
        if image_size % self.cells:
            raise UserError(
                f"sensor.cells={self.cells} does not divide the {image_size}-pixel images "
                "into whole cells"
            )

    def region(self, scale: int) -> int:
        """Side in pixels of the image region a patch at ``scale`` covers."""
        return self.patch_size * 2**scale

    def pad(self, images: torch.Tensor, channels: int = 3) -> WindowSums:
        """What crops sample from: the images as floats in [0, 1], zero-padded once by
        :attr:`margin`, and for scale ``s > 0`` summed over ``2^s x 2^s`` windows (stride 1;
        scale ``s`` from scale ``s - 1``'s sums), so that pixel ``(y, x)`` already holds ``4^s``
        times the average a pooled patch needs and a crop reads ``patch_size**2`` pixels at any
        scale instead of ``region(s)**2`` (:meth:`crops` divides). Every scale lies in one flat
        tensor, so that one gather reads a glimpse's scales. ``channels=1`` (an encoder reading
        grey) averages the colours first."""
        if channels == 1 and images.shape[1] != 1:
            scale = 1 / images.shape[1] / (255 if images.dtype == torch.uint8 else 1)
            x = images.sum(dim=1, keepdim=True, dtype=torch.float32).mul_(scale)
        else:
            x = to_float(images)
        b, c, h, w = x.shape
        p = self.margin
        shapes = [(b, c, h + 2 * p - 2**s + 1, w + 2 * p - 2**s + 1) for s in range(self.scales)]
        sums = WindowSums(x.new_empty(sum(math.prod(shape) for shape in shapes)), shapes)
        first = sums.scale(0)
        first.zero_()
        first[..., p : p + h, p : p + w] = x
        for s in range(1, self.scales):
            k, prev = 2 ** (s - 1), sums.scale(s - 1)
            rows = prev[..., :-k, :] + prev[..., k:, :]
            torch.add(rows[..., :, :-k], rows[..., :, k:], out=sums.scale(s))
        return sums

    @property
    def margin(self) -> int:
        """Zero padding on each side of the images :meth:`pad` returns: the widest window, so
        that every window overlapping the image is summed whole and the window at the padded
        image's corner lies wholly in the margin (crops read it wherever a region leaves the
        image; regions themselves are not padded, which would cost several times the memory
        traffic at RAM's 60x60 size)."""
        return 2 ** (self.scales - 1)

    def crops(self, sums: WindowSums, rows: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """The regions under ``cells: (N,)`` of images ``rows: (N,)``, each pooled to
        ``patch_size``: ``(N * scales, C, P, P)``, a glimpse's scales adjacent (``sums`` from
        :meth:`pad`). One flat gather, no loop over samples or scales."""
        n, p, c = cells.shape[0], self.patch_size, sums.shapes[0][1]
        table, starts, strides, factors = self._gather_table(sums)
        base = rows.view(n, 1, 1) * strides + starts  # (N, S, 1): each image's start per scale
        crops = sums.flat[base + table[cells].view(n, self.scales, -1)]
        crops = crops.view(n, self.scales, c, p * p).mul_(factors)  # window sums -> means
        return crops.view(n * self.scales, c, p, p)

    def _gather_table(self, sums: WindowSums) -> tuple[torch.Tensor, ...]:
        """For :meth:`crops`: ``(L, S * C * P*P)`` the positions a glimpse at each cell reads in
        one image of every scale (:meth:`_offsets` per channel), and ``(1, S, 1)`` each scale's
        start in ``sums.flat``, its size per image, and ``(1, S, 1, 1)`` ``4^-s``. Computed
        once per shape and device."""
        device = sums.flat.device
        key = (tuple(sums.shapes), str(device))
        if key not in self._offset_tables:
            tables, strides = [], []
            for s, (_, c, h, w) in enumerate(sums.shapes):
                pixels = self._offsets(s, h + 2**s - 1, device)  # (L, P*P), one channel
                channel = torch.arange(c, device=device).view(1, c, 1) * (h * w)
                tables.append((pixels.unsqueeze(1) + channel).flatten(1))
                strides.append(c * h * w)
            scales = range(len(sums.shapes))
            as_column = partial(torch.tensor, device=device)
            self._offset_tables[key] = (
                torch.cat(tables, dim=1),
                as_column([sums.start(s) for s in scales]).view(1, -1, 1),
                as_column(strides).view(1, -1, 1),
                as_column([4.0**-s for s in scales]).view(1, -1, 1, 1),
            )
        return self._offset_tables[key]

    def _offsets(self, scale: int, padded_size: int, device: torch.device) -> torch.Tensor:
        """``(L, P*P)``: the flat positions, in one channel of an image padded to
        ``padded_size`` by :attr:`margin` and window-summed over ``2^scale`` pixels, that a crop
        at ``scale`` reads for each cell (every ``2^scale``-th pixel of the region); a window
        wholly outside the image reads position 0, whose window lies in the zero margin.
        """
        k, r, pad = 2**scale, self.region(scale), self.margin
        size = padded_size - 2 * pad  # the image's side
        side = size // self.cells
        width = padded_size - k + 1  # of the window-summed image
        cells = torch.arange(self.cells**2, device=device)
        offs = torch.arange(self.patch_size, device=device) * k
        # top-left pixel of each window, in image coordinates: (L, P)
        ys = torch.floor((cells // self.cells).float() * side + side / 2 - r / 2).long()
        xs = torch.floor((cells % self.cells).float() * side + side / 2 - r / 2).long()
        ys, xs = ys.unsqueeze(1) + offs, xs.unsqueeze(1) + offs
        y_in = ((ys + k > 0) & (ys < size)).unsqueeze(2)
        x_in = ((xs + k > 0) & (xs < size)).unsqueeze(1)
        flat = (ys + pad).unsqueeze(2) * width + (xs + pad).unsqueeze(1)
        return torch.where(y_in & x_in, flat, 0).flatten(1)

    def encode(
        self,
        encoder: Encoder,
        sums: WindowSums,
        rows: torch.Tensor,
        cells: torch.Tensor,
    ) -> torch.Tensor:
        """Glimpses ``(N, D)`` at ``cells: (N,)`` of images ``rows: (N,)``."""
        n = cells.shape[0]
        feats = encoder(self.crops(sums, rows, cells))
        feats = feats.squeeze(1) if feats.shape[1] == 1 else feats.mean(dim=1)
        if self.combine is not None:
            feats = self.combine(feats.view(n, -1))  # the scales of a glimpse, joined
        return feats + self.where(cells)

    def summarize(self, images: torch.Tensor) -> torch.Tensor:
        """The gist ``(B, L, gist_dim)``."""
        size, side = images.shape[-1], self.cells * (2 if self.gist_kernel == 3 else 1)
        if size % side == 0:
            x = _block_mean(images, size // side)
        else:
            x = F.adaptive_avg_pool2d(to_float(images), side)
        x = with_coordinates(x * 2 - 1)
        if self.gist_kernel == 1:
            return self.gist(x.flatten(2).transpose(1, 2))
        return self.gist(x).flatten(2).transpose(1, 2)

    def observe(self, encoder: Encoder, images: torch.Tensor) -> PatchView:
        self.check_image_size(encoder, images.shape[-1])
        x = to_float(images)  # once for both (a new batch's first touch of memory is slow)
        sums = self.pad(x, getattr(encoder, "channels", 3))
        return PatchView(self, encoder, sums, self.summarize(x))


@dataclass
class WindowSums:
    """A patch sensor's window-summed images (:meth:`PatchSensor.pad`), scale after scale in
    one flat tensor: ``shapes[s] = (B, C, h_s, w_s)``."""

    flat: torch.Tensor
    shapes: list[tuple[int, int, int, int]]

    def start(self, s: int) -> int:
        """Where scale ``s``'s images begin in :attr:`flat`."""
        return sum(math.prod(shape) for shape in self.shapes[:s])

    def scale(self, s: int) -> torch.Tensor:
        """Scale ``s``'s images ``(B, C, h_s, w_s)``, a view of :attr:`flat`."""
        start, shape = self.start(s), self.shapes[s]
        return self.flat[start : start + math.prod(shape)].view(shape)

    def index(self, rows: torch.Tensor) -> WindowSums:
        """The images of ``rows`` (beam search reorders and repeats them)."""
        parts = [self.scale(s)[rows] for s in range(len(self.shapes))]
        return WindowSums(torch.cat([x.flatten() for x in parts]), [tuple(x.shape) for x in parts])


def _block_mean(images: torch.Tensor, k: int) -> torch.Tensor:
    """``F.avg_pool2d(to_float(images), k)`` for images whose side ``k`` divides: two reshaped
    sums and one scaling of the pooled result, several times faster on a CPU."""
    b, c, h, w = images.shape
    x = images.float().view(b, c, h // k, k, w).sum(dim=3)
    x = x.view(b, c, h // k, w // k, k).sum(dim=4)
    return x.mul_(1 / (k * k * (255 if images.dtype == torch.uint8 else 1)))


class PatchView(SensorView):
    """Padded images plus their gist; glimpses are encoded when read. A probability-vector read
    encodes every cell once and keeps them for the rest of the episode."""

    def __init__(
        self,
        sensor: PatchSensor,
        encoder: Encoder,
        sums: WindowSums,
        gist: torch.Tensor,
        all_cells: torch.Tensor | None = None,
    ):
        self.sensor, self.encoder, self.sums = sensor, encoder, sums
        self.summary = gist
        self.all_cells = all_cells
        self._all_rows: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return self.sensor.dim

    def read(self, location: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        b, dev = self.batch_size, self.summary.device
        if location.is_floating_point():  # soft: every cell, encoded once per episode
            if self.all_cells is None:
                n = self.num_cells
                rows = torch.arange(b, device=dev).repeat_interleave(n)
                cells = torch.arange(n, device=dev).repeat(b)
                feats = self.sensor.encode(self.encoder, self.sums, rows, cells)
                self.all_cells = feats.view(b, n, -1)
            return self.sensor.reader(self.all_cells, location)
        cells = location.view(b, -1)
        k = cells.shape[1]
        # hard: encode only the patches of running episodes
        if active is None or bool(active.all()):
            rows = self._rows(b, k, dev)
            feats = self.sensor.encode(self.encoder, self.sums, rows, cells.flatten())
            return feats.view(b, k, -1).mean(dim=1) if k > 1 else feats
        keep = active.nonzero().squeeze(1)
        out = self.summary.new_zeros(b, self.dim)
        if keep.numel() == 0:
            return out
        rows = keep.repeat_interleave(k)
        feats = self.sensor.encode(self.encoder, self.sums, rows, cells[keep].flatten())
        return out.index_copy(0, keep, feats.view(keep.numel(), k, -1).mean(dim=1))

    def _rows(self, b: int, k: int, device: torch.device) -> torch.Tensor:
        """``0, .., 0, 1, .., 1, ..``: each of the ``b`` rows ``k`` times (kept per view)."""
        if self._all_rows is None or self._all_rows.numel() != b * k:
            self._all_rows = torch.arange(b, device=device).repeat_interleave(k)
        return self._all_rows

    def index(self, rows: torch.Tensor) -> PatchView:
        cached = self.all_cells[rows] if self.all_cells is not None else None
        return PatchView(
            self.sensor, self.encoder, self.sums.index(rows), self.summary[rows], cached
        )
