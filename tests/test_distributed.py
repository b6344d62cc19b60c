"""``torchrun`` with two CPU processes (gloo) against one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_attn.checkpoint import load_checkpoint

# Dropout off and soft attention: nothing random in a step, so the two runs differ only where
# documented (BatchNorm statistics per process, and logged losses averaged over processes).
SAME_WORK = [
    *TINY, "agent=soft", "decoder.dropout=0", "trainer.max_steps=20", "trainer.log_interval=1",
    "trainer.checkpoint_interval=10",
]  # fmt: skip
TOLERANCE = 0.01  # relative, on every step's caption loss


def losses(run_dir: Path) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("losses/caption")}


@pytest.mark.distributed
def test_two_process_torchrun_matches_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "rl_attn.train", *SAME_WORK, f"hydra.run.dir={ddp}"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    subprocess.run(
        [sys.executable, "-m", "rl_attn.train", *SAME_WORK, f"hydra.run.dir={single}"],
        check=True, capture_output=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip

    # Rank 0 alone logged, checkpointed and reported.
    assert proc.stdout.count("run directory:") == 1
    assert {p.name.rsplit(".", 2)[1] for p in ddp.glob("events.out.tfevents.*")} == {
        next(ddp.glob("events.out.tfevents.*")).name.rsplit(".", 2)[1]
    }  # one writer process
    assert [p.name for p in (ddp / "checkpoints").iterdir()] == ["last.pt"]
    assert load_checkpoint(ddp / "checkpoints" / "last.pt")["step"] == 20
    assert len(load_checkpoint(ddp / "checkpoints" / "last.pt")["trainer_state"]["rng"]) == 2
    ddp_loss, single_loss = losses(ddp), losses(single)
    assert sorted(ddp_loss) == list(range(1, 21))  # each step logged once
    for step, value in single_loss.items():
        assert abs(ddp_loss[step] - value) <= TOLERANCE * value, (step, ddp_loss[step], value)
    summary = json.loads((ddp / "metrics.json").read_text())
    assert summary["batch_size"] == 16 and summary["steps"] == 20


@pytest.mark.distributed
def test_a_global_batch_that_does_not_split_evenly_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "rl_attn.train", *TINY, "trainer.batch_size=15", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: trainer.batch_size=15 is the global batch and must divide evenly over the 2 "
        "processes"
    ]
