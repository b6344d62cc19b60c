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
        self._offset_tables: dict[tuple[int, int, str], torch.Tensor] = {}

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

    def pad(self, images: torch.Tensor, channels: int = 3) -> list[torch.Tensor]:
        """One image per scale that crops sample from: the images as floats in [0, 1],
        zero-padded so that every region fits, and for scale ``s > 0`` mean-filtered over
        ``2^s x 2^s`` windows (stride 1), so that pixel ``(y, x)`` already holds the average a
        pooled patch needs and a crop reads ``patch_size**2`` pixels at any scale instead of
        ``region(s)**2``. ``channels=1`` (an encoder reading grey) averages the colours first."""
        x = to_float(images)
        if channels == 1 and x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        out = []
        for s in range(self.scales):
            p = self.region(s) // 2 + 1
            padded = F.pad(x, (p, p, p, p))
            out.append(_window_mean(padded, s))
        return out

    def crops(
        self, padded: list[torch.Tensor], rows: torch.Tensor, cells: torch.Tensor
    ) -> list[torch.Tensor]:
        """The regions under ``cells: (N,)`` of images ``rows: (N,)``, one ``(N, C, P, P)``
        tensor per scale, each pooled to ``patch_size`` (``padded`` from :meth:`pad`).
        One flat gather per scale, no loop over samples."""
        out = []
        n, p = cells.shape[0], self.patch_size
        for s, x in enumerate(padded):
            b, c, h, w = x.shape
            pixels = self._offsets(s, h + 2**s - 1, x.device)  # (L, P*P) flat positions
            channel = torch.arange(c, device=x.device).view(1, c, 1) * (h * w)
            index = (rows * (c * h * w)).view(n, 1, 1) + channel + pixels[cells].unsqueeze(1)
            out.append(x.reshape(-1)[index].view(n, c, p, p))
        return out

    def _offsets(self, scale: int, padded_size: int, device: torch.device) -> torch.Tensor:
        """``(L, P*P)``: the flat positions, in one channel of an image padded to
        ``padded_size`` (and mean-filtered: every ``2^scale``-th pixel of the region), that a
        crop at ``scale`` reads for each cell; computed once per size and device."""
        key = (scale, padded_size, str(device))
        if key not in self._offset_tables:
            r = self.region(scale)
            pad = r // 2 + 1
            side = (padded_size - 2 * pad) // self.cells
            width = padded_size - 2**scale + 1  # of the mean-filtered image
            cells = torch.arange(self.cells**2, device=device)
            cy = (cells // self.cells).float() * side + side / 2  # centres in pixels
            cx = (cells % self.cells).float() * side + side / 2
            offs = torch.arange(self.patch_size, device=device) * 2**scale
            top = torch.floor(cy - r / 2).long() + pad
            left = torch.floor(cx - r / 2).long() + pad
            ys = (top.unsqueeze(1) + offs).unsqueeze(2)
            xs = (left.unsqueeze(1) + offs).unsqueeze(1)
            self._offset_tables[key] = (ys * width + xs).flatten(1)
        return self._offset_tables[key]

    def encode(
        self,
        encoder: Encoder,
        padded: list[torch.Tensor],
        rows: torch.Tensor,
        cells: torch.Tensor,
    ) -> torch.Tensor:
        """Glimpses ``(N, D)`` at ``cells: (N,)`` of images ``rows: (N,)``."""
        crops = self.crops(padded, rows, cells)
        n = cells.shape[0]
        feats = encoder(torch.cat(crops) if self.scales > 1 else crops[0])
        feats = feats.squeeze(1) if feats.shape[1] == 1 else feats.mean(dim=1)
        if self.combine is not None:
            feats = self.combine(feats.view(self.scales, n, -1).transpose(0, 1).flatten(1))
        return feats + self.where(cells)

    def summarize(self, images: torch.Tensor) -> torch.Tensor:
        """The gist ``(B, L, gist_dim)``."""
        x = to_float(images)
        size, side = x.shape[-1], self.cells * (2 if self.gist_kernel == 3 else 1)
        # a plain average pool where the cells divide the image (faster on a CPU)
        if size % side == 0:
            x = F.avg_pool2d(x, size // side)
        else:
            x = F.adaptive_avg_pool2d(x, side)
        x = with_coordinates(x * 2 - 1)
        if self.gist_kernel == 1:
            return self.gist(x.flatten(2).transpose(1, 2))
        return self.gist(x).flatten(2).transpose(1, 2)

    def observe(self, encoder: Encoder, images: torch.Tensor) -> PatchView:
        self.check_image_size(encoder, images.shape[-1])
        padded = self.pad(images, getattr(encoder, "channels", 3))
        return PatchView(self, encoder, padded, self.summarize(images))


def _window_mean(x: torch.Tensor, doublings: int) -> torch.Tensor:
    """``F.avg_pool2d(x, 2**doublings, stride=1)``, as ``2 * doublings`` shifted adds (a window
    of ``2k`` is two windows of ``k``, ``k`` apart), several times faster on a CPU."""
    k = 1
    for _ in range(doublings):
        x = x[..., :-k, :] + x[..., k:, :]
        x = x[..., :, :-k] + x[..., :, k:]
        k *= 2
    return x / (k * k) if k > 1 else x


class PatchView(SensorView):
    """Padded images plus their gist; glimpses are encoded when read. A probability-vector read
    encodes every cell once and keeps them for the rest of the episode."""

    def __init__(
        self,
        sensor: PatchSensor,
        encoder: Encoder,
        padded: list[torch.Tensor],
        gist: torch.Tensor,
        all_cells: torch.Tensor | None = None,
    ):
        self.sensor, self.encoder, self.padded = sensor, encoder, padded
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
                feats = self.sensor.encode(self.encoder, self.padded, rows, cells)
                self.all_cells = feats.view(b, n, -1)
            return self.sensor.reader(self.all_cells, location)
        cells = location.view(b, -1)
        k = cells.shape[1]
        # hard: encode only the patches of running episodes
        if active is None or bool(active.all()):
            rows = self._rows(b, k, dev)
            feats = self.sensor.encode(self.encoder, self.padded, rows, cells.flatten())
            return feats.view(b, k, -1).mean(dim=1) if k > 1 else feats
        keep = active.nonzero().squeeze(1)
        out = self.summary.new_zeros(b, self.dim)
        if keep.numel() == 0:
            return out
        rows = keep.repeat_interleave(k)
        feats = self.sensor.encode(self.encoder, self.padded, rows, cells[keep].flatten())
        return out.index_copy(0, keep, feats.view(keep.numel(), k, -1).mean(dim=1))

    def _rows(self, b: int, k: int, device: torch.device) -> torch.Tensor:
        """``0, .., 0, 1, .., 1, ..``: each of the ``b`` rows ``k`` times (kept per view)."""
        if self._all_rows is None or self._all_rows.numel() != b * k:
            self._all_rows = torch.arange(b, device=device).repeat_interleave(k)
        return self._all_rows

    def index(self, rows: torch.Tensor) -> PatchView:
        cached = self.all_cells[rows] if self.all_cells is not None else None
        padded = [x[rows] for x in self.padded]
        return PatchView(self.sensor, self.encoder, padded, self.summary[rows], cached)
