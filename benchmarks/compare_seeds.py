"""Several seeds of one comparison in one table and one plot.

``python benchmarks/compare_seeds.py OUT.png COMPARE_DIR [COMPARE_DIR ...]`` reads each directory's
``comparison.json`` (written by ``python -m rl_attn.compare``, one seed per directory) and prints a
markdown table of every agent's test metric as mean +- std over the directories, with its updates
and training seconds. An agent whose run directories all hold ``eval_test_greedy_argmax.json``
(``python -m rl_attn.evaluate checkpoint=RUN test_mode=argmax beam_size=1``: for soft attention,
the soft-trained map read out by argmax) gets a second row, ``<agent>, read by argmax``, from
those files. ``OUT.png`` shows each agent's validation curve against training time: the
mean over the seeds on a common time grid, and the range of the seeds shaded.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from rl_attn.compare import curve_metric, pyplot, save_curves

ARGMAX_FILE = "eval_test_greedy_argmax.json"


def load(dirs: list[Path]) -> list[dict[str, Any]]:
    """The ``runs`` of each comparison; every directory must hold the same agents."""
    reports = []
    for d in dirs:
        path = d / "comparison.json"
        if not path.is_file():
            sys.exit(f"error: {d} has no comparison.json (run python -m rl_attn.compare first)")
        reports.append(json.loads(path.read_text())["runs"])
    agents = list(reports[0])
    for d, runs in zip(dirs, reports):
        if list(runs) != agents:
            sys.exit(f"error: {d} compares {list(runs)}, the first directory {agents}")
    return reports


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(reports: list[dict[str, Any]]) -> str:
    """One row per agent: the headline metric's mean +- std and each seed's value."""
    metric = curve_metric(next(iter(reports[0].values()))["metrics"])
    scale, unit = (100.0, "%") if metric == "error" else (1.0, "")
    lines = [
        f"| agent | test {metric} (mean +- std) | per seed | updates (mean) | train s (mean) |",
        "|-|-|-|-|-|",
    ]
    for agent in reports[0]:
        rows = [(agent, [r[agent]["metrics"][metric] for r in reports])]
        argmax = argmax_metrics(reports, agent)
        if argmax:
            rows.append((f"{agent}, read by argmax", [m[metric] for m in argmax]))
        updates = statistics.fmean(r[agent]["updates"] for r in reports)
        seconds = statistics.fmean(r[agent]["train_time_s"] for r in reports)
        for label, raw in rows:
            values = [scale * v for v in raw]
            m, s = mean_std(values)
            per_seed = " / ".join(f"{v:.1f}" if unit else f"{v:.3f}" for v in values)
            shown = f"{m:.1f}{unit} +- {s:.1f}" if unit else f"{m:.3f} +- {s:.3f}"
            lines.append(f"| {label} | {shown} | {per_seed} | {updates:.0f} | {seconds:.0f} |")
    return "\n".join(lines)


def argmax_metrics(reports: list[dict[str, Any]], agent: str) -> list[dict[str, float]]:
    """Each seed's test metrics of ``agent`` read out by argmax (``rl_attn.evaluate
    test_mode=argmax``), or ``[]`` unless every seed's run directory holds them."""
    paths = [Path(r[agent].get("run_dir", "")) / ARGMAX_FILE for r in reports]
    if not all(p.is_file() for p in paths):
        return []
    return [json.loads(p.read_text())["metrics"] for p in paths]


def curves(reports: list[dict[str, Any]], agent: str, metric: str) -> tuple[np.ndarray, ...]:
    """The seeds' validation curves of ``agent`` on a common grid of training seconds (where
    every seed has points, so nothing is extrapolated): the grid, their mean, minimum and
    maximum."""
    runs = [r[agent]["val_curve"] for r in reports if r[agent].get("val_curve")]
    if not runs:
        return ()
    start = max(points[0]["train_time_s"] for points in runs)
    end = min(points[-1]["train_time_s"] for points in runs)
    if start > end:
        return ()
    grid = np.linspace(start, end, 60)
    ys = np.stack([
        np.interp(grid, [p["train_time_s"] for p in points], [p[metric] for p in points])
        for points in runs
    ])  # fmt: skip
    return grid, ys.mean(0), ys.min(0), ys.max(0)


def plot(reports: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = pyplot()
    metric = curve_metric(next(iter(reports[0].values()))["metrics"])
    scale = 100.0 if metric == "error" else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for agent in reports[0]:
        found = curves(reports, agent, metric)
        if not found:
            continue
        grid, mean, low, high = found
        (line,) = ax.plot(grid, scale * mean, label=agent)
        ax.fill_between(grid, scale * low, scale * high, color=line.get_color(), alpha=0.15)
    save_curves(fig, ax, metric, title, path)


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: python benchmarks/compare_seeds.py OUT.png COMPARE_DIR [COMPARE_DIR ...]")
    out, dirs = Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]]
    reports = load(dirs)
    print(table(reports))
    plot(reports, out, f"mean of {len(dirs)} seeds (shaded: their range)")
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
