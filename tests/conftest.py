import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

# Small enough to train in seconds on 2 cores, big enough that the loss visibly drops.
TINY = [
    "task.train_size=256",
    "task.val_size=16",
    "task.test_size=16",
    "task.max_objects=2",
    "trainer.max_steps=30",
    "trainer.batch_size=16",
    "trainer.log_interval=5",
    "trainer.eval_interval=20",
    "trainer.eval_size=16",
    "trainer.checkpoint_interval=20",
    "trainer.progress=false",
    "encoder.channels=[8,16,16]",
    "encoder.strides=[2,2,2]",
    "decoder.hidden_dim=32",
    "decoder.attn_dim=16",
    "decoder.embed_dim=16",
    "eval.beam_size=2",
    "eval.attention_images=2",
    "eval.meteor=false",
    "trainer.lr=0.01",
]


ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m module args...`` in ``cwd`` with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    """The command failed on a user mistake: exit status 2 and one stderr line ``message...``."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(message)


def compose_config(*overrides: str):
    with initialize_config_module(config_module="rl_attn.configs", version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *overrides])


@pytest.fixture
def tiny_config():
    return compose_config


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny soft-attention run shared by the tests that only read its outputs."""
    from rl_attn.train import train

    run_dir = tmp_path_factory.mktemp("run")
    train(compose_config("agent=soft"), run_dir)
    return run_dir


class RunsCode:
    """Unpickling this runs ``touch pwned`` in the current directory: a hostile checkpoint."""

    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))
