"""The compare command end to end on a tiny budget, and its bad-input messages."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, assert_one_line_error, benchmark_module, run_module
from hydra import compose, initialize_config_module
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_attn.compare import encoder_bounds, plot, run_comparison

SMALL = [
    *TINY,
    "trainer.max_steps=12",
    "agents=[soft,reinforce,no_attention]",
    "cells_per_step=[1,2]",
    "overrides.reinforce=[]",
    "cost.images=8",
    "cost.single_images=2",
    "cost.repeats=1",
    "pictures=2",
]


def comparison(tmp_path: Path, *overrides: str) -> dict:
    with initialize_config_module(config_module="rl_attn.configs", version_base="1.3"):
        cfg = compose(config_name="compare", overrides=[*SMALL, *overrides])
        return run_comparison(cfg, tmp_path)


# The 1x1 gist: with the tiny encoder a 3x3 gist costs about one glimpse, which would put an
# agent that decodes only a few words above 1.1 K/L by the gist alone.
PATCH = "sensor=patch", "sensor.gist_kernel=1"


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("compare")
    return out, comparison(out, *PATCH, "encoder=glimpse")


def test_compare_writes_table_plot_and_pictures(compared):
    out, report = compared
    labels = ["soft", "reinforce", "no_attention", "reinforce_k2"]
    assert list(report["runs"]) == labels
    table = (out / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == labels
    assert "encoder MFLOPs" in rows[0] and "latency b1 (ms)" in rows[0]
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["runs"]["soft"]["cost"] == report["runs"]["soft"]["cost"]
    for figure in ("accuracy_vs_flops.png", "val_vs_time.png"):
        with Image.open(out / figure) as plot:
            assert plot.size[0] > 300 and plot.size[1] > 200
            assert len(np.unique(np.asarray(plot.convert("L")))) > 10  # something drawn
    for run in report["runs"].values():  # the last point is the final validation
        assert run["val_curve"][-1]["step"] == run["updates"]
        assert run["val_curve"][-1]["train_time_s"] == pytest.approx(run["train_time_s"], abs=0.01)
    for name in ("agents_0.png", "agents_1.png", "path_reinforce_0.png", "path_reinforce_k2_1.png"):
        with Image.open(out / "attention" / name) as picture:
            assert picture.size[0] > 64
    assert not (out / "attention" / "path_soft_0.png").exists()  # soft reads every cell
    for label in labels:
        assert (out / label / "checkpoints" / "last.pt").is_file()
    events = EventAccumulator(str(out), size_guidance={"images": 0}).Reload()
    images = set(events.Tags()["images"])
    assert {"attention/agents_0", "glimpse_path/reinforce_0", "comparison/val_vs_time"} <= images


def test_compare_measures_the_patch_saving(compared):
    _, report = compared
    runs = report["runs"]
    soft, hard, k2 = runs["soft"]["cost"], runs["reinforce"]["cost"], runs["reinforce_k2"]["cost"]
    assert soft["cells_read"] == 64 * soft["words"]
    assert hard["cells_read"] == hard["words"] and k2["cells_read"] == 2 * k2["words"]
    bounds = report["encoder_flops_bound"]
    assert set(bounds) == {"reinforce", "reinforce_k2"}
    for label, b in bounds.items():
        assert b["share_of_soft"] <= b["bound"], label
        k = runs[label]["cost"]["cells_read"]
        assert b["bound"] == pytest.approx(1.1 * k / 64)


def test_compare_loads_finished_agents_instead_of_training(compared, tmp_path, capsys):
    first, report = compared
    again = comparison(
        tmp_path, *PATCH, "encoder=glimpse", "agents=[soft,reinforce]", "cells_per_step=[]",
        f"load={first}",
    )  # fmt: skip
    assert "loaded from" in capsys.readouterr().err
    assert not (tmp_path / "soft").exists()  # nothing trained
    assert not (tmp_path / "reinforce").exists()  # its auto settings compared as they ran
    for label in ("soft", "reinforce"):
        assert again["runs"][label]["metrics"] == pytest.approx(
            report["runs"][label]["metrics"], nan_ok=True
        )
    # a comparison that itself reused the agents passes them on
    chained = comparison(
        tmp_path / "chained", *PATCH, "encoder=glimpse", "agents=[soft]", "cells_per_step=[]",
        f"load={tmp_path}",
    )  # fmt: skip
    assert chained["runs"]["soft"]["run_dir"] == str(first / "soft")
    # an agent trained with other settings is trained again, not reused
    changed = comparison(
        tmp_path / "changed", *PATCH, "encoder=glimpse", "agents=[soft]", "cells_per_step=[]",
        f"load={first}", "trainer.lr=0.005",
    )  # fmt: skip
    assert "trainer.lr (0.01 -> 0.005)" in capsys.readouterr().err
    assert changed["runs"]["soft"]["run_dir"] == str(tmp_path / "changed" / "soft")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["agents=[soft,nope]"],
            "error: unknown agent 'nope' in agents; choose from: cnn, custom,",
        ),
        (["agent=soft"], "error: the comparison trains several agents: name them with agents="),
        (["cells_per_step=[100]"], "error: reinforce_k100: 100 cells per word is more than the 64"),
        (["cells_per_step=[0]"], "error: cells_per_step must be a list of positive integers"),
        (
            ["sensor=patch", "sensor.patch_size=128"],
            "error: sensor.patch_size=128 is larger than the 64-pixel images",
        ),
        (["load=/no/such/dir"], "error: load='/no/such/dir' is not a directory"),
        (["sensor=eyes"], "error: unknown sensor 'eyes'; choose one of: grid, patch"),
        (
            ["agent.cells_per_step=2"],
            "error: set the hard agent's cells per step with cells_per_step=[1,2,4]",
        ),
        (["agent.glimpse=4"], "error: agent.glimpse=4: no agent of this comparison has the key"),
    ],
)
def test_compare_bad_input_is_one_clear_line(args, message, tmp_path):
    assert_one_line_error(run_module("rl_attn.compare", *args, cwd=tmp_path), message)
    assert not any(tmp_path.glob("outputs/compare/*/*/soft"))  # failed before any training


def test_plot_stacks_the_labels_of_agents_at_the_same_point_in_their_order(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    offsets = {}
    original = Axes.annotate

    def record(self, text, xy, *args, **kwargs):
        offsets[text] = kwargs["xytext"]
        return original(self, text, xy, *args, **kwargs)

    monkeypatch.setattr(Axes, "annotate", record)
    run = lambda flops, bleu: {"cost": {"flops_total": flops}, "metrics": {"BLEU-4": bleu}}  # noqa: E731
    results = {"soft": run(52.76e6, 0.91), "reinforce": run(52.51e6, 0.841)}
    results["reinforce_k4"] = run(52.51e6, 0.842)  # on top of reinforce, a little higher
    plot(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    assert offsets["soft"] == offsets["reinforce_k4"] == (5, 4)
    # one line down, not printed over reinforce_k4, and below it as its point is
    assert offsets["reinforce"] == (5, -6)


def fake_comparison(folder: Path, errors: dict[str, float], curve_end: float) -> Path:
    """A comparison.json of classification runs with straight-line validation curves."""
    folder.mkdir()
    runs = {
        agent: {
            "metrics": {"accuracy": 1 - e, "error": e},
            "run_dir": str(folder / agent),
            "updates": 100,
            "train_time_s": curve_end,
            "val_curve": [
                {"step": 50.0, "train_time_s": curve_end / 2, "error": 2 * e},
                {"step": 100.0, "train_time_s": curve_end, "error": e},
            ],
        }
        for agent, e in errors.items()
    }
    (folder / "comparison.json").write_text(json.dumps({"runs": runs}))
    return folder


def test_seed_summary_gives_mean_and_std_and_plots_the_curves(tmp_path):
    seeds = benchmark_module("compare_seeds")
    dirs = [
        fake_comparison(tmp_path / "s0", {"reinforce": 0.10, "cnn": 0.05}, 100.0),
        fake_comparison(tmp_path / "s1", {"reinforce": 0.20, "cnn": 0.05}, 80.0),
    ]
    reports = seeds.load(dirs)
    rows = seeds.table(reports).splitlines()
    assert rows[2].startswith("| reinforce | 15.0% +- 7.1 | 10.0 / 20.0 |")
    assert rows[3].startswith("| cnn | 5.0% +- 0.0 | 5.0 / 5.0 |")
    grid, mean, low, high = seeds.curves(reports, "reinforce", "error")
    assert grid[0] == pytest.approx(50.0) and grid[-1] == pytest.approx(80.0)  # shared span
    # at 80 s: seed 0's line is at 0.2 - 0.1 * (30 / 50), seed 1 has reached 0.2
    assert low[-1] == pytest.approx(0.14) and high[-1] == pytest.approx(0.2)
    assert mean[-1] == pytest.approx(0.17)
    seeds.plot(reports, tmp_path / "curves.png", "two seeds")
    with Image.open(tmp_path / "curves.png") as picture:
        assert len(np.unique(np.asarray(picture.convert("L")))) > 10
    other = fake_comparison(tmp_path / "s2", {"reinforce": 0.1}, 90.0)
    with pytest.raises(SystemExit, match="compares \\['reinforce'\\]"):
        seeds.load([dirs[0], other])


def test_seed_summary_adds_the_argmax_readout_when_every_seed_has_it(tmp_path):
    seeds = benchmark_module("compare_seeds")
    dirs = [fake_comparison(tmp_path / f"s{i}", {"soft": 0.1, "cnn": 0.05}, 80.0) for i in (0, 1)]
    (dirs[0] / "soft").mkdir()
    (dirs[0] / "soft" / seeds.ARGMAX_FILE).write_text(json.dumps({"metrics": {"error": 0.4}}))
    assert "read by argmax" not in seeds.table(seeds.load(dirs))  # seed 1 lacks it
    (dirs[1] / "soft").mkdir()
    (dirs[1] / "soft" / seeds.ARGMAX_FILE).write_text(json.dumps({"metrics": {"error": 0.6}}))
    rows = seeds.table(seeds.load(dirs)).splitlines()
    assert rows[2].startswith("| soft | 10.0% +- 0.0 |")
    assert rows[3].startswith("| soft, read by argmax | 50.0% +- 14.1 | 40.0 / 60.0 | 100 | 80 |")
    assert rows[4].startswith("| cnn |")


def test_encoder_bound_skips_an_agent_that_reads_every_cell_of_shorter_captions():
    """Reading all 64 cells per word is no saving, whatever the captions' length."""

    def run(cells_read, words, flops):
        return {
            "num_cells": 64,
            "cost": {"cells_read": cells_read, "words": words, "flops_encoder": flops},
        }

    results = {
        "soft": run(640.0, 10.0, 100.0),
        "no_attention": run(624.0, 9.75, 100.0),  # fewer cells per image, every cell per word
        "reinforce": run(10.0, 10.0, 12.0),
    }
    bounds = encoder_bounds(results)
    assert set(bounds) == {"reinforce"}
    assert bounds["reinforce"]["share_of_soft"] == pytest.approx(0.12)
    assert bounds["reinforce"]["bound"] == pytest.approx(1.1 * 10 / 64)
