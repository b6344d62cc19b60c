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
