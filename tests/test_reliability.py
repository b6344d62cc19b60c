"""Runs survive being killed, diverging and being handed bad input; same seed, same numbers."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, RunsCode
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_attn.checkpoint import load_checkpoint, save_checkpoint
from rl_attn.errors import UserError
from rl_attn.trainer import train

ROOT = Path(__file__).resolve().parents[1]
# Long enough that a kill lands after the first checkpoint and well before the end.
RESUMABLE = [*TINY, "trainer.max_steps=80", "trainer.checkpoint_interval=10"]


def train_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rl_attn.train",
        *RESUMABLE,
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]


def same(a: object, b: object) -> bool:
    """Equal, NaN included (a metric without any word to score is NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def final_metrics(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "metrics.json").read_text())
    return {"test": summary["test"], "val": summary["val_greedy"], "steps": summary["steps"]}


def val_curve(run_dir: Path) -> list[dict]:
    """The run's validation curve without its clock readings (which differ run to run)."""
    points = json.loads((run_dir / "metrics.json").read_text())["val_curve"]
    return [{k: v for k, v in p.items() if k != "train_time_s"} for p in points]


def checkpoint_step(path: Path) -> int | None:
    try:
        return int(load_checkpoint(path)["step"])
    except UserError:
        return None


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_metrics(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(train_cmd(whole), check=True, capture_output=True, cwd=tmp_path, env=env)

    proc = subprocess.Popen(
        train_cmd(killed), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # a few more steps: the kill lands between checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step = checkpoint_step(last)  # never half-written: it loads
    assert step is not None and 10 <= step < 80, step
    assert not (killed / "metrics.json").exists()

    resumed = subprocess.run(
        train_cmd(killed, "trainer.resume=auto"), capture_output=True, text=True, cwd=tmp_path,
        env=env,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {last} at step {step}" in resumed.stderr
    assert same(final_metrics(killed), final_metrics(whole))
    # the validations before the kill come back from the checkpoint
    assert [p["step"] for p in val_curve(whole)] == [20, 40, 60, 80]
    assert same(val_curve(killed), val_curve(whole))
    assert not list((killed / "checkpoints").glob("*.tmp"))


def test_ctrl_c_saves_the_last_finished_step_and_the_run_continues(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(run_dir), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with: trainer.resume=auto hydra.run.dir=" in err
    step = checkpoint_step(last)
    assert step is not None and 10 <= step < 80, step
    resumed = subprocess.run(
        train_cmd(run_dir, "trainer.resume=auto"), capture_output=True, text=True, cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 80


def test_a_save_that_dies_half_way_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"step": 1, "config": {}, "vocab": [], "model": {}})

    def dies(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "config": {}, "vocab": [], "model": {}})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_same_seed_and_config_give_identical_metrics(tiny_config, tmp_path):
    a = train(tiny_config("agent=reinforce", "agent.soft_warmup_steps=10"), tmp_path / "a")
    b = train(tiny_config("agent=reinforce", "agent.soft_warmup_steps=10"), tmp_path / "b")
    assert same([a["test"], a["val_greedy"]], [b["test"], b["val_greedy"]])
    c = train(tiny_config("agent=reinforce", "trainer.seed=1"), tmp_path / "c")
    assert not same(c["test"], a["test"])


def test_absurd_learning_rate_stops_with_the_non_finite_message(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        train_cmd(run_dir, "trainer.lr=1e30", "trainer.checkpoint_interval=1"),
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: non-finite ")
    assert "training stopped and the last checkpoint (step " in lines[0]
    assert "trainer.nonfinite=skip" in lines[0]
    payload = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert payload["step"] >= 1
    weights = {k: t for k, t in payload["model"].items() if k != "average_return"}  # NaN = unseen
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    assert not (run_dir / "metrics.json").exists()


def test_skip_mode_skips_non_finite_steps_and_counts_them(tiny_config, tmp_path, monkeypatch):
    from rl_attn.agents.soft import SoftAttentionAgent

    real_loss = SoftAttentionAgent.loss
    calls = {"n": 0}

    def sometimes_nan(self, images, tokens):
        loss, logs = real_loss(self, images, tokens)
        calls["n"] += 1
        if self.training and calls["n"] % 3 == 0:
            loss = loss * float("nan")
            logs["losses/total"] = float("nan")
        return loss, logs

    monkeypatch.setattr(SoftAttentionAgent, "loss", sometimes_nan)
    run_dir = tmp_path / "run"
    summary = train(tiny_config("agent=soft", "trainer.nonfinite=skip"), run_dir)
    assert summary["steps"] == 30
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert acc.Scalars("charts/skipped_steps")[-1].value == 10
    assert all(math.isfinite(e.value) for e in acc.Scalars("losses/total"))
    payload = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert all(torch.isfinite(t).all() for t in payload["model"].values() if t.is_floating_point())

    monkeypatch.setattr(SoftAttentionAgent, "loss", sometimes_nan)
    with pytest.raises(UserError, match=r"non-finite loss \(losses/total=nan\) at step 3; "):
        train(tiny_config("agent=soft"), tmp_path / "stop")


def test_resume_refuses_a_changed_config_and_a_missing_checkpoint(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    first = train(tiny_config("agent=soft", "trainer.max_steps=5"), run_dir)
    with pytest.raises(UserError, match=r"differs in trainer.lr \(0.01 -> 0.02\)"):
        train(tiny_config("agent=soft", "trainer.max_steps=5", "trainer.lr=0.02",
                          "trainer.resume=auto"), run_dir)  # fmt: skip
    with pytest.raises(UserError, match="trainer.resume: no checkpoint at"):
        train(tiny_config("agent=soft", f"trainer.resume={tmp_path / 'nowhere'}"), run_dir)
    # A finished run resumed with auto only evaluates again, with the same result.
    again = train(tiny_config("agent=soft", "trainer.max_steps=5", "trainer.resume=auto"), run_dir)
    assert same(again["test"], first["test"])


def test_resuming_from_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"step": 1, "config": {}, "vocab": [], "model": RunsCode()}, bad)
    proc = subprocess.run(
        train_cmd(tmp_path / "run", f"trainer.resume={bad}"),
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "is refused" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists()


def test_resume_needs_the_number_of_processes_that_wrote_the_checkpoint(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config("agent=soft", "trainer.max_steps=5"), run_dir)
    path = run_dir / "checkpoints" / "last.pt"
    payload = load_checkpoint(path)
    payload["step"] = 3
    payload["trainer_state"]["rng"] *= 2  # as if two processes had written it
    save_checkpoint(path, payload)
    with pytest.raises(UserError, match=r"written by 2 process\(es\) and this run has 1"):
        train(tiny_config("agent=soft", "trainer.max_steps=5", "trainer.resume=auto"), run_dir)
