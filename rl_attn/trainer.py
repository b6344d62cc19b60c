"""The training loop, top to bottom: build the run, fit the agent, evaluate it.

    summary = train(cfg, run_dir)      # what python -m rl_attn.train runs

One step (:meth:`Trainer.step`): the next batch of training rows (torch's ``RandomSampler`` in
``BatchSampler``s of the global batch; each ``torchrun`` process takes every N-th row), the
images and their target tokens, then ``agent.update(images, tokens, optimizer_step)``: the agent
runs its rollout through the glimpse environment and calls the optimiser step as often as its
algorithm needs (:class:`GradientStep`: backward, gradient average over processes, clipping,
the non-finite policy, Adam). Then the learning-rate schedule, logs, periodic validation and
checkpoints. The loop stops after ``trainer.max_steps`` or ``trainer.max_time_s`` seconds of
training, on Ctrl-C (saving a checkpoint that resumes exactly), or on a non-finite step.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import BatchSampler, RandomSampler

from rl_attn import distributed
from rl_attn.agents.base import Agent
from rl_attn.build import build_agent, build_task, check_targets, fit_to_images, settle_agent
from rl_attn.checkpoint import (
    flat_config,
    load_resumable,
    resume_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from rl_attn.classification import class_tokens, class_vocabulary, episode_tokens, is_classification
from rl_attn.config_checks import check_train_config, resolve_device
from rl_attn.errors import UserError
from rl_attn.evaluation import final_evaluation, validate, write_metrics
from rl_attn.monitor import Monitor, log, markdown_table
from rl_attn.vocab import Vocabulary

# With trainer.nonfinite=skip, this many non-finite steps in a row still stop the run.
MAX_CONSECUTIVE_SKIPS = 100
# Under a time budget, the steps after which the trainer checks that a warm-up fits in it.
WARMUP_PROBE_STEPS = 20


class NonFiniteError(UserError):
    """A training step produced a NaN or infinite loss or gradient."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(
    params: list[nn.Parameter] | list[dict], lr: float, weight_decay: float
) -> torch.optim.Adam:
    """Adam over ``params`` (parameters, or parameter groups), with torch's fused kernel (one
    call for every parameter, several times faster than a loop over them on a CPU) where the
    parameters allow it."""
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # e.g. a device or dtype without the fused kernel
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def lr_factor(
    schedule: str, max_steps: int, progress: Callable[[int], float] | None = None
) -> Callable[[int], float]:
    """The learning-rate factor at a step. ``progress(step)`` in [0, 1] is how far the run is
    (by default ``step / max_steps``; a time-budgeted run passes the larger of that and the
    share of its time spent)."""
    if schedule == "constant":
        return lambda step: 1.0
    done = progress or (lambda step: min(step, max_steps) / max_steps)
    # Cosine from 1 to 0.05 over the run: most of the budget at a useful rate, a calm finish.
    return lambda step: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(done(step), 1.0)))


def set_determinism(on: bool) -> None:
    """``trainer.deterministic``: deterministic kernels everywhere (CUDA needs the cuBLAS
    workspace setting, made here before any cuBLAS call); an op without a deterministic
    implementation then raises instead of varying."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on)


class BatchOrder:
    """The rows of each global batch: torch's ``RandomSampler`` (one permutation of the
    ``n`` training rows per epoch, from a generator seeded with ``seed``) cut by a
    ``BatchSampler`` into batches of ``batch_size``, the last incomplete one dropped.

    Its :meth:`state` (the generator at the start of the epoch and the batches taken since)
    resumes the order exactly."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(range(n), generator=self.generator)
        self.batches = BatchSampler(sampler, batch_size, drop_last=True)
        self.epoch_start = self.generator.get_state()
        self.done = 0
        self._iter = iter(self.batches)

    def next(self) -> torch.Tensor:
        """The next batch's row indices ``(batch_size,)``."""
        if self.done == len(self.batches):  # never ask a finished epoch for more: it would
            self.epoch_start = self.generator.get_state()  # draw a permutation it discards
            self.done = 0
            self._iter = iter(self.batches)
        self.done += 1
        return torch.tensor(next(self._iter))

    def state(self) -> dict[str, Any]:
        return {"generator": self.epoch_start, "batches_done": self.done}

    def load_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.epoch_start = state["generator"]
        self._iter = iter(self.batches)
        for _ in range(int(state["batches_done"])):
            next(self._iter)
        self.done = int(state["batches_done"])


