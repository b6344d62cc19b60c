"""Image -> feature grid. Every agent shares one of these.

An encoder maps images ``(B, 3, H, W)`` (uint8 in [0, 255] or float in [0, 1]) to a feature grid
``(B, L, D)`` with ``L = h * w`` cells in row-major order, cell ``l`` covering rows
``[l // w * H/h, ...)`` and columns ``[l % w * W/w, ...)`` of the image.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rl_attn.errors import UserError

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float in [0, 1]; float images pass through."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def with_coordinates(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C + 2, H, W)``: x and y of each pixel in [-1, 1] appended
    (CoordConv), so that features can say where they are."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1, 1, w, device=x.device).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([x, xs, ys], dim=1)


class Encoder(nn.Module):
    """Base class: subclasses set ``out_dim`` and implement :meth:`feature_map`. ``channels``
    is how many colour channels it reads (a sensor may hand a grey encoder one)."""

    out_dim: int
    channels: int = 3

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(B, 3, H, W)`` -> features ``(B, D, h, w)``."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images ``(B, 3, H, W)`` -> grid ``(B, L, D)``."""
        x = (to_float(images) - self.mean) / self.std
        return self.feature_map(x).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def grid_shape(self, image_size: int) -> tuple[int, int]:
        """``(h, w)`` of the grid for square images of ``image_size`` pixels."""
        was_training = self.training
        self.eval()
        probe = torch.zeros(1, 3, image_size, image_size, device=self.mean.device)
        h, w = self.feature_map(probe).shape[-2:]
        self.train(was_training)
        return int(h), int(w)


def block_padding(kernel: int, stride: int) -> int:
    """Padding that keeps a block's output at ``input / stride`` (an even kernel at stride 1
    loses one row and column). With ``kernel - stride`` even each output is centred on the
    square of input it stands for; otherwise (3 at stride 2) its centre is half an input pixel
    up and left of the square's."""
    return (kernel - stride) // 2 if (kernel - stride) % 2 == 0 else (kernel - 1) // 2


