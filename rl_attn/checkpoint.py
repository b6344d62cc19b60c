"""Checkpoints: written atomically, read back with ``torch.load(weights_only=True)`` only.

A checkpoint is a plain dict of tensors, numbers, strings and lists, so loading it never runs
pickled code: ``{"step", "config" (the resolved config as a dict), "vocab" (list of words),
"model", "optimizer", "scheduler", "trainer_state"}``; ``trainer_state`` holds what resuming
needs besides the weights: the data order (see :class:`rl_attn.trainer.BatchOrder`), the samples
seen, the training time spent, and every process's RNG states (torch, CUDA, numpy, Python) as
tensors and plain values (:func:`rng_state`).

This module also decides whether a run may continue a checkpoint (:func:`resume_checkpoint`,
:func:`check_resumable`): only under a config that trains the same way.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rl_attn.errors import UserError

_REQUIRED = ("step", "config", "vocab", "model")

# Settings a resumed run may change: they do not alter what is trained or how.
RESUMABLE_CHANGES = {
    "trainer.resume", "trainer.progress", "trainer.device", "trainer.threads",
    "trainer.log_interval", "trainer.eval_interval", "trainer.eval_size",
    "trainer.checkpoint_interval", "trainer.nonfinite",
}  # fmt: skip


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` through a temporary file and a rename, so a reader (or a
    crash) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file or a run directory -> the file: a run directory's is
    ``checkpoints/last.pt``; anything else is returned as given (it may not exist)."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "checkpoints").is_dir():
        return path / "checkpoints" / "last.pt"
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; any other file is refused with a
    :class:`UserError` saying why."""
    path = checkpoint_path(path)
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} is not a file")
    if not zipfile.is_zipfile(path):  # every file torch.save writes is a zip archive
        raise UserError(f"{str(path)!r} is not an rl_attn checkpoint: not a file torch.save wrote")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message goes on to advise a full (code-running) load: never repeat it
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise UserError(
            f"{str(path)!r} is refused: it holds objects{what} that a weights-only load does "
            "not run, so it was not written by rl_attn"
        ) from None
    except Exception as exc:  # torch.load fails in many ways on a file that is not a checkpoint
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{str(path)!r} is not an rl_attn checkpoint: {reason}") from None
    if not isinstance(payload, dict) or any(k not in payload for k in _REQUIRED):
        raise UserError(
            f"{str(path)!r} is not an rl_attn checkpoint: expected a dict with keys "
            f"{', '.join(_REQUIRED)}"
        )
    return payload


def rng_state() -> dict[str, Any]:
    """This process's random states as tensors and plain values (a weights-only load reads them)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint ``trainer.resume`` names: ``auto`` -> this run directory's
    ``checkpoints/last.pt`` when it exists (else a fresh start); a path -> that checkpoint file
    or run directory, which must exist; ``null`` -> none."""
    if resume is None:
        return None
    if resume == "auto":
        last = checkpoint_path(run_dir)
        return last if last.is_file() else None
    path = checkpoint_path(str(resume))
    if not path.is_file():
        raise UserError(f"trainer.resume: no checkpoint at {str(path)!r}")
    return path


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` resolved, as ``{"dotted.key": value}``."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def config_changes(saved: dict[str, Any], cfg: DictConfig, with_eval: bool = False) -> str:
    """The keys (with both values) in which ``cfg`` trains differently from the ``saved``
    config, as one phrase; empty when none. ``with_eval`` counts ``eval.*`` keys too."""
    ours = flat_config(cfg)
    theirs = flat_config(OmegaConf.create(saved))
    changed = [
        k
        for k in sorted(set(ours) | set(theirs))
        if k not in RESUMABLE_CHANGES
        and (with_eval or not k.startswith("eval."))
        and ours.get(k, "<unset>") != theirs.get(k, "<unset>")
    ]
    shown = ", ".join(
        f"{k} ({theirs.get(k, '<unset>')} -> {ours.get(k, '<unset>')})" for k in changed[:4]
    )
    return shown + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")


def load_resumable(path: Path, cfg: DictConfig, world: int) -> dict[str, Any]:
    """The checkpoint at ``path``, refused (one line) when ``cfg`` trains differently, when it
    holds weights only, or when ``world`` processes cannot continue it."""
    saved = load_checkpoint(path)
    changed = config_changes(saved["config"], cfg)
    if changed:
        raise UserError(
            f"cannot resume from {str(path)!r}: the config differs in {changed}; "
            "set them back, or start a new run directory"
        )
    state = saved.get("trainer_state")
    if state is None:
        raise UserError(
            f"cannot resume from {str(path)!r}: it holds weights only, without the "
            "optimizer and data-order state that resuming needs"
        )
    if not isinstance(state.get("order"), dict):
        raise UserError(
            f"cannot resume from {str(path)!r}: an older rl_attn wrote its data order; its "
            "weights still evaluate (python -m rl_attn.evaluate), but training starts anew"
        )
    if len(state["rng"]) != world:
        raise UserError(
            f"cannot resume from {str(path)!r}: it was written by {len(state['rng'])} "
            f"process(es) and this run has {world}"
        )
    return saved
