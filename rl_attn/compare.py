"""Compare agents on accuracy and compute, on the same task, encoder, sensor, decoder and budget.

    python -m rl_attn.compare                                    # soft, reinforce, no_attention
    python -m rl_attn.compare agents=[soft,reinforce] cells_per_step=[1,4] trainer.max_steps=300
    python -m rl_attn.compare sensor=patch encoder=glimpse       # glimpses encoded on demand
    python -m rl_attn.compare load=outputs/compare/DATE/TIME     # reuse agents trained there

Every agent is trained with :func:`rl_attn.trainer.train` from one config (``configs/compare.yaml``
over the training config) in which only the ``agent`` node differs, into ``<dir>/<label>/``.
Then each trained agent is loaded and measured (:func:`rl_attn.cost.measure_cost`). The run
directory gets ``comparison.md`` (also printed), ``comparison.json``, ``accuracy_vs_flops.png``,
``attention/*.png`` (the same test images under every agent, and each hard agent's glimpse
path) and TensorBoard images of those pictures.

Command-line ``agent.KEY=VALUE`` overrides go to every agent whose config has ``KEY``;
``overrides.<agent>='["KEY=VALUE",...]'`` gives training overrides to one agent only.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from rl_attn.attention_maps import attention_panels, glimpse_path, reads_a_part, stack_pictures
from rl_attn.build import build_agent, build_task, fit_to_images, settle_agent
from rl_attn.checkpoint import config_changes
from rl_attn.classification import class_tokens, evaluate_classification, is_classification
from rl_attn.cli import GROUPS, check_group_choices, fail, group_options, run_cli, search_dirs
from rl_attn.config_checks import resolve_device
from rl_attn.cost import measure_cost
from rl_attn.errors import UserError
from rl_attn.evaluate import load_trained
from rl_attn.evaluation import decode_split, step_labels
from rl_attn.trainer import train

COMPARE_KEYS = ("agents", "cells_per_step", "load", "overrides", "cost", "pictures")
SWEEP_AGENT = "reinforce"  # the hard agent whose cells per step K are swept


def plan(cfg: DictConfig) -> list[tuple[str, str, list[str]]]:
    """The runs: ``(label, agent config name, agent overrides)`` in training order."""
    agents = cfg.agents
    if not isinstance(agents, ListConfig) or not agents:
        raise UserError(f"agents must be a non-empty list like [soft,reinforce], got {agents!r}")
    known = group_options("agent", _config_dirs())
    for name in agents:
        if name not in known:
            raise UserError(f"unknown agent {name!r} in agents; choose from: {', '.join(known)}")
    if len(set(agents)) != len(agents):
        raise UserError(f"agents lists an agent twice: {list(agents)}")
    sweep = cfg.cells_per_step if cfg.cells_per_step is not None else []
    if not isinstance(sweep, ListConfig) or not all(
        isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in sweep
    ):
        raise UserError(f"cells_per_step must be a list of positive integers, got {sweep!r}")
    runs = [(str(name), str(name), []) for name in agents]
    if SWEEP_AGENT not in agents:
        return runs  # the K sweep varies the reinforce agent, and only when it is compared
    for k in sorted(set(sweep)):
        if k == 1:
            continue  # the main reinforce run reads one cell per word
        runs.append((f"{SWEEP_AGENT}_k{k}", SWEEP_AGENT, [f"agent.cells_per_step={k}"]))
    return runs


def _config_dirs() -> list[Path]:
    """Config folders the user added on the command line (for their own agents)."""
    return search_dirs(sys.argv[1:])


# The command line's agent.KEY=VALUE overrides: taken out of sys.argv before Hydra parses it
# (the comparison's own config has no single agent they could apply to).
AGENT_OVERRIDES: list[str] = []


def _is_agent_override(arg: str) -> bool:
    return arg.lstrip("+~").startswith("agent.")


def _override_key(arg: str) -> str:
    """``agent.KEY.sub=VALUE`` -> ``KEY``."""
    return arg.lstrip("+~").removeprefix("agent.").split("=")[0].split(".")[0]


def check_agent_overrides(runs: list[tuple[str, str, list[str]]]) -> None:
    """Every command-line ``agent.KEY=VALUE`` must reach at least one agent;
    ``agent.cells_per_step`` would change the main reinforce run behind the K sweep's back."""
    keys = set().union(*(agent_keys(name) for name in {name for _, name, _ in runs}))
    for o in AGENT_OVERRIDES:
        key = _override_key(o)
        if key == "cells_per_step":
            raise UserError(
                "set the hard agent's cells per step with cells_per_step=[1,2,4], "
                "not agent.cells_per_step"
            )
        if key not in keys and not o.startswith("+"):
            raise UserError(f"{o}: no agent of this comparison has the key {key!r}")