@dataclass
class Run:
    """Everything a training run is made of, built once by :func:`build_run`."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    splits: dict[str, Any]
    vocab: Vocabulary
    agent: Agent
    grid_hw: tuple[int, int]
    tokens: torch.Tensor  # (N, T) the training targets of every row
    lengths: torch.Tensor  # (N,) their lengths, <start> and <end> included
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    order: BatchOrder
    clock: dict[str, float]  # trained_s: training seconds so far (validation excluded)
    saved: dict[str, Any] | None = None  # the checkpoint resumed from
    resumed_from: Path | None = None
    started: float = field(default_factory=time.perf_counter)


def build_run(cfg: DictConfig, run_dir: Path) -> Run:
    """Check the config, seed, load the data, build the agent and its optimiser, and restore
    them from ``trainer.resume``'s checkpoint when there is one."""
    check_train_config(cfg)
    check_targets(cfg)
    tc = cfg.trainer
    rank, world = distributed.rank(), distributed.world_size()
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
    # CPU: flush denormal floats to zero. Weights that only ever see black pixels decay toward
    # zero under weight decay, and an update with denormals ran 7x slower (benchmarks/RESULTS.md).
    torch.set_flush_denormal(True)
    set_determinism(bool(tc.deterministic))
    seed_everything(tc.seed + rank)  # ranks draw different glimpses and dropout masks
    resumed_from = resume_checkpoint(tc.resume, run_dir)

    started = time.perf_counter()
    splits = build_task(cfg)
    train_data = splits["train"]
    settle_agent(cfg, is_classification(train_data))  # before the resumed config is compared
    saved = load_resumable(resumed_from, cfg, world) if resumed_from else None
    if tc.batch_size > len(train_data):
        raise UserError(
            f"trainer.batch_size={tc.batch_size} is more than the {len(train_data)} training "
            "examples"
        )
    vocab, tokens, lengths = _targets(train_data, saved)
    agent = build_agent(cfg, len(vocab)).to(device)
    if getattr(agent, "classifies_only", False) and not is_classification(train_data):
        raise UserError(
            f"agent {cfg.agent._target_} classifies only; use it with a classification task "
            "such as task=digits"
        )
    if getattr(agent, "captions_only", False) and is_classification(train_data):
        branch = getattr(agent, "branch", "?")
        raise UserError(
            f"agent.branch={branch} scores each glimpse by its own word, but a classification "
            "episode scores only its class; use agent.branch=episode"
        )
    if cfg.encoder.get("weights_path", "") is None and distributed.is_main():
        log.warning(
            f"encoder {cfg.encoder.get('name', '')} starts from random weights "
            "(encoder.weights_path=null); give encoder.weights_path=FILE for pretrained ones"
        )
    grid_hw, too_many = fit_to_images(agent, train_data.images.shape[-1])
    if too_many:
        raise UserError(
            f"agent.cells_per_step={too_many} is more than the {grid_hw[0] * grid_hw[1]} cells "
            f"({grid_hw[0]}x{grid_hw[1]}) of the grid"
        )
    warmup = int(getattr(agent, "soft_warmup_steps", 0))
    if warmup > tc.max_steps:
        raise UserError(
            f"agent.soft_warmup_steps={warmup} outlasts the run (trainer.max_steps="
            f"{tc.max_steps}): the agent would never sample its glimpses; shorten the warm-up"
        )
    optimizer = make_optimizer(agent.param_groups(tc.lr), tc.lr, tc.weight_decay)
    clock = {"trained_s": 0.0}
    max_time = tc.get("max_time_s")
    progress = None
    if max_time is not None:
        progress = lambda step: max(step / tc.max_steps, clock["trained_s"] / max_time)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(tc.lr_schedule, tc.max_steps, progress)
    )
    order = BatchOrder(len(train_data), tc.batch_size, tc.seed)
    run = Run(cfg, run_dir, device, splits, vocab, agent, grid_hw, tokens, lengths, optimizer,
              scheduler, order, clock, saved, resumed_from, started)  # fmt: skip
    if saved is not None:
        _restore(run, saved, rank)
    distributed.broadcast_module(agent)  # every process starts from rank 0's weights
    return run


