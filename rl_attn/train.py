"""Train one agent, evaluate it on the test split, and keep everything in one run directory.

    python -m rl_attn.train agent=reinforce trainer.max_steps=2000
    python -m rl_attn.train -m agent=soft,no_attention        # a Hydra sweep

The run directory (``outputs/<date>/<time>`` unless ``hydra.run.dir=...``) holds the TensorBoard
events, ``config.yaml`` (the resolved config), ``checkpoints/last.pt``, ``metrics.json``,
``test_captions.json`` and ``attention/*.png``.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from rl_attn import distributed
from rl_attn.agents.base import CaptionAgent
from rl_attn.attention_maps import attention_panels, glimpse_path, reads_a_part
from rl_attn.build import build_agent, build_task, check_targets
from rl_attn.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from rl_attn.classification import (
    class_tokens,
    class_vocabulary,
    episode_tokens,
    evaluate_classification,
    is_classification,
)
from rl_attn.cli import check_group_choices, run_cli
from rl_attn.config_checks import check_train_config, resolve_device
from rl_attn.errors import UserError
from rl_attn.evaluation import decode_split, score
from rl_attn.vocab import Vocabulary


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _lr_lambda(schedule: str, max_steps: int, progress: Callable[[int], float] | None = None):
    """The learning-rate factor at a step. ``progress(step)`` in [0, 1] is how far the run is
    (by default ``step / max_steps``; a time-budgeted run passes the larger of that and the
    share of its time spent)."""
    if schedule == "constant":
        return lambda step: 1.0
    done = progress or (lambda step: min(step, max_steps) / max_steps)
    # Cosine from 1 to 0.05 over the run: most of the budget at a useful rate, a calm finish.
    return lambda step: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(done(step), 1.0)))


def _adam(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam, with torch's fused kernel (one call for every parameter, several times faster than
    a loop over them on a CPU) where the parameters allow it."""
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # e.g. a device or dtype without the fused kernel
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _markdown_table(rows: dict[str, Any], header: tuple[str, str]) -> str:
    lines = [f"|{header[0]}|{header[1]}|", "|-|-|"]
    lines += [f"|{k}|{v}|" for k, v in rows.items()]
    return "\n".join(lines)


