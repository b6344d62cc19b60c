"""What a run shows while it trains: TensorBoard scalars and text, the progress bar, log lines.

Rank 0 alone writes (under ``torchrun`` the other ranks get a :class:`Monitor` that only takes
part in the averaging of the logged values). Log lines go to the ``rl_attn`` logger, which the
Hydra entry point sends to the run's ``train.log``; messages the user must see at the terminal
also go to stderr (:meth:`Monitor.say`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from rl_attn import distributed

log = logging.getLogger("rl_attn")


def markdown_table(rows: dict[str, Any], header: tuple[str, str]) -> str:
    lines = [f"|{header[0]}|{header[1]}|", "|-|-|"]
    lines += [f"|{k}|{v}|" for k, v in rows.items()]
    return "\n".join(lines)


class Monitor:
    """The TensorBoard writer, the progress bar and the running means of the step logs.

    Args:
        run_dir: where the events go (``None`` on ranks other than 0: nothing is written).
        total: the bar's length: steps, or seconds of a time budget (``in_seconds``).
        initial: where a resumed run's bar starts.
        progress: show the bar.
        purge_step: on resume, events logged after the checkpoint's step are dropped.
    """

    def __init__(
        self,
        run_dir: Path | None,
        total: float,
        initial: float,
        in_seconds: bool,
        progress: bool,
        purge_step: int | None = None,
    ):
        self.writer = (
            SummaryWriter(log_dir=str(run_dir), purge_step=purge_step) if run_dir else None
        )
        self.in_seconds = in_seconds
        self.bar = tqdm(
            total=total,
            initial=initial,
            unit="s" if in_seconds else "it",
            desc="train" + (f" (time budget {total:g} s)" if in_seconds else ""),
            disable=not (progress and run_dir is not None),
            dynamic_ncols=True,
        )
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0
        self.window_samples, self.window_start = 0, time.perf_counter()

    def say(self, message: str) -> None:
        """A line for the user at the terminal (stderr) and in ``train.log``."""
        if self.writer is None:
            return
        self.bar.clear()
        print(message, file=sys.stderr)
        log.info(message)

    def add_text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def add_scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}{k}", v, step)

    def record(self, logs: dict[str, float], samples: int) -> None:
        """One step's logs (``logs`` empty for a skipped step: only its samples count)."""
        for k, v in logs.items():
            self.sums[k] += v
        self.count += 1 if logs else 0
        self.window_samples += samples

    def advance(self, trained_s: float) -> None:
        """Move the bar: one step, or to the seconds of the budget spent."""
        if self.in_seconds:
            self.bar.update(int(min(trained_s, self.bar.total)) - self.bar.n)
        else:
            self.bar.update(1)

    def flush(self, step: int, extra: dict[str, float]) -> None:
        """Write the means of the recorded logs (over steps and ranks), the samples per
        second since the last flush and ``extra`` charts; then start a new window."""
        means = distributed.mean_logs({k: v / max(self.count, 1) for k, v in self.sums.items()})
        now = time.perf_counter()
        rate = self.window_samples / max(now - self.window_start, 1e-9)
        self.add_scalars({**means, **extra, "charts/samples_per_sec": rate}, step)
        if "losses/total" in means:
            self.bar.set_postfix(loss=f"{means['losses/total']:.3f}", sps=f"{rate:.0f}")
        if self.writer is not None:
            shown = {k: v for k, v in means.items() if k in _LOG_LINE}
            log.info(
                "step %d: %s, %.0f samples/s",
                step,
                ", ".join(f"{_LOG_LINE[k]} {v:.4g}" for k, v in shown.items()),
                rate,
            )
        self.sums.clear()
        self.count, self.window_samples = 0, 0
        self.window_start = now

    def pause(self) -> None:
        """Evaluation time is not training time: restart the samples-per-second window."""
        self.window_start = time.perf_counter()

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


# The logged values a train.log line shows, and their names there.
_LOG_LINE = {
    "losses/total": "loss",
    "losses/caption": "caption loss",
    "losses/policy": "policy loss",
    "charts/reward": "reward",
    "charts/policy_entropy": "policy entropy",
}
