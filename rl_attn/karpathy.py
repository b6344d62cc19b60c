"""Caption datasets from local files in the Karpathy split format (COCO, Flickr8k, Flickr30k).

The format is one JSON file (``dataset_coco.json``, ``dataset_flickr8k.json``, ...)::

    {"images": [{"filename": "1000268201_693b08cb0e.jpg",
                 "filepath": "val2014",                      # COCO only: a sub-folder
                 "split": "train" | "val" | "test" | "restval",
                 "sentences": [{"tokens": ["a", "child", ...], "raw": "A child ..."}, ...]},
                ...]}

Preprocessing, as in the usual Karpathy-split pipelines: captions are lower-cased (``tokens``
when present, else ``raw`` split into words with punctuation removed) and cut to ``max_len``
words; words seen fewer than ``min_word_count`` times in the training captions become
``<unk>`` (the trainer builds the vocabulary with that threshold); COCO's ``restval`` images
join ``train`` unless ``restval`` says otherwise.

Images are decoded once, resized to ``image_size`` x ``image_size`` and kept as uint8 in
memory, or in a file under ``cache_dir`` (memory-mapped, so COCO's 123k images need not fit in
RAM, and later runs skip the decoding). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from rl_attn.errors import UserError

SPLITS = ("train", "val", "test")
_PUNCT = re.compile(r"[^\w\s]")


class CaptionSplit:
    """One split: ``images`` ``(N, 3, S, S)`` uint8 (one row per image), ``references`` (the
    captions of each image), ``files`` (their paths).

    For training, ``captions`` holds every caption of every image and ``image_of[i]`` the image
    row of caption ``i``; ``len()`` counts captions, so an epoch sees each caption once. The
    trainer builds its vocabulary with ``min_word_count``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        references: list[list[str]],
        files: list[str],
        min_word_count: int = 1,
    ):
        self.images = images
        self.references = references
        self.files = files
        self.min_word_count = min_word_count
        self.captions = [c for refs in references for c in refs]
        self.image_of = torch.tensor([i for i, refs in enumerate(references) for _ in refs])

    def __len__(self) -> int:
        return len(self.captions)


def preprocess(sentence: dict[str, Any], max_len: int) -> str:
    """A caption as lower-case words separated by spaces, at most ``max_len`` of them."""
    if "tokens" in sentence:
        words = [str(t).lower() for t in sentence["tokens"]]
    else:
        words = _PUNCT.sub(" ", str(sentence["raw"]).lower()).split()
    words = [w for w in words if w.strip()]
    return " ".join(words[:max_len])


def _read_json(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"caption file {str(path)!r} does not exist; set task.json_path")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{str(path)!r} has no 'images' list (Karpathy split format expected)")
    for i, entry in enumerate(data["images"]):
        missing = [k for k in ("filename", "split", "sentences") if k not in entry]
        if missing:
            raise UserError(f"{str(path)!r}: images[{i}] lacks the key(s) {', '.join(missing)}")
        for j, sentence in enumerate(entry["sentences"]):
            if "tokens" not in sentence and "raw" not in sentence:
                raise UserError(
                    f"{str(path)!r}: images[{i}].sentences[{j}] has neither 'tokens' nor 'raw'"
                )
    return data["images"]