def agent_keys(name: str) -> set[str]:
    """The keys of ``configs/agent/<name>.yaml`` (what ``agent.KEY=...`` may set for it)."""
    return set(compose(config_name="config", overrides=[f"agent={name}"]).agent.keys())


def agent_config(cfg: DictConfig, name: str, extra: list[str]) -> DictConfig:
    """The training config of one run: ``cfg`` without the comparison's own keys, with the
    ``agent`` node of ``configs/agent/<name>.yaml`` and the overrides meant for it."""
    per_agent = list((cfg.overrides or {}).get(name, []) or [])
    keys = agent_keys(name)
    # an override goes to the agents that have its key; "+agent.KEY=..." (a new key) to all
    mine = [o for o in AGENT_OVERRIDES if o.startswith("+") or _override_key(o) in keys]
    try:
        node = compose(config_name="config", overrides=[f"agent={name}", *per_agent, *mine, *extra])
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(f"cannot build the {name} agent's config: {exc}") from None
    run_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k not in COMPARE_KEYS])
    OmegaConf.set_struct(run_cfg, False)
    run_cfg.agent = node.agent
    for o in per_agent:  # a group choice for this agent alone (e.g. encoder=glimpse)
        group = o.split("=", 1)[0]
        if group in GROUPS and group != "agent":
            run_cfg[group] = node[group]
    extra_trainer = [
        o for o in per_agent if not o.startswith("agent.") and o.split("=", 1)[0] not in GROUPS
    ]
    if extra_trainer:  # per-agent non-agent overrides (e.g. trainer.lr)
        run_cfg = OmegaConf.merge(run_cfg, OmegaConf.from_dotlist(extra_trainer))
    OmegaConf.set_struct(run_cfg, True)
    return run_cfg


def check_up_front(runs_cfgs: list[tuple[str, DictConfig]]) -> None:
    """Catch what would fail minutes in (a K larger than the grid, a patch larger than the
    image) before the first agent trains."""
    for label, run_cfg in runs_cfgs:
        image_size = run_cfg.task.get("image_size")
        agent = build_agent(run_cfg, vocab_size=8)  # a config it cannot build fails here
        if image_size is None:
            continue
        (h, w), too_many = fit_to_images(agent, int(image_size))
        if too_many:
            raise UserError(
                f"{label}: {too_many} cells per word is more than the {h * w} cells "
                f"({h}x{w}) of the grid; lower the values in cells_per_step=[...]"
            )


def _finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()


def reusable(load_dir: Path, label: str, run_cfg: DictConfig) -> Path | None:
    """The finished run of ``label`` in an earlier comparison (followed through that
    comparison's own ``load``), if it was trained and evaluated with the same settings
    (``run_cfg`` settled, as the run's config records them); ``None`` (with a note on
    stderr) otherwise."""
    run_dir = load_dir / label
    report = load_dir / "comparison.json"
    if not _finished(run_dir) and report.is_file():  # that comparison reused it from elsewhere
        earlier = json.loads(report.read_text()).get("runs", {}).get(label, {}).get("run_dir")
        run_dir = Path(earlier) if earlier else run_dir
    if not _finished(run_dir):
        return None
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return None
    changes = config_changes(OmegaConf.to_container(OmegaConf.load(saved)), run_cfg, True)
    if changes:
        print(f"{label}: not reusing {run_dir}: it was run with {changes}", file=sys.stderr)
        return None
    return run_dir


def train_all(
    run_cfgs: list[tuple[str, DictConfig]], load_dir: Path | None, out_dir: Path
) -> tuple[dict[str, dict[str, Any]], dict[str, Path]]:
    """Train every agent in order (or reuse its finished run from ``load_dir``); return the
    ``metrics.json`` summaries and the run directories, by label."""
    summaries: dict[str, dict[str, Any]] = {}
    run_dirs: dict[str, Path] = {}
    for i, (label, run_cfg) in enumerate(run_cfgs, 1):
        previous = reusable(load_dir, label, run_cfg) if load_dir is not None else None
        if previous is not None:
            print(f"[{i}/{len(run_cfgs)}] {label}: loaded from {previous}", file=sys.stderr)
            run_dirs[label] = previous
            summaries[label] = json.loads((previous / "metrics.json").read_text())
            continue
        print(f"[{i}/{len(run_cfgs)}] training {label}", file=sys.stderr)
        run_dirs[label] = out_dir / label
        try:
            summaries[label] = train(run_cfg, run_dirs[label])
        except SystemExit as exc:
            if exc.code == 130:  # Ctrl-C: the trainer saved what it could
                print(
                    f"comparison interrupted; finished agents are kept: rerun with "
                    f"load={out_dir} to reuse them",
                    file=sys.stderr,
                )
            raise
    return summaries, run_dirs


