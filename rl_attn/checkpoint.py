"""Checkpoints: written atomically, read back with ``torch.load(weights_only=True)`` only.

A checkpoint is a plain dict of tensors, numbers, strings and lists, so loading it never runs
pickled code: ``{"step", "config" (the resolved config as a dict), "vocab" (list of words),
"model", "optimizer", "scheduler", "trainer_state"}``; ``trainer_state`` holds what resuming
needs besides the weights: the data order and its cursor and generator, the samples seen, and
every process's RNG states (torch, CUDA, numpy, Python) as tensors and plain values.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from rl_attn.errors import UserError

_REQUIRED = ("step", "config", "vocab", "model")


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
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0]
        raise UserError(
            f"{str(path)!r} is refused: it holds objects that a weights-only load does not run "
            f"({reason})"
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