def _flat(cfg: DictConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def evaluate_split(
    agent: CaptionAgent,
    data: Any,
    vocab: Vocabulary,
    grid_hw: tuple[int, int],
    beam_size: int,
    max_len: int,
    batch_size: int,
    device: torch.device,
    limit: int | None = None,
    with_meteor: bool = False,
) -> tuple[dict[str, float], list[str], list[np.ndarray]]:
    """Decode (the first ``limit`` images of) a split and score it (a classification task:
    run its episodes and count correct classes)."""
    if is_classification(data):
        return evaluate_classification(agent, data, vocab, batch_size, device, limit)
    n = len(data) if limit is None else min(limit, len(data))
    captions, maps = decode_split(
        agent, data.images[:n], vocab, beam_size, max_len, batch_size, device
    )
    boxes = getattr(data, "boxes", None)
    metrics = score(
        captions,
        maps,
        data.references[:n],
        boxes[:n] if boxes is not None else None,
        grid_hw,
        data.images.shape[-1],
        with_meteor,
    )
    return metrics, captions, maps


class _LossModule(nn.Module):
    """The agent's ``loss`` as ``forward``, which is the call DistributedDataParallel wraps."""

    def __init__(self, agent: CaptionAgent):
        super().__init__()
        self.agent = agent

    def forward(self, images, tokens, lengths):  # noqa: ANN001, ANN201
        return self.agent.loss(images, tokens, lengths)


class NonFiniteError(UserError):
    """A training step produced a NaN or infinite loss or gradient."""


# With trainer.nonfinite=skip, this many non-finite steps in a row still stop the run.
MAX_CONSECUTIVE_SKIPS = 100

# Settings a resumed run may change: they do not alter what is trained or how.
_RESUMABLE_CHANGES = {
    "trainer.resume", "trainer.progress", "trainer.device", "trainer.threads",
    "trainer.log_interval", "trainer.eval_interval", "trainer.eval_size",
    "trainer.checkpoint_interval", "trainer.nonfinite",
}  # fmt: skip


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _set_determinism(on: bool) -> None:
    """``trainer.deterministic``: deterministic kernels everywhere (CUDA needs the cuBLAS
    workspace setting, made here before any cuBLAS call); an op without a deterministic
    implementation then raises instead of varying."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on)


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


def config_changes(saved: dict[str, Any], cfg: DictConfig, with_eval: bool = False) -> str:
    """The keys (with both values) in which ``cfg`` trains differently from the ``saved``
    config, as one phrase; empty when none. ``with_eval`` counts ``eval.*`` keys too."""
    ours = _flat(cfg)
    theirs = _flat(OmegaConf.create(saved))
    changed = [
        k
        for k in sorted(set(ours) | set(theirs))
        if k not in _RESUMABLE_CHANGES
        and (with_eval or not k.startswith("eval."))
        and ours.get(k, "<unset>") != theirs.get(k, "<unset>")
    ]
    shown = ", ".join(
        f"{k} ({theirs.get(k, '<unset>')} -> {ours.get(k, '<unset>')})" for k in changed[:4]
    )
    return shown + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")


def _check_resumable(saved: dict[str, Any], cfg: DictConfig, path: Path) -> None:
    """Refuse to continue a checkpoint under a config that trains differently."""
    changed = config_changes(saved, cfg)
    if changed:
        raise UserError(
            f"cannot resume from {str(path)!r}: the config differs in {changed}; "
            "set them back, or start a new run directory"
        )


def fit_to_images(agent: CaptionAgent, image_size: int) -> tuple[tuple[int, int], int]:
    """The cell grid ``(h, w)`` of ``agent`` on square images of ``image_size`` pixels, and
    its glimpses per step when they exceed the ``h * w`` cells (else 0). The sensor raises a
    :class:`UserError` itself when it cannot work on such images."""
    agent.sensor.check_image_size(agent.encoder, image_size)
    h, w = agent.grid_shape(image_size)
    glimpses = getattr(agent, "glimpses", 1)
    return (h, w), glimpses if glimpses > h * w else 0


def _non_finite(loss: torch.Tensor, logs: dict[str, float], grad_norm: float) -> str | None:
    """What went non-finite in a step, in words, or None when all is finite."""
    if not bool(torch.isfinite(loss.detach())):
        terms = [(k, v) for k, v in logs.items() if k.startswith("losses/")]
        bad = [(k, v) for k, v in terms if not math.isfinite(v)] or terms[:1]
        return f"loss ({', '.join(f'{k}={v}' for k, v in bad)})"
    if not math.isfinite(grad_norm):
        return f"gradients (global norm {grad_norm}) from a finite loss {float(loss):.4g}"
    return None


def _non_finite_message(what: str, step: int, tc: DictConfig, last_saved: int | None) -> str:
    kept = (
        f"the last checkpoint (step {last_saved}, from before the failure) is kept in "
        "checkpoints/last.pt"
        if last_saved is not None
        else "no checkpoint had been written yet"
    )
    return (
        f"non-finite {what} at step {step}; training stopped and {kept}. Lower trainer.lr "
        f"(now {tc.lr}) or trainer.grad_clip, or set trainer.nonfinite=skip to skip steps "
        "whose loss or gradients are not finite"
    )


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train, evaluate on the test split, write the run directory; return ``metrics.json``.

    Under ``torchrun`` every rank calls this; rank 0 alone writes files and returns the
    summary, the other ranks return ``{}`` when training ends.
    """
    check_train_config(cfg)
    check_targets(cfg)
    tc = cfg.trainer
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    device = resolve_device(tc.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", distributed.local_rank())
    if tc.batch_size % world:
        raise UserError(
            f"trainer.batch_size={tc.batch_size} is the global batch and must divide evenly "
            f"over the {world} processes"
        )
    if tc.threads:
        torch.set_num_threads(int(tc.threads))
    _set_determinism(bool(tc.deterministic))
    seed_everything(tc.seed + rank)  # ranks draw different glimpses and dropout masks

    resume_from = resume_checkpoint(tc.resume, run_dir)
    saved: dict[str, Any] | None = None
    if resume_from is not None:
        saved = load_checkpoint(resume_from)
        _check_resumable(saved["config"], cfg, resume_from)
        if "trainer_state" not in saved:
            raise UserError(
                f"cannot resume from {str(resume_from)!r}: it holds weights only, without the "
                "optimizer and data-order state that resuming needs"
            )

    started = time.perf_counter()
    splits = build_task(cfg)
    train_data, val_data, test_data = splits["train"], splits["val"], splits["test"]
    classify = is_classification(train_data)
    if saved:
        vocab = Vocabulary(saved["vocab"])
    elif classify:
        vocab = class_vocabulary(train_data)
    else:
        min_count = getattr(train_data, "min_word_count", 1)
        vocab = Vocabulary.build(train_data.captions, min_count=min_count)
    agent = build_agent(cfg, len(vocab)).to(device)
    if getattr(agent, "classifies_only", False) and not classify:
        raise UserError(
            f"agent {cfg.agent._target_} classifies only; use it with a classification task "
            "such as task=digits"
        )
    grid_hw, too_many = fit_to_images(agent, train_data.images.shape[-1])
    if too_many:
        raise UserError(
            f"agent.glimpses={too_many} is more than the {grid_hw[0] * grid_hw[1]} cells "
            f"({grid_hw[0]}x{grid_hw[1]}) of the grid"
        )
    if classify:  # K silent glimpses, then the class: see rl_attn.classification
        classes = class_tokens(vocab, train_data)
        tokens, lengths = episode_tokens(train_data.labels, train_data.glimpses, classes)
    else:
        tokens, lengths = vocab.encode_batch(train_data.captions)

    params = [p for p in agent.parameters() if p.requires_grad]
    optimizer = _adam(params, tc.lr, tc.weight_decay)
    # Training time so far (periodic validation excluded): what trainer.max_time_s budgets.
    clock = {"trained_s": 0.0}
    max_time = tc.get("max_time_s")
    progress = None
    if max_time is not None:
        progress = lambda step: max(step / tc.max_steps, clock["trained_s"] / max_time)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(tc.lr_schedule, tc.max_steps, progress)
    )
    generator = torch.Generator().manual_seed(tc.seed)
    order = torch.randperm(len(train_data), generator=generator)
    cursor, start_step, samples_seen = 0, 0, 0
    if saved is not None:
        agent.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        ts = saved["trainer_state"]
        order, cursor = ts["order"], int(ts["cursor"])
        generator.set_state(ts["generator"])
        start_step, samples_seen = int(saved["step"]), int(ts["samples_seen"])
        clock["trained_s"] = float(ts.get("trained_s", 0.0))
        rng = ts["rng"]
        if len(rng) != world:
            raise UserError(
                f"cannot resume from {str(resume_from)!r}: it was written by {len(rng)} "
                f"process(es) and this run has {world}"
            )
        _set_rng_state(rng[rank])
    model: nn.Module = _LossModule(agent)
    if world > 1:
        model = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # The same parameters are used at every step (no_attention never uses the attention
            # MLP, and that never changes), which lets DDP skip its search for unused ones.
            static_graph=True,
        )

    writer: SummaryWriter | None = None
    n_params = sum(p.numel() for p in agent.parameters())
    hparams = _flat(cfg)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (run_dir / "checkpoints").glob(".last.pt.*.tmp"):  # from a killed save
            stale.unlink(missing_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        # On resume, events logged after the checkpoint's step are dropped: they are redone.
        writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_step + 1 if saved else None)
        if saved is None:
            writer.add_text("hyperparameters", _markdown_table(hparams, ("parameter", "value")))
            writer.add_text(
                "model", f"{type(agent).__name__}: {n_params:,} parameters, grid {grid_hw}"
            )
        else:
            print(f"resuming from {resume_from} at step {start_step}", file=sys.stderr)

    last_saved = [start_step if saved else None]  # step of the newest checkpoint on disk

    def checkpoint(step: int) -> None:
        """Every rank must call this (their RNG states are gathered); rank 0 writes."""
        rng = distributed.gather(_rng_state())
        last_saved[0] = step
        if not main:
            return
        save_checkpoint(
            run_dir / "checkpoints" / "last.pt",
            {
                "step": step,
                "config": OmegaConf.to_container(cfg, resolve=True),
                "vocab": vocab.itos,
                "model": agent.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "trainer_state": {
                    "order": order,
                    "cursor": cursor,
                    "generator": generator.get_state(),
                    "samples_seen": samples_seen,
                    "trained_s": clock["trained_s"],
                    "rng": rng,
                },
            },
        )

    sums: dict[str, float] = defaultdict(float)
    count, skipped, skipped_in_row = 0, 0, 0
    window_samples, window_start = 0, time.perf_counter()
    agent.train()
    budget_note = f" (time budget {max_time:g} s)" if max_time is not None else ""
    bar = tqdm(
        total=tc.max_steps if max_time is None else max_time,
        initial=start_step if max_time is None else round(clock["trained_s"], 1),
        unit="it" if max_time is None else "s",
        desc="train" + budget_note,
        disable=not (tc.progress and main),
        dynamic_ncols=True,
    )
    out_of_time = max_time is not None and clock["trained_s"] >= max_time  # resumed, spent
    resumed_at_s = clock["trained_s"]
    clock_start = time.perf_counter() - resumed_at_s  # the clock runs from here
    # Ctrl-C finishes the current step, so the checkpoint it writes resumes exactly; a second
    # Ctrl-C stops at once. (Under torchrun the ranks cannot agree on a step: no such handler.)
    stop_requested: list[bool] = []

    def request_stop(signum: int, frame: Any) -> None:
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested.append(True)
        print("\nfinishing this step, then saving (Ctrl-C again to stop now)", file=sys.stderr)

    previous_handler = None
    if not distributed.active() and threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGINT, request_stop)
    step, completed = start_step, start_step
    try:
        for step in range(start_step + 1, tc.max_steps + 1):
            if out_of_time:
                break
            if cursor + tc.batch_size > len(order):
                order = torch.randperm(len(train_data), generator=generator)
                cursor = 0
            idx = order[cursor : cursor + tc.batch_size]
            cursor += tc.batch_size
            batch_len = int(lengths[idx].max())  # of the global batch: equal on every rank
            idx = idx[rank::world]
            # datasets with several captions per image map each caption to its image row
            rows = train_data.image_of[idx] if hasattr(train_data, "image_of") else idx
            images = train_data.images[rows].to(device, non_blocking=True)
            batch_tokens = tokens[idx, :batch_len].to(device, non_blocking=True)

            try:
                loss, logs = model(images, batch_tokens, lengths[idx].to(device))
            except (RuntimeError, ValueError) as exc:  # e.g. sampling from NaN probabilities
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if not any(w in reason.lower() for w in ("nan", "inf", "finite")):
                    raise
                what = f"values in the forward pass ({reason})"
                raise NonFiniteError(_non_finite_message(what, step, tc, last_saved[0])) from None
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = tc.grad_clip if tc.grad_clip is not None else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            bad = _non_finite(loss, logs, grad_norm)
            if distributed.active():  # every rank must take the same decision
                flags = distributed.gather(bad)
                bad = next((b for b in flags if b), None)
            if bad is not None:
                if tc.nonfinite == "stop" or skipped_in_row + 1 >= MAX_CONSECUTIVE_SKIPS:
                    raise NonFiniteError(_non_finite_message(bad, step, tc, last_saved[0]))
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                skipped_in_row += 1
                scheduler.step()
            else:
                skipped_in_row = 0
                optimizer.step()
                scheduler.step()
                if not all(bool(torch.isfinite(p).all()) for p in params):  # cannot be undone
                    what = "parameters after the update (finite loss and gradients)"
                    raise NonFiniteError(_non_finite_message(what, step, tc, last_saved[0]))
            samples_seen += tc.batch_size
            if bad is None:
                for k, v in logs.items():
                    sums[k] += v
                sums["charts/grad_norm"] += grad_norm
                count += 1

            window_samples += tc.batch_size
            clock["trained_s"] = time.perf_counter() - clock_start
            if max_time is not None and step < tc.max_steps:
                # every rank stops at the same step: the slowest clock decides
                out_of_time = max(distributed.gather(clock["trained_s"])) >= max_time
            last = step == tc.max_steps or out_of_time
            if max_time is None:
                bar.update(1)
            else:  # the bar counts seconds of the budget
                bar.update(int(min(clock["trained_s"], max_time)) - bar.n)
            if step % tc.log_interval == 0 or last:
                means = distributed.mean_logs({k: v / max(count, 1) for k, v in sums.items()})
                now = time.perf_counter()
                rate = window_samples / max(now - window_start, 1e-9)
                if writer is not None:
                    for k, v in means.items():
                        writer.add_scalar(k, v, step)
                    writer.add_scalar("charts/learning_rate", scheduler.get_last_lr()[0], step)
                    writer.add_scalar("charts/samples_per_sec", rate, step)
                    writer.add_scalar("charts/epoch", samples_seen / len(train_data), step)
                    writer.add_scalar("charts/skipped_steps", skipped, step)
                if "losses/total" in means:
                    bar.set_postfix(loss=f"{means['losses/total']:.3f}", sps=f"{rate:.0f}")
                sums.clear()
                count, window_samples, window_start = 0, 0, now
            if step % tc.eval_interval == 0 and not last and main:
                eval_start = time.perf_counter()
                val_metrics, _, _ = evaluate_split(
                    agent, val_data, vocab, grid_hw, 1, cfg.eval.max_len,
                    cfg.eval.batch_size, device, limit=tc.eval_size,
                )  # fmt: skip
                assert writer is not None
                for k, v in val_metrics.items():
                    writer.add_scalar(f"eval/val_{k}", v, step)
                now = time.perf_counter()  # evaluation time is not training time
                clock_start += now - eval_start
                window_start = now
            if step % tc.checkpoint_interval == 0 and not last:
                checkpoint(step)
            completed = step
            if stop_requested:
                raise KeyboardInterrupt
            if out_of_time:
                break
    except KeyboardInterrupt:
        bar.close()
        if completed == step and not distributed.active():  # between steps: resumes exactly
            checkpoint(completed)
            saved_note = f"checkpoint of step {completed} saved"
        else:  # inside a step, or ranks that may be anywhere: no consistent state to save
            saved_note = (
                f"the last checkpoint (step {last_saved[0]}) is kept"
                if last_saved[0] is not None
                else "no checkpoint had been written yet"
            )
        if writer is not None:
            writer.close()
        if main:
            print(
                f"\ninterrupted at step {step}; {saved_note} in {run_dir / 'checkpoints'}; "
                f"continue with: trainer.resume=auto hydra.run.dir={run_dir}",
                file=sys.stderr,
            )
        raise SystemExit(130) from None
    except NonFiniteError:
        bar.close()
        if writer is not None:
            writer.close()
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    bar.close()
    train_time = clock["trained_s"] - resumed_at_s  # this process's share
    final_step = completed  # max_steps, or the step at which the time budget ran out
    trained_samples = (final_step - start_step) * tc.batch_size
    if out_of_time and main:
        print(
            f"the time budget trainer.max_time_s={max_time:g} ran out at step {final_step}",
            file=sys.stderr,
        )
    if start_step < final_step:
        checkpoint(final_step)
    if not main:
        distributed.barrier()  # wait for rank 0's evaluation: the ranks leave together
        return {}
    assert writer is not None
    agent.eval()

    ec = cfg.eval
    eval_data = {"test": test_data, "val": val_data}[ec.split]
    results: dict[str, dict[str, float]] = {}
    decode_modes = {"greedy": 1}
    if ec.beam_size > 1 and not classify:
        decode_modes[f"beam{ec.beam_size}"] = ec.beam_size
    for name, beam in decode_modes.items():
        metrics, captions, maps = evaluate_split(
            agent, eval_data, vocab, grid_hw, beam, ec.max_len, ec.batch_size, device,
            with_meteor=ec.meteor,
        )  # fmt: skip
        results[name] = metrics
        for k, v in metrics.items():
            writer.add_scalar(f"eval/{ec.split}_{name}_{k}", v, final_step)
        if name == list(decode_modes)[-1]:  # the headline decoding: its captions and pictures
            _write_samples(run_dir, writer, eval_data, captions, maps, grid_hw, ec, final_step)
    val_final, _, _ = evaluate_split(
        agent, val_data, vocab, grid_hw, 1, ec.max_len, ec.batch_size, device, tc.eval_size
    )
    for k, v in val_final.items():
        writer.add_scalar(f"eval/val_{k}", v, final_step)

    headline = results[list(decode_modes)[-1]]
    summary = {
        "agent": cfg.agent._target_,
        "steps": final_step,
        "batch_size": tc.batch_size,
        "parameters": n_params,
        "grid": list(grid_hw),
        "train_time_s": round(train_time, 2),
        "total_time_s": round(time.perf_counter() - started, 2),
        "train_samples_per_s": round(trained_samples / train_time, 1) if trained_samples else None,
        "device": str(device),
        "split": ec.split,
        "decoding": list(decode_modes)[-1],
        ec.split: results,
        "val_greedy": val_final,
    }
    writer.add_hparams(
        {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()},
        {f"hparam/{k}": v for k, v in headline.items() if not math.isnan(v)},
        run_name=".",
    )
    writer.close()
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    distributed.barrier()
    return summary