def run_comparison(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Train (or load), measure, and write everything; return ``comparison.json``'s content."""
    runs = plan(cfg)
    check_agent_overrides(runs)
    load_dir = Path(cfg.load).expanduser() if cfg.load else None
    if load_dir is not None and not load_dir.is_dir():
        raise UserError(f"load={str(load_dir)!r} is not a directory of an earlier comparison")
    run_cfgs = [(label, agent_config(cfg, name, extra)) for label, name, extra in runs]
    check_up_front(run_cfgs)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.trainer.device)

    test = build_task(cfg)[cfg.eval.split]
    for _, run_cfg in run_cfgs:  # auto settings as the trainer settles them for this task
        settle_agent(run_cfg, is_classification(test))
    summaries, run_dirs = train_all(run_cfgs, load_dir, out_dir)

    n_cost = min(int(cfg.cost.images), len(test))
    images = test.images[:n_cost].to(device)
    results: dict[str, dict[str, Any]] = {}
    agents: dict[str, Any] = {}
    for label, run_dir in run_dirs.items():
        print(f"measuring {label}", file=sys.stderr)
        agent, _, vocab, _ = load_trained(run_dir, device)
        agents[label] = (agent, vocab)
        cost = measure_cost(
            agent,
            images,
            max_len=cfg.eval.max_len,
            large_batch=n_cost,
            single_images=int(cfg.cost.single_images),
            repeats=int(cfg.cost.repeats),
            episode=(test.glimpses, class_tokens(vocab, test)) if is_classification(test) else None,
        )
        s = summaries[label]
        results[label] = {
            "agent": s["agent"],
            "metrics": s[s["split"]][s["decoding"]],
            "decoding": s["decoding"],
            "cost": cost,
            "num_cells": int(np.prod(s["grid"])),
            "train_time_s": s["train_time_s"],
            "train_samples_per_s": s["train_samples_per_s"],
            "updates": s["steps"],
            "val_curve": s.get("val_curve", []),  # runs written before the curve have none
            "run_dir": str(run_dir),
        }
    report = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "runs": results,
        "encoder_flops_bound": encoder_bounds(results),
    }
    sensor = str(OmegaConf.select(cfg, "sensor._target_", default="GridSensor"))
    table = markdown_table(results, report["encoder_flops_bound"], sensor.endswith("GridSensor"))
    (out_dir / "comparison.md").write_text(table)
    (out_dir / "comparison.json").write_text(json.dumps(report, indent=2))
    plot(results, out_dir / "accuracy_vs_flops.png")
    figures = ["accuracy_vs_flops"]
    if plot_curves(results, out_dir / "val_vs_time.png"):
        figures.append("val_vs_time")
    writer = SummaryWriter(log_dir=str(out_dir))
    try:
        writer.add_text("comparison", table)
        pictures(agents, test, int(cfg.pictures), cfg.eval.max_len, device, out_dir, writer)
        for name in figures:
            writer.add_image(
                f"comparison/{name}",
                np.asarray(Image.open(out_dir / f"{name}.png").convert("RGB")),
                dataformats="HWC",
            )
    finally:
        writer.close()
    print(table)
    print(f"comparison directory: {out_dir}")
    return report


def accuracy_key(metrics: dict[str, float]) -> str:
    """The headline accuracy metric: BLEU-4 for captions, else accuracy."""
    return "BLEU-4" if "BLEU-4" in metrics else "accuracy"


