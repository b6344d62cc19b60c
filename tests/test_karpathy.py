"""Karpathy-split caption datasets (COCO / Flickr format) from a small local fixture."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from rl_attn.errors import UserError
from rl_attn.karpathy import karpathy_splits
from rl_attn.trainer import train
from rl_attn.vocab import Vocabulary

# (filepath, split, captions): COCO-style sub-folders, a restval image, a long caption.
IMAGES = [
    ("train2014", "train", ["A dog runs on the grass.", "A brown dog is running"]),
    ("train2014", "train", ["a dog sleeps", "The dog sleeps on a red sofa!"]),
    ("train2014", "train", ["a cat sits on the sofa", "a cat"]),
    ("val2014", "restval", ["a dog and a cat play in the yard"]),
    ("val2014", "val", ["a red ball on the grass"]),
    ("val2014", "test", ["one two three four five six seven eight nine ten eleven twelve"]),
    ("val2014", "test", ["a cat looks at a dog"]),
]


def make_dataset(root: Path, tokens: bool = True) -> Path:
    """Images and a ``dataset_coco.json`` in the Karpathy format; returns the JSON path."""
    rng = np.random.default_rng(0)
    entries = []
    for i, (folder, split, captions) in enumerate(IMAGES):
        (root / folder).mkdir(parents=True, exist_ok=True)
        name = f"COCO_{i:06d}.jpg"
        pixels = rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / folder / name)
        sentences = []
        for c in captions:
            sentence = {"raw": c, "imgid": i}
            if tokens:  # as in the real files: lower-case words, punctuation removed
                sentence["tokens"] = c.lower().replace(".", "").replace("!", "").split()
            sentences.append(sentence)
        entries.append({"filepath": folder, "filename": name, "split": split,
                        "sentences": sentences, "imgid": i})  # fmt: skip
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


@pytest.mark.parametrize("tokens", [True, False])
def test_splits_references_and_preprocessing(tmp_path, tokens):
    path = make_dataset(tmp_path, tokens)
    splits = karpathy_splits(str(path), str(tmp_path), image_size=32, max_len=8)
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert train.images.shape == (4, 3, 32, 32) and train.images.dtype == torch.uint8
    assert (len(val.references), len(test.references)) == (1, 2)
    assert train.references[0] == ["a dog runs on the grass", "a brown dog is running"]
    assert train.references[3] == ["a dog and a cat play in the"]  # restval joins train
    assert test.references[0] == ["one two three four five six seven eight"]  # max_len words
    assert len(train) == 7 and train.image_of.tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert train.files[3].endswith("val2014/COCO_000003.jpg")
    # pixels are the file's, resized
    with Image.open(tmp_path / "train2014" / "COCO_000001.jpg") as im:
        expected = np.asarray(im.convert("RGB").resize((32, 32), Image.BICUBIC))
    assert np.array_equal(train.images[1].permute(1, 2, 0).numpy(), expected)


def test_vocabulary_threshold_and_restval_choices(tmp_path):
    path = make_dataset(tmp_path)
    splits = karpathy_splits(str(path), str(tmp_path), image_size=16, min_word_count=3)
    train = splits["train"]
    vocab = Vocabulary.build(train.captions, min_count=train.min_word_count)
    assert {"a", "dog", "cat"} <= set(vocab.itos)  # 3+ times in training captions
    assert "sofa" not in vocab.itos and "yard" not in vocab.itos  # twice / once
    assert vocab.encode("a sofa")[2] == Vocabulary.unk
    to_val = karpathy_splits(str(path), str(tmp_path), image_size=16, restval="val")
    assert len(to_val["train"].references) == 3 and len(to_val["val"].references) == 2
    skipped = karpathy_splits(str(path), str(tmp_path), image_size=16, restval="skip")
    assert len(skipped["train"].references) == 3 and len(skipped["val"].references) == 1


def test_disk_cache_is_reused(tmp_path):
    path = make_dataset(tmp_path)
    cache = tmp_path / "cache"
    first = karpathy_splits(str(path), str(tmp_path), image_size=16, cache_dir=str(cache))
    assert len(list(cache.glob("*.u8"))) == 3
    for f in (tmp_path / "train2014").glob("*.jpg"):  # the cache no longer needs decoding
        f.write_bytes(b"")
    second = karpathy_splits(str(path), str(tmp_path), image_size=16, cache_dir=str(cache))
    assert torch.equal(first["train"].images, second["train"].images)
    for f in cache.glob("*.u8"):  # a damaged cache is rebuilt, not trusted
        f.unlink()
    make_dataset(tmp_path)
    third = karpathy_splits(str(path), str(tmp_path), image_size=16, cache_dir=str(cache))
    assert torch.equal(first["train"].images, third["train"].images)


def test_missing_files_keys_and_corrupt_images_are_clear_errors(tmp_path):
    path = make_dataset(tmp_path)
    with pytest.raises(UserError, match="set the dataset's local paths"):
        karpathy_splits(None, str(tmp_path))
    with pytest.raises(UserError, match="image folder '/no/such' does not exist"):
        karpathy_splits(str(path), "/no/such")
    with pytest.raises(UserError, match="caption file '.*absent.json' does not exist"):
        karpathy_splits(str(tmp_path / "absent.json"), str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "train"}]}))
    with pytest.raises(UserError, match=r"images\[0\] lacks the key\(s\) sentences"):
        karpathy_splits(str(bad), str(tmp_path))
    bad.write_text(json.dumps({"dataset": "coco"}))
    with pytest.raises(UserError, match="has no 'images' list"):
        karpathy_splits(str(bad), str(tmp_path))
    bad.write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        karpathy_splits(str(bad), str(tmp_path))

    (tmp_path / "val2014" / "COCO_000004.jpg").unlink()
    with pytest.raises(UserError, match=r"image '.*val2014/COCO_000004.jpg' listed in .* does not"):
        karpathy_splits(str(path), str(tmp_path))
    make_dataset(tmp_path)
    (tmp_path / "train2014" / "COCO_000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=r"cannot decode image '.*train2014/COCO_000001.jpg'"):
        karpathy_splits(str(path), str(tmp_path), image_size=16)
    splits = karpathy_splits(str(path), str(tmp_path), image_size=16, skip_corrupt=True)
    assert len(splits["train"].references) == 3  # the corrupt one left out
    assert all("COCO_000001" not in f for f in splits["train"].files)


def test_training_on_a_karpathy_dataset(tmp_path):
    path = make_dataset(tmp_path / "data")
    overrides = [
        "task=coco", f"task.json_path={path}", f"task.image_dir={tmp_path / 'data'}",
        "task.image_size=32", "task.min_word_count=1", "trainer.max_steps=6",
        "trainer.batch_size=4", "trainer.progress=false", "trainer.eval_interval=100",
        "encoder.channels=[8,16]", "encoder.strides=[2,2]", "decoder.hidden_dim=16",
        "decoder.attn_dim=8", "decoder.embed_dim=8", "eval.meteor=false", "eval.beam_size=2",
    ]  # fmt: skip
    with initialize_config_module(config_module="rl_attn.configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    summary = train(cfg, tmp_path / "run")
    assert summary["grid"] == [8, 8]
    assert 0 <= summary["test"]["beam2"]["BLEU-1"] <= 1
    assert "attention_correctness" not in summary["test"]["beam2"]  # no boxes in real data
    rows = json.loads((tmp_path / "run" / "test_captions.json").read_text())
    assert rows[0]["references"] == [IMAGES[5][2][0].lower()]  # 12 words: under max_len 16