def _decode(path: Path, size: int) -> np.ndarray:
    """``(3, size, size)`` uint8; raises ``OSError`` / ``UnidentifiedImageError`` if corrupt."""
    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def _load_images(
    files: list[Path], size: int, cache_dir: Path | None, skip_corrupt: bool, split: str
) -> tuple[torch.Tensor, list[int]]:
    """Decode ``files`` (with a progress bar) into ``(N, 3, size, size)`` uint8, in memory or a
    memory-mapped cache file; return it with the indices of the files kept."""
    # the cache serves the same files at the same size under the same corrupt-image rule
    parts = [str(size), f"skip_corrupt={skip_corrupt}", *(str(f.resolve()) for f in files)]
    key = hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        data_file = cache_dir / f"{split}_{size}px_{key}.u8"
        done_file = data_file.with_suffix(".json")
        expected = None
        if done_file.is_file():  # complete from an earlier run, unless damaged since
            kept = json.loads(done_file.read_text())["kept"]
            expected = len(kept) * 3 * size * size
        if expected is not None and data_file.is_file() and data_file.stat().st_size >= expected:
            array = np.memmap(data_file, np.uint8, "c", shape=(len(kept), 3, size, size))
            return torch.from_numpy(array), kept
        array = np.memmap(data_file, np.uint8, "w+", shape=(len(files), 3, size, size))
    else:
        array = np.empty((len(files), 3, size, size), np.uint8)
    kept: list[int] = []
    bad: list[str] = []
    for i, path in enumerate(tqdm(files, desc=f"decoding {split} images", disable=None)):
        try:
            array[len(kept)] = _decode(path, size)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            if not skip_corrupt:
                raise UserError(
                    f"cannot decode image {str(path)!r} ({type(exc).__name__}: {exc}); fix or "
                    "remove it, or set task.skip_corrupt=true to leave such images out"
                ) from None
            bad.append(str(path))
            continue
        kept.append(i)
    if bad:
        print(
            f"warning: left out {len(bad)} {split} image(s) that cannot be decoded "
            f"(task.skip_corrupt=true), e.g. {bad[0]}",
            file=sys.stderr,
        )
    if cache_dir is not None:
        array.flush()
        tmp = done_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"kept": kept, "files": len(files)}))
        os.replace(tmp, done_file)  # written last, and whole: the data file is complete
        array = np.memmap(data_file, np.uint8, "c", shape=(len(kept), 3, size, size))
    else:
        array = array[: len(kept)]
    return torch.from_numpy(array), kept


def karpathy_splits(
    json_path: str | None = None,
    image_dir: str | None = None,
    image_size: int = 224,
    max_len: int = 16,
    min_word_count: int = 5,
    restval: str = "train",
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    cache_dir: str | None = None,
    skip_corrupt: bool = False,
    seed: int = 0,
) -> dict[str, CaptionSplit]:
    """The train / val / test splits of a Karpathy-format caption dataset.

    Args:
        json_path: the ``dataset_*.json`` file.
        image_dir: the folder the images (or COCO's ``filepath`` sub-folders) are in.
        image_size: side images are resized to.
        max_len: words kept per caption.
        min_word_count: training-caption count below which a word becomes ``<unk>``.
        restval: the split COCO's ``restval`` images join: ``train``, ``val`` or ``skip``.
        train_size, val_size, test_size: use only the first N images of a split (quick runs).
        cache_dir: keep the decoded images in files here, reused by later runs with the same
            image paths, size and ``skip_corrupt`` (delete the folder after changing the image
            files). Under torchrun, build the cache with one process first.
        skip_corrupt: leave out images that cannot be decoded (with a warning) instead of
            stopping with an error naming the file.
        seed: unused (the splits are fixed by the file); kept for the task-config interface.
    """
    if not json_path or not image_dir:
        raise UserError(
            "set the dataset's local paths: task.json_path=/path/to/dataset_coco.json "
            "task.image_dir=/path/to/images (nothing is downloaded)"
        )
    if restval not in ("train", "val", "skip"):
        raise UserError(f"task.restval must be train, val or skip, got {restval!r}")
    for name, value in (("max_len", max_len), ("image_size", image_size)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"task.{name} must be a positive integer, got {value!r}")
    root = Path(image_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder {str(root)!r} does not exist; set task.image_dir")
    entries = _read_json(Path(json_path).expanduser())
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for entry in entries:
        split = entry["split"]
        if split == "restval":
            split = restval
        if split in by_split and entry["sentences"]:
            by_split[split].append(entry)
    limits = {"train": train_size, "val": val_size, "test": test_size}
    splits: dict[str, CaptionSplit] = {}
    for split, items in by_split.items():
        items = items[: limits[split]] if limits[split] is not None else items
        if not items:
            raise UserError(f"{json_path!r} has no {split} images")
        files = [root / e.get("filepath", "") / e["filename"] for e in items]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise UserError(
                f"image {str(missing[0])!r} listed in {json_path!r} does not exist "
                f"({len(missing)} of {len(files)} {split} images missing); check task.image_dir"
            )
        images, kept = _load_images(
            files, image_size, Path(cache_dir).expanduser() if cache_dir else None,
            skip_corrupt, split,
        )  # fmt: skip
        refs = [[preprocess(s, max_len) for s in items[i]["sentences"]] for i in kept]
        splits[split] = CaptionSplit(
            images, refs, [str(files[i]) for i in kept], min_word_count if split == "train" else 1
        )
    return splits