def encoder_bounds(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """For each agent that reads fewer cells per word than the grid has: its encoder FLOPs as
    a share of soft's, and the bound ``1.1 * K / L`` (``K`` its cells read per image, ``L`` the
    cells of a grid). Per word, not per image: an agent that reads every cell but writes
    shorter captions than soft's reads fewer per image and saves nothing."""
    soft = results.get("soft")
    if soft is None or not soft["cost"]["flops_encoder"]:
        return {}
    out = {}
    for label, r in results.items():
        cost, k, n = r["cost"], r["cost"]["cells_read"], r["num_cells"]
        if label == "soft" or k >= n * cost["words"]:
            continue
        if n != soft["num_cells"]:  # not glimpses of the same grid (e.g. agent=cnn)
            continue
        out[label] = {
            "share_of_soft": cost["flops_encoder"] / soft["cost"]["flops_encoder"],
            "bound": 1.1 * k / n,
            "glimpses_per_image": k,
            "cells": n,
        }
    return out


def _mflops(x: float) -> str:
    return f"{x / 1e6:.2f}"


def markdown_table(
    results: dict[str, dict[str, Any]],
    bounds: dict[str, dict[str, float]] | None = None,
    grid_sensor: bool = False,
) -> str:
    """The comparison as a markdown table, plus the encoder-FLOPs lines when there are any."""
    first = next(iter(results.values()))["metrics"]
    acc = accuracy_key(first)
    extra = [k for k in ("CIDEr", "attention_correctness") if k in first]
    head = [
        "agent",
        acc,
        *extra,
        "cells read / image",
        "encoder MFLOPs",
        "attention MFLOPs",
        "decoder MFLOPs",
        "total MFLOPs",
        "latency b1 (ms)",
        "latency batch (ms / image)",
        "peak memory (MB)",
        "parameters",
        "train samples/s",
        "train time (s)",
        "updates",
    ]
    head = [h.replace("_", " ") for h in head]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results.items():
        m, c = r["metrics"], r["cost"]
        cells = [
            label,
            f"{m[acc]:.3f}",
            *(f"{m[k]:.3f}" for k in extra),
            f"{c['cells_read']:.1f}",
            _mflops(c["flops_encoder"]),
            _mflops(c["flops_attention"]),
            _mflops(c["flops_decoder"]),
            _mflops(c["flops_total"]),
            f"{c['latency_b1_ms']:.2f}",
            f"{c['latency_batch_ms']:.3f}",
            f"{c['peak_memory_mb']:.1f}",
            f"{int(c['parameters']):,}",
            f"{r['train_samples_per_s']:.0f}" if r["train_samples_per_s"] else "-",
            f"{r['train_time_s']:.0f}",
            str(r.get("updates", "-")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    decoding = next(iter(results.values()))["decoding"]
    notes = [
        "",
        f"Accuracy on the test split ({decoding} decoding); costs per test image of greedy "
        "decoding.",
    ]
    if grid_sensor:
        notes.append(
            "sensor=grid encodes the whole image for every agent, so hard attention saves no "
            "encoder FLOPs; sensor=patch encodes only the regions read."
        )
        bounds = {}
    for label, b in (bounds or {}).items():
        ok = "within" if b["share_of_soft"] <= b["bound"] else "ABOVE"
        notes.append(
            f"- {label}: encoder FLOPs {b['share_of_soft']:.3f} of soft's, {ok} the bound "
            f"1.1 K/L = {b['bound']:.3f} (K = {b['glimpses_per_image']:.1f} glimpses per "
            f"image, L = {b['cells']})"
        )
    return "\n".join(lines + notes) + "\n"


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, its log lines quiet."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    return plt


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Accuracy against total FLOPs per image; the K sweep of the hard agent as a line."""
    plt = pyplot()
    first = next(iter(results.values()))["metrics"]
    acc = accuracy_key(first)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    points = {k: (r["cost"]["flops_total"] / 1e6, r["metrics"][acc]) for k, r in results.items()}
    xs = [x for x, _ in points.values()]
    log_x = max(xs) > 3 * min(xs)  # a log axis only when the costs span a wide range
    where = {k: (math.log10(x) if log_x else x, y) for k, (x, y) in points.items()}
    x_span = (max(p[0] for p in where.values()) - min(p[0] for p in where.values())) or 1.0
    y_span = (max(p[1] for p in where.values()) - min(p[1] for p in where.values())) or 1.0
    sweep, labelled = [], []
    for label, (x, y) in points.items():
        ax.scatter([x], [y], s=40, zorder=3)
        if label == SWEEP_AGENT or label.startswith(f"{SWEEP_AGENT}_k"):
            k = 1 if label == SWEEP_AGENT else int(label.rsplit("_k", 1)[1])
            sweep.append((k, x, y))
    # agents at (almost) the same point get their labels stacked, not printed on each other:
    # the highest first, so the stack reads in the points' own order from top to bottom
    for label, (x, y) in sorted(points.items(), key=lambda item: -item[1][1]):
        px, py = where[label]
        near = sum(
            abs(px - qx) < 0.06 * x_span and abs(py - qy) < 0.04 * y_span for qx, qy in labelled
        )
        labelled.append((px, py))
        ax.annotate(
            label, (x, y), textcoords="offset points", xytext=(5, 4 - 10 * near), fontsize=8
        )
    if len(sweep) > 1:
        sweep.sort()
        ax.plot([s[1] for s in sweep], [s[2] for s in sweep], "--", color="gray", zorder=2)
        ax.plot([], [], "--", color="gray", label=f"{SWEEP_AGENT}, K = cells per word")
        ax.legend(fontsize=8, loc="best")
    if log_x:
        ax.set_xscale("log")
        ax.set_xlabel("inference MFLOPs per image (log scale)")
    else:
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        ax.set_xlabel("inference MFLOPs per image")
    ax.set_ylabel(f"test {acc}")
    ax.set_title("accuracy against compute")
    ax.grid(True, alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def curve_metric(metrics: dict[str, float]) -> str:
    """What the validation curves show: the error for classification, else the headline."""
    return "error" if "error" in metrics else accuracy_key(metrics)


def plot_curves(results: dict[str, dict[str, Any]], path: Path) -> bool:
    """Each agent's validation metric against its training seconds (validation excluded), as
    one line per agent; ``False`` (and no file) when no run has a curve."""
    curves = {k: r["val_curve"] for k, r in results.items() if r.get("val_curve")}
    if not curves:
        return False
    plt = pyplot()
    metric = curve_metric(next(iter(curves.values()))[0])
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for label, points in curves.items():
        xs = [p["train_time_s"] for p in points]
        ys = [100 * p[metric] if metric == "error" else p[metric] for p in points]
        ax.plot(xs, ys, marker=".", label=label)
    save_curves(fig, ax, metric, f"validation {metric} against training time", path)
    return True


def save_curves(fig: Any, ax: Any, metric: str, title: str, path: Path) -> None:
    """Label the axes of a validation-against-time plot (the error in %), write it to
    ``path`` and close it."""
    ax.set_xlabel("training time (s, validation excluded)")
    ax.set_ylabel(f"validation {metric}" + (" (%)" if metric == "error" else ""))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)


def pictures(
    agents: dict[str, Any],
    data: Any,
    count: int,
    max_len: int,
    device: torch.device,
    out_dir: Path,
    writer: SummaryWriter,
) -> None:
    """The first ``count`` test images under every agent (per-word maps, one row per agent),
    and the glimpse path of every agent that reads fewer cells than the grid has."""
    count = min(count, len(data))
    if count == 0:
        return
    folder = out_dir / "attention"
    folder.mkdir(exist_ok=True)
    decoded = {}
    for label, (agent, vocab) in agents.items():
        if is_classification(data):
            _, captions, maps = evaluate_classification(agent, data, vocab, count, device, count)
        else:
            captions, maps = decode_split(
                agent, data.images[:count], vocab, 1, max_len, count, device
            )
        grid_hw = agent.grid_shape(data.images.shape[-1])
        decoded[label] = (captions, maps, grid_hw)
    for i in range(count):
        image = data.images[i].permute(1, 2, 0).numpy()
        rows = []
        for label, (captions, maps, grid_hw) in decoded.items():
            words = step_labels(captions[i], maps[i])
            rows.append((label, attention_panels(image, words, maps[i], grid_hw)))
        picture = stack_pictures(rows)
        Image.fromarray(picture).save(folder / f"agents_{i}.png")
        writer.add_image(f"attention/agents_{i}", picture, dataformats="HWC")
        for label, (captions, maps, grid_hw) in decoded.items():
            if not reads_a_part(maps[i]):
                continue  # reads every cell: no path to draw
            path = glimpse_path(image, maps[i], grid_hw, step_labels(captions[i], maps[i]))
            Image.fromarray(path).save(folder / f"path_{label}_{i}.png")
            writer.add_image(f"glimpse_path/{label}_{i}", path, dataformats="HWC")


@hydra.main(config_path="pkg://rl_attn.configs", config_name="compare", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run_cli(run_comparison, cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    """Console entry point: group names are checked first (one line for a typo)."""
    args = sys.argv[1:]
    if any(a.split("=", 1)[0] == "agent" for a in args):
        fail("the comparison trains several agents: name them with agents=[soft,reinforce,...]")
    check_group_choices(args)
    AGENT_OVERRIDES[:] = [a for a in args if _is_agent_override(a)]
    sys.argv[1:] = [a for a in args if not _is_agent_override(a)]
    _hydra_main()


if __name__ == "__main__":
    main()
