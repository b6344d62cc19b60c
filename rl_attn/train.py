"""The command line of training: ``python -m rl_attn.train [key=value ...]`` (Hydra).

    python -m rl_attn.train agent=reinforce trainer.max_time_s=600
    python -m rl_attn.train agent=soft trainer.max_time_s=null trainer.max_steps=2000
    python -m rl_attn.train -m agent=soft,no_attention        # a Hydra sweep

The run directory (``outputs/<date>/<time>`` unless ``hydra.run.dir=...``) holds the TensorBoard
events, ``config.yaml`` (the resolved config), ``train.log``, ``checkpoints/last.pt``,
``metrics.json``, ``test_captions.json`` and ``attention/*.png``. The loop itself is
:mod:`rl_attn.trainer`.
"""

from __future__ import annotations

import shutil
import sys
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rl_attn import distributed
from rl_attn.cli import check_group_choices, run_cli
from rl_attn.trainer import train


def _remove_if_unused(run_dir: Path) -> None:
    """Take back the run directory Hydra made for a run that stopped on a config error before
    writing anything (only Hydra's own ``.hydra/`` and an empty ``train.log`` in it)."""
    if not run_dir.is_dir():
        return
    if any(p.name not in (".hydra", "train.log") for p in run_dir.iterdir()):
        return
    log = run_dir / "train.log"
    if log.exists() and log.stat().st_size > 0:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    parent, cwd = run_dir.parent, Path.cwd().resolve()
    while parent.resolve() != cwd and cwd in parent.resolve().parents and parent.is_dir():
        if any(parent.iterdir()):
            break
        parent.rmdir()  # e.g. the empty outputs/<date> folder
        parent = parent.parent


@hydra.main(config_path="pkg://rl_attn.configs", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run_cli(train, cfg, run_dir)
    except SystemExit as exc:
        if exc.code == 2 and distributed.is_main():  # a user error: keep no empty run
            _remove_if_unused(run_dir)
        raise
    if not summary:  # a torchrun rank other than 0
        return
    split, decoding = summary["split"], summary["decoding"]
    m = summary[split][decoding]
    line = ", ".join(f"{k} {v:.3f}" for k, v in m.items())
    print(f"{split} ({decoding}): {line}")
    print(f"run directory: {run_dir}")


def _distributed_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides that give every torchrun rank rank 0's output directory, and keep the
    other ranks from writing Hydra's own files into it."""
    stamp = distributed.broadcast(datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        extra.append(f"hydra.run.dir=outputs/{stamp}")
    if not any(a.startswith("hydra.sweep.dir=") for a in argv):
        extra.append(f"hydra.sweep.dir=multirun/{stamp}")
    if not distributed.is_main():
        extra += ["hydra.output_subdir=null", "hydra/job_logging=none"]
    return extra


def main() -> None:
    """Console entry point: check group names first, so a typo gets one line, then run Hydra
    (after joining the process group when torchrun started this process)."""
    check_group_choices(sys.argv[1:])
    if distributed.init_from_env():
        sys.argv += _distributed_overrides(sys.argv[1:])
    try:
        _hydra_main()
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