class ConvEncoder(Encoder):
    """A small conv net for the generated scenes: conv-BN-ReLU blocks.

    Two coordinate channels (x and y in [-1, 1]) are appended to the input (CoordConv), so each
    cell's feature also says where the cell is; the decoder needs that to name objects in
    left-to-right order. By default they are appended to the output grid as well.

    Args:
        channels: output channels of each block.
        strides: stride of each block; the grid side is ``H / prod(strides)``.
        coords: append the coordinate channels.
        out_coords: append them to the output too (since 2026-12-02), so every cell's vector
            ends with its own exact x and y: what one glimpse reads then says where it was
            taken (the Recurrent Attention Model's "where" beside its "what"), and soft
            attention's context is the expected position. Without them the default hard
            agent named another object of the scene in place of the one due far more often
            than soft attention (benchmarks/RESULTS.md, issue 14, "A seventh session").
        kernels: kernel side of each block (``None``: 3 in every block). A block whose
            kernel minus stride is even keeps each output centred on its square of input (4
            at stride 2, 3 at stride 1: ``[4, 4, 4, 3, 3]`` centres every cell's receptive
            field on the cell's square); 3 at stride 2 puts each output half an input pixel
            up and left, which three such blocks add up to 3.5 pixels
            (:func:`block_padding`; benchmarks/RESULTS.md, issue 14, "A twelfth session").
    """

    def __init__(
        self,
        channels: tuple[int, ...] = (16, 32, 64, 128, 128),
        strides: tuple[int, ...] = (2, 2, 2, 1, 1),
        coords: bool = True,
        out_coords: bool = True,
        kernels: tuple[int, ...] | None = None,
    ):
        super().__init__()
        try:
            kernels = tuple(kernels) if kernels is not None else (3,) * len(channels)
        except TypeError:
            kernels = (kernels,)  # a single number: refused below with the rest
        if len(channels) != len(strides) or not channels:
            raise UserError(
                f"encoder.channels and encoder.strides need the same non-zero length, got "
                f"{len(channels)} and {len(strides)}"
            )
        if len(kernels) != len(channels) or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in kernels
        ):
            raise UserError(
                f"encoder.kernels needs one positive integer per block ({len(channels)}), "
                f"got {list(kernels)}"
            )
        for key, value in (("coords", coords), ("out_coords", out_coords)):
            if not isinstance(value, bool):
                raise UserError(f"encoder.{key} must be true or false, got {value!r}")
        self.coords, self.out_coords = coords, out_coords
        layers: list[nn.Module] = []
        c_in = 3 + 2 * coords
        for c_out, s, k in zip(channels, strides, kernels):
            layers += [
                nn.Conv2d(c_in, c_out, k, stride=s, padding=block_padding(k, s), bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.net = nn.Sequential(*layers)
        self.out_dim = c_in + 2 * out_coords

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        features = self.net(with_coordinates(x) if self.coords else x)
        return with_coordinates(features) if self.out_coords else features


class MLPEncoder(Encoder):
    """The Recurrent Attention Model's glimpse network for ``sensor=patch``: the patch's pixels,
    flattened, through fully connected ReLU layers, giving one vector per patch (a 1x1 grid).

    Args:
        size: side in pixels of the patches it takes (``sensor.patch_size``).
        dims: output size of each layer; the last one is ``D``.
        gray: average the three colour channels first (digits are grey).
    """

    def __init__(self, size: int | None, dims: tuple[int, ...] = (256,), gray: bool = True):
        super().__init__()
        if size is None:
            raise UserError(
                "encoder=mlp encodes small patches, not whole images: use it with sensor=patch"
            )
        dims = tuple(dims)
        if not isinstance(size, int) or size < 1:
            raise UserError(f"encoder.size must be a positive integer, got {size!r}")
        if not dims or any(not isinstance(d, int) or d < 1 for d in dims):
            raise UserError(f"encoder.dims must be positive integers, got {list(dims)!r}")
        self.size, self.gray = size, gray
        self.channels = 1 if gray else 3
        layers: list[nn.Module] = [nn.Linear(self.channels * size * size, dims[0]), nn.ReLU()]
        for d_in, d_out in zip(dims, dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.out_dim = dims[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patches ``(N, 3, P, P)`` -> ``(N, 1, D)``. The pixels go in as they are, in [0, 1]
        (RAM's glimpse network takes raw intensities: no ImageNet normalisation)."""
        return self._vectors(to_float(images)).unsqueeze(1)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self._vectors(x)[:, :, None, None]

    def _vectors(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.size, self.size):
            raise UserError(
                f"encoder=mlp takes {self.size}-pixel patches (sensor=patch with "
                f"sensor.patch_size={self.size}), got {x.shape[-2]}x{x.shape[-1]} images"
            )
        if self.gray and x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        return self.net(x.flatten(1))


_TORCHVISION = {
    "resnet18": ("layer3", "layer4"),
    "resnet34": ("layer3", "layer4"),
    "resnet50": ("layer3", "layer4"),
    "vgg16": ("features",),
}


class TorchvisionEncoder(Encoder):
    """A torchvision backbone cut before its pooling, as Show-Attend-Tell used VGG's last conv.

    Args:
        name: one of ``resnet18``, ``resnet34``, ``resnet50``, ``vgg16``.
        layer: for ResNets, the last stage kept (``layer3`` gives stride 16, ``layer4`` stride 32).
        weights_path: where the pretrained weights come from: a local ``state_dict`` file;
            ``"cache"``, torchvision's own file for this model in the torch hub cache
            (``~/.cache/torch/hub/checkpoints/``, where an earlier download put it), read
            without any network; ``"download"``, torchvision's download into that cache (the
            one option that needs a network: for machines online); ``None``, random weights.
        trainable: fine-tune the backbone; ``False`` freezes it (and keeps its BatchNorm in eval).
        cache_dir: with a frozen backbone, keep each image's grid in a file here (float16, keyed
            by the image's bytes and the weights), so later epochs and runs skip the backbone.
    """

    def __init__(
        self,
        name: str = "resnet18",
        layer: str = "layer4",
        weights_path: str | None = None,
        trainable: bool = True,
        cache_dir: str | None = None,
    ):
        super().__init__()
        import torchvision

        if cache_dir is not None and trainable:
            raise UserError(
                "encoder.cache_dir needs encoder.trainable=false: a fine-tuned backbone's "
                "features change at every update"
            )

        if name not in _TORCHVISION:
            raise UserError(
                f"unknown torchvision encoder {name!r}; choose one of {', '.join(_TORCHVISION)}"
            )
        model = torchvision.models.get_model(name, weights=None)
        if weights_path == "download":
            model.load_state_dict(_download(name))
        elif weights_path is not None:
            path = cached_weights(name) if weights_path == "cache" else Path(weights_path)
            path = path.expanduser()
            if not path.is_file():
                where = (
                    f"torchvision's cache has no {name} weights at {str(path)!r}"
                    if weights_path == "cache"
                    else f"encoder weights file {str(path)!r} does not exist"
                )
                raise UserError(
                    f"{where}; give a local state_dict file (encoder.weights_path=FILE), "
                    "encoder.weights_path=download on a machine with a network, or "
                    "encoder.weights_path=null for random weights"
                )
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(state)
            except pickle.UnpicklingError:  # torch's own message would advise a full load
                raise UserError(
                    f"cannot load encoder weights from {str(path)!r}: it holds objects that a "
                    "weights-only load does not run; give a plain state_dict file"
                ) from None
            except Exception as exc:  # corrupt file, wrong architecture
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise UserError(
                    f"cannot load encoder weights from {str(path)!r}: {reason}"
                ) from None
        if name.startswith("resnet"):
            if layer not in _TORCHVISION[name]:
                raise UserError(
                    f"layer must be one of {', '.join(_TORCHVISION[name])}, got {layer!r}"
                )
            stages = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
            stages = stages[: stages.index(layer) + 1]
            self.trunk = nn.Sequential(*(getattr(model, s) for s in stages))
            self.out_dim = _out_channels(getattr(model, layer))
        else:
            self.trunk = model.features[:-1]  # drop the last max-pool, as Show-Attend-Tell did
            self.out_dim = 512
        self.trainable = trainable
        for p in self.trunk.parameters():
            p.requires_grad_(trainable)
        self.cache = None
        if cache_dir is not None:
            tag = f"{name}_{layer if name.startswith('resnet') else 'features'}"
            self.cache = FeatureCache(Path(cache_dir).expanduser() / tag, self.trunk)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            return super().forward(images)
        return self.cache.lookup(images, super().forward)

    def train(self, mode: bool = True) -> TorchvisionEncoder:
        super().train(mode)
        if not self.trainable:
            self.trunk.eval()
        return self

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


class FeatureCache:
    """Grids of a frozen encoder on disk, one ``.npy`` file (float16) per image, named by a
    digest of the image's bytes under a folder named by a digest of the weights. Read with
    ``allow_pickle=False``: the files hold numbers only."""

    def __init__(self, root: Path, trunk: nn.Module):
        self.base, self.trunk = root, trunk
        self.root: Path | None = None  # named at the first lookup, after any weights are loaded

    def _weights_folder(self) -> Path:
        digest = hashlib.blake2b(digest_size=8)
        for tensor in self.trunk.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        folder = self.base / digest.hexdigest()
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def path(self, image: torch.Tensor) -> Path:
        if self.root is None:
            self.root = self._weights_folder()
        key = hashlib.blake2b(image.cpu().contiguous().numpy().tobytes(), digest_size=16)
        name = key.hexdigest()
        return self.root / name[:2] / f"{name}.npy"

    @torch.no_grad()
    def lookup(self, images: torch.Tensor, compute) -> torch.Tensor:  # noqa: ANN001
        """Grids ``(B, L, D)`` of ``images``: from the files, computing (and saving) those
        not there yet with ``compute``."""
        paths = [self.path(image) for image in images]
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        grids: list[torch.Tensor | None] = [None] * len(paths)
        if missing:
            fresh = compute(images[missing])
            for i, grid in zip(missing, fresh):
                paths[i].parent.mkdir(exist_ok=True)
                tmp = paths[i].with_suffix(f".{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, grid.cpu().to(torch.float16).numpy())
                os.replace(tmp, paths[i])  # whole files only, even if the run is killed
                grids[i] = grid.to(torch.float16)  # as a later read will give it
        for i, p in enumerate(paths):
            if grids[i] is None:
                stored = np.load(p, allow_pickle=False)
                grids[i] = torch.from_numpy(stored).to(images.device, torch.float32)
        return torch.stack([g.to(images.device, torch.float32) for g in grids])


def cached_weights(name: str) -> Path:
    """The file torchvision's default weights for ``name`` are cached in (present or not)."""
    import torchvision

    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


def _download(name: str) -> dict[str, torch.Tensor]:
    """torchvision's default weights for ``name``, downloaded into the torch hub cache (or read
    from it when already there)."""
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # URLError, timeouts, hash mismatch
        raise UserError(
            f"cannot download the {name} weights from {weights.url} ({exc}); with no network, "
            f"copy the file to {cached_weights(name)} and use encoder.weights_path=cache, or give "
            "encoder.weights_path=FILE"
        ) from None


def _out_channels(stage: nn.Module) -> int:
    return [m for m in stage.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