def _targets(
    data: Any, saved: dict[str, Any] | None
) -> tuple[Vocabulary, torch.Tensor, torch.Tensor]:
    """The vocabulary (a resumed run's own), and every training row's target tokens and
    lengths: a caption, or K silent glimpses and the class (:mod:`rl_attn.classification`)."""
    classify = is_classification(data)
    if saved:
        vocab = Vocabulary(saved["vocab"])
    elif classify:
        vocab = class_vocabulary(data)
    else:
        vocab = Vocabulary.build(data.captions, min_count=getattr(data, "min_word_count", 1))
    if classify:
        tokens, lengths = episode_tokens(data.labels, data.glimpses, class_tokens(vocab, data))
    else:
        tokens, lengths = vocab.encode_batch(data.captions)
    return vocab, tokens, lengths


def _restore(run: Run, saved: dict[str, Any], rank: int) -> None:
    run.agent.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    state = saved["trainer_state"]
    run.order.load_state(state["order"])
    run.clock["trained_s"] = float(state.get("trained_s", 0.0))
    set_rng_state(state["rng"][rank])


def _non_finite(loss: torch.Tensor, logs: dict[str, float], grad_norm: float) -> str | None:
    """What went non-finite in a step, in words, or None when all is finite."""
    if not bool(torch.isfinite(loss.detach())):
        terms = [(k, v) for k, v in logs.items() if k.startswith("losses/")]
        bad = [(k, v) for k, v in terms if not math.isfinite(v)] or terms[:1]
        return f"loss ({', '.join(f'{k}={v}' for k, v in bad)})"
    if not math.isfinite(grad_norm):
        return f"gradients (global norm {grad_norm}) from a finite loss {float(loss):.4g}"
    return None


class GradientStep:
    """The optimiser step an agent's update calls (:data:`rl_attn.agents.base.OptimizerStep`):
    backward, the gradients averaged over ``torchrun`` processes, clipped to ``grad_clip``,
    then one Adam step. A non-finite loss or gradient skips the step (``nonfinite=skip``,
    returning ``False``) or raises :class:`NonFiniteError` with ``explain(what)``'s message."""

    def __init__(
        self,
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        grad_clip: float | None,
        nonfinite: str,
        explain: Callable[[str], str],
    ):
        self.params, self.optimizer = params, optimizer
        self.max_norm = grad_clip if grad_clip is not None else float("inf")
        self.nonfinite, self.explain = nonfinite, explain
        self.skipped, self.skipped_in_row = 0, 0
        self.grad_norms: list[float] = []  # of this batch's steps that were taken

    def __call__(self, loss: torch.Tensor, logs: dict[str, float]) -> bool:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self.params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_norm))
        bad = _non_finite(loss, logs, grad_norm)
        if distributed.active():  # every rank must take the same decision
            bad = next((b for b in distributed.gather(bad) if b), None)
        if bad is not None:
            if self.nonfinite == "stop" or self.skipped_in_row + 1 >= MAX_CONSECUTIVE_SKIPS:
                raise NonFiniteError(self.explain(bad))
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.skipped_in_row += 1
            return False
        self.skipped_in_row = 0
        self.optimizer.step()
        if not all(bool(torch.isfinite(p).all()) for p in self.params):  # cannot be undone
            raise NonFiniteError(
                self.explain("parameters after the update (finite loss and gradients)")
            )
        self.grad_norms.append(grad_norm)
        return True