def step_labels(caption: str, maps: np.ndarray) -> list[str]:
    """A label per attention map: the words of a caption, or for a classification episode
    (one predicted class after K glimpses) the glimpse numbers and then the class."""
    words = caption.split()
    if len(words) == len(maps):
        return words
    return [f"glimpse {t + 1}" for t in range(len(maps) - 1)] + [f"-> {caption}"]


def _write_samples(
    run_dir: Path,
    writer: SummaryWriter,
    data: Any,
    captions: list[str],
    maps: list[np.ndarray],
    grid_hw: tuple[int, int],
    ec: DictConfig,
    step: int,
) -> None:
    rows = [
        {"index": i, "generated": c, "references": data.references[i]}
        for i, c in enumerate(captions)
    ]
    (run_dir / f"{ec.split}_captions.json").write_text(json.dumps(rows, indent=1))
    table = ["|image|generated|reference|", "|-|-|-|"]
    table += [f"|{r['index']}|{r['generated']}|{r['references'][0]}|" for r in rows[:8]]
    writer.add_text("samples/captions", "\n".join(table), step)
    out = run_dir / "attention"
    out.mkdir(exist_ok=True)
    for i in range(min(ec.attention_images, len(captions))):
        image = data.images[i].permute(1, 2, 0).numpy()
        words = step_labels(captions[i], maps[i])
        picture = attention_panels(image, words, maps[i], grid_hw)
        writer.add_image(f"attention/{ec.split}_{i}", picture, step, dataformats="HWC")
        Image.fromarray(picture).save(out / f"{ec.split}_{i}.png")
        if reads_a_part(maps[i]):  # a hard agent: draw its path too
            path = glimpse_path(image, maps[i], grid_hw, words)
            writer.add_image(f"glimpse_path/{ec.split}_{i}", path, step, dataformats="HWC")
            Image.fromarray(path).save(out / f"path_{ec.split}_{i}.png")


@hydra.main(config_path="pkg://rl_attn.configs", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = run_cli(train, cfg, run_dir)
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
