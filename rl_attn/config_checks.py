"""Checks on a training config before any work starts: one clear line per mistake."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from rl_attn.errors import UserError


def _positive_int(value: object, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise UserError(f"{name} must be {kind}, got {value!r}")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_train_config(cfg: DictConfig) -> None:
    """Raise :class:`UserError` naming the first bad value in ``cfg``."""
    tc = cfg.trainer
    for key in ("max_steps", "batch_size", "log_interval", "eval_interval", "eval_size",
                "checkpoint_interval"):  # fmt: skip
        _positive_int(tc[key], f"trainer.{key}")
    max_time = tc.get("max_time_s")
    if max_time is not None and (not _number(max_time) or not max_time > 0):
        raise UserError(f"trainer.max_time_s must be a number > 0 or null, got {max_time!r}")
    if not _number(tc.lr) or not tc.lr > 0:
        raise UserError(f"trainer.lr must be a positive number, got {tc.lr!r}")
    if tc.lr_schedule not in ("cosine", "constant"):
        raise UserError(f"trainer.lr_schedule must be cosine or constant, got {tc.lr_schedule!r}")
    if tc.grad_clip is not None and (not _number(tc.grad_clip) or not tc.grad_clip > 0):
        raise UserError(f"trainer.grad_clip must be a number > 0 or null, got {tc.grad_clip!r}")
    if not _number(tc.weight_decay) or tc.weight_decay < 0:
        raise UserError(f"trainer.weight_decay must be a number >= 0, got {tc.weight_decay!r}")
    _positive_int(tc.seed, "trainer.seed", minimum=0)
    if tc.threads is not None:
        _positive_int(tc.threads, "trainer.threads")
    if tc.resume is not None and (not isinstance(tc.resume, str) or not tc.resume):
        raise UserError(f"trainer.resume must be null, auto or a path, got {tc.resume!r}")
    if tc.nonfinite not in ("stop", "skip"):
        raise UserError(f"trainer.nonfinite must be stop or skip, got {tc.nonfinite!r}")
    if not isinstance(tc.deterministic, bool):
        raise UserError(f"trainer.deterministic must be true or false, got {tc.deterministic!r}")
    ec = cfg.eval
    for key in ("beam_size", "max_len", "batch_size", "paths"):
        _positive_int(ec[key], f"eval.{key}")
    if ec.split not in ("val", "test"):
        raise UserError(f"eval.split must be val or test, got {ec.split!r}")
    if not isinstance(ec.attention_images, int) or ec.attention_images < 0:
        raise UserError(f"eval.attention_images must be >= 0, got {ec.attention_images!r}")
    resolve_device(tc.device)


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """``auto`` -> cuda when present, else cpu; an unusable device is a :class:`UserError`
    naming ``key``, the setting it came from."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{key} {name!r} is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}={name} but CUDA is not available here; use cpu or auto")
    return device