def curve_point(step: int, trained_s: float, metrics: dict[str, float]) -> dict[str, float]:
    """One point of the validation curve in ``metrics.json``: the step, the training seconds
    spent by then (validation excluded) and the validation metrics."""
    point = {"step": float(step), "train_time_s": round(trained_s, 2)}
    return point | {k: float(v) for k, v in metrics.items()}


class Trainer:
    """Runs :meth:`step` until the step or time budget is spent; checkpoints, logs, validates.

    Under ``torchrun`` every rank runs it; rank 0 alone writes files.
    """

    def __init__(self, run: Run):
        self.run, self.cfg, self.tc = run, run.cfg, run.cfg.trainer
        self.main = distributed.is_main()
        self.rank, self.world = distributed.rank(), distributed.world_size()
        saved = run.saved
        self.start_step = int(saved["step"]) if saved else 0
        self.samples_seen = int(saved["trainer_state"]["samples_seen"]) if saved else 0
        # every periodic validation: its step, the training seconds spent, its metrics
        self.val_curve: list[dict[str, float]] = (
            list(saved["trainer_state"].get("val_curve", [])) if saved else []
        )
        self.last_saved = self.start_step if saved else None  # newest checkpoint's step
        self.step_index = self.start_step
        self.max_time = self.tc.get("max_time_s")
        params = [p for p in run.agent.parameters() if p.requires_grad]
        self.optimizer_step = GradientStep(
            params, run.optimizer, self.tc.grad_clip, self.tc.nonfinite, self._failure
        )
        self.monitor = self._monitor()
        self.resumed_at_s = run.clock["trained_s"]
        self.stop_requested: list[bool] = []
        self._completed = self.start_step  # the last step finished

    def _monitor(self) -> Monitor:
        run, tc = self.run, self.tc
        if self.main:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in (run.run_dir / "checkpoints").glob(".last.pt.*.tmp"):  # killed saves
                stale.unlink(missing_ok=True)
            (run.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        timed = self.max_time is not None
        monitor = Monitor(
            run.run_dir if self.main else None,
            total=self.max_time if timed else tc.max_steps,
            initial=round(run.clock["trained_s"], 1) if timed else self.start_step,
            in_seconds=timed,
            progress=tc.progress,
            purge_step=self.start_step + 1 if run.saved else None,
        )
        if run.saved is None:
            table = markdown_table(flat_config(self.cfg), ("parameter", "value"))
            monitor.add_text("hyperparameters", table)
            n_params = sum(p.numel() for p in run.agent.parameters())
            monitor.add_text(
                "model", f"{type(run.agent).__name__}: {n_params:,} parameters, grid {run.grid_hw}"
            )
        else:
            monitor.say(f"resuming from {run.resumed_from} at step {self.start_step}")
        return monitor

    def _failure(self, what: str) -> str:
        kept = (
            f"the last checkpoint (step {self.last_saved}, from before the failure) is kept in "
            "checkpoints/last.pt"
            if self.last_saved is not None
            else "no checkpoint had been written yet"
        )
        return (
            f"non-finite {what} at step {self.step_index}; training stopped and {kept}. Lower "
            f"trainer.lr (now {self.tc.lr}) or trainer.grad_clip, or set trainer.nonfinite=skip "
            "to skip steps whose loss or gradients are not finite"
        )

    def checkpoint(self, step: int) -> None:
        """Every rank must call this (their RNG states are gathered); rank 0 writes."""
        rng = distributed.gather(rng_state())
        self.last_saved = step
        if not self.main:
            return
        run = self.run
        save_checkpoint(
            run.run_dir / "checkpoints" / "last.pt",
            {
                "step": step,
                "config": OmegaConf.to_container(self.cfg, resolve=True),
                "vocab": run.vocab.itos,
                "model": run.agent.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "trainer_state": {
                    "order": run.order.state(),
                    "samples_seen": self.samples_seen,
                    "trained_s": run.clock["trained_s"],
                    "val_curve": self.val_curve,
                    "rng": rng,
                },
            },
        )

    def step(self) -> None:
        """One batch through the agent's update, then the learning-rate schedule."""
        run, tc = self.run, self.tc
        idx = run.order.next()
        batch_len = int(run.lengths[idx].max())  # of the global batch: equal on every rank
        idx = idx[self.rank :: self.world]
        data = run.splits["train"]
        # datasets with several captions per image map each caption to its image row
        rows = data.image_of[idx] if hasattr(data, "image_of") else idx
        images = data.images[rows].to(run.device, non_blocking=True)
        tokens = run.tokens[idx, :batch_len].to(run.device, non_blocking=True)
        distributed.broadcast_buffers(run.agent)
        self.optimizer_step.grad_norms.clear()
        try:
            logs = run.agent.update(images, tokens, self.optimizer_step)
        except (RuntimeError, ValueError) as exc:  # e.g. sampling from NaN probabilities
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if not any(w in reason.lower() for w in ("nan", "inf", "finite")):
                raise
            raise NonFiniteError(self._failure(f"values in the forward pass ({reason})")) from None
        run.scheduler.step()
        self.samples_seen += tc.batch_size
        norms = self.optimizer_step.grad_norms
        if norms:  # a batch whose every step was skipped logs nothing but its samples
            logs = {**logs, "charts/grad_norm": sum(norms) / len(norms)}
        self.monitor.record(logs if norms else {}, tc.batch_size)

    def fit(self) -> int:
        """Train until the budget is spent; returns the last completed step. Ctrl-C finishes
        the current step and checkpoints it (a second Ctrl-C stops at once)."""
        previous = None
        if not distributed.active() and threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._request_stop)
        self.run.agent.train()
        completed = self.start_step
        try:
            completed = self._loop()
        except KeyboardInterrupt:
            self._interrupted(completed_ok=self.step_index == self._completed)
            raise SystemExit(130) from None
        except UserError:  # a non-finite step, a warm-up the time budget cannot hold
            self.monitor.close()
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        self.monitor.bar.close()
        if completed > self.start_step:
            self.checkpoint(completed)
        return completed

    def _loop(self) -> int:
        tc, run = self.tc, self.run
        clock = run.clock
        self._completed = self.start_step
        out_of_time = self.max_time is not None and clock["trained_s"] >= self.max_time
        clock_start = time.perf_counter() - clock["trained_s"]  # the clock runs from here
        for step in range(self.start_step + 1, tc.max_steps + 1):
            if out_of_time:
                break
            self.step_index = step
            self.step()
            clock["trained_s"] = time.perf_counter() - clock_start
            if self.max_time is not None and step < tc.max_steps:
                # every rank stops at the same step: the slowest clock decides
                out_of_time = max(distributed.gather(clock["trained_s"])) >= self.max_time
            if step == self.start_step + WARMUP_PROBE_STEPS:
                self._check_warmup_fits(step, clock["trained_s"])
            last = step == tc.max_steps or out_of_time
            self.monitor.advance(clock["trained_s"])
            if step % tc.log_interval == 0 or last:
                self.monitor.flush(step, self._charts())
            if step % tc.eval_interval == 0 and not last and self.main:
                eval_start = time.perf_counter()
                val = validate(run.agent, run.splits["val"], run.vocab, run.grid_hw, self.cfg,
                               run.device, self.monitor, step)  # fmt: skip
                self.val_curve.append(curve_point(step, clock["trained_s"], val))
                clock_start += time.perf_counter() - eval_start  # not training time
                self.monitor.pause()
            if step % tc.checkpoint_interval == 0 and not last:
                self.checkpoint(step)
            self._completed = step
            if self.stop_requested:
                raise KeyboardInterrupt
        if out_of_time:
            self.monitor.say(
                f"the time budget trainer.max_time_s={self.max_time:g} ran out at step "
                f"{self._completed}"
            )
        return self._completed

    def _check_warmup_fits(self, step: int, trained_s: float) -> None:
        """Under a time budget, stop early (one line) when the steps the budget buys at the
        speed measured so far end before the agent's warm-up does."""
        warmup = int(getattr(self.run.agent, "soft_warmup_steps", 0))
        if self.max_time is None or warmup <= step:
            return
        spent = max(trained_s - self.resumed_at_s, 1e-9)
        rate = (step - self.start_step) / spent
        expected = step + rate * max(self.max_time - trained_s, 0.0)
        expected = min(expected, self.tc.max_steps)
        if expected < warmup:
            raise UserError(
                f"agent.soft_warmup_steps={warmup} outlasts the run: trainer.max_time_s="
                f"{self.max_time:g} buys about {expected:.0f} updates at the {rate:.1f} "
                "updates/s measured so far; shorten the warm-up or give more time"
            )

    def _charts(self) -> dict[str, float]:
        run = self.run
        return {
            "charts/learning_rate": run.scheduler.get_last_lr()[0],
            "charts/epoch": self.samples_seen / len(run.splits["train"]),
            "charts/skipped_steps": self.optimizer_step.skipped,
        }

    def _request_stop(self, signum: int, frame: Any) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested.append(True)
        print("\nfinishing this step, then saving (Ctrl-C again to stop now)", file=sys.stderr)

    def _interrupted(self, completed_ok: bool) -> None:
        self.monitor.bar.close()
        run_dir = self.run.run_dir
        if completed_ok and not distributed.active():  # between steps: resumes exactly
            self.checkpoint(self._completed)
            note = f"checkpoint of step {self._completed} saved"
        else:  # inside a step, or ranks that may be anywhere: no consistent state to save
            note = (
                f"the last checkpoint (step {self.last_saved}) is kept"
                if self.last_saved is not None
                else "no checkpoint had been written yet"
            )
        self.monitor.say(
            f"\ninterrupted at step {self.step_index}; {note} in {run_dir / 'checkpoints'}; "
            f"continue with: trainer.resume=auto hydra.run.dir={run_dir}"
        )
        self.monitor.close()


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train, evaluate on the test split, write the run directory; return ``metrics.json``.

    Under ``torchrun`` every rank calls this; rank 0 alone writes files and returns the
    summary, the other ranks return ``{}`` when training ends.
    """
    run = build_run(cfg, run_dir)
    trainer = Trainer(run)
    final_step = trainer.fit()
    if not trainer.main:
        distributed.barrier()  # wait for rank 0's evaluation: the ranks leave together
        return {}
    train_time = run.clock["trained_s"] - trainer.resumed_at_s  # this run's share
    trained_samples = (final_step - trainer.start_step) * cfg.trainer.batch_size
    run.agent.eval()
    results, val, headline = final_evaluation(
        run.agent, run.splits, run.vocab, run.grid_hw, cfg, run.device, trainer.monitor,
        final_step, run_dir,
    )  # fmt: skip
    ec = cfg.eval
    summary = {
        "agent": cfg.agent._target_,
        "steps": final_step,
        "batch_size": cfg.trainer.batch_size,
        "parameters": sum(p.numel() for p in run.agent.parameters()),
        "grid": list(run.grid_hw),
        "train_time_s": round(train_time, 2),
        "total_time_s": round(time.perf_counter() - run.started, 2),
        "train_samples_per_s": round(trained_samples / train_time, 1) if trained_samples else None,
        "device": str(run.device),
        "split": ec.split,
        "decoding": headline,
        ec.split: results,
        "val_greedy": val,
        "val_curve": [*trainer.val_curve, curve_point(final_step, run.clock["trained_s"], val)],
    }
    for name, metrics in results.items():
        log.info(
            "%s (%s): %s", ec.split, name, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        )
    write_metrics(run_dir, trainer.monitor, summary, flat_config(cfg))
    trainer.monitor.close()
    distributed.barrier()
    return summary
