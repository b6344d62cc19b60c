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
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from rl_attn.agents.base import CaptionAgent
from rl_attn.attention_maps import attention_panels
from rl_attn.build import build_agent, build_task, check_targets
from rl_attn.checkpoint import save_checkpoint
from rl_attn.cli import check_group_choices, run_cli
from rl_attn.config_checks import check_train_config, resolve_device
from rl_attn.evaluation import decode_split, score
from rl_attn.vocab import Vocabulary


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _lr_lambda(schedule: str, max_steps: int):
    if schedule == "constant":
        return lambda step: 1.0
    # Cosine from 1 to 0.05 over the run: most of the budget at a useful rate, a calm finish.
    return lambda step: (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, max_steps) / max_steps))
    )


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
    """Decode (the first ``limit`` images of) a split and score it."""
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


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train, evaluate on the test split, write the run directory; return ``metrics.json``."""
    check_train_config(cfg)
    check_targets(cfg)
    tc = cfg.trainer
    device = resolve_device(tc.device)
    if tc.threads:
        torch.set_num_threads(int(tc.threads))
    seed_everything(tc.seed)

    started = time.perf_counter()
    splits = build_task(cfg)
    train_data, val_data, test_data = splits["train"], splits["val"], splits["test"]
    vocab = Vocabulary.build(train_data.captions)
    agent = build_agent(cfg, len(vocab)).to(device)
    grid_hw = agent.encoder.grid_shape(train_data.images.shape[-1])
    tokens, lengths = vocab.encode_batch(train_data.captions)

    params = [p for p in agent.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(tc.lr_schedule, tc.max_steps)
    )

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    writer = SummaryWriter(log_dir=str(run_dir))
    hparams = _flat(cfg)
    writer.add_text("hyperparameters", _markdown_table(hparams, ("parameter", "value")))
    n_params = sum(p.numel() for p in agent.parameters())
    writer.add_text("model", f"{type(agent).__name__}: {n_params:,} parameters, grid {grid_hw}")

    def checkpoint(step: int) -> None:
        save_checkpoint(
            run_dir / "checkpoints" / "last.pt",
            {
                "step": step,
                "config": OmegaConf.to_container(cfg, resolve=True),
                "vocab": vocab.itos,
                "model": agent.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            },
        )

    generator = torch.Generator().manual_seed(tc.seed)
    order = torch.randperm(len(train_data), generator=generator)
    cursor = 0
    sums: dict[str, float] = defaultdict(float)
    count = 0
    samples_seen, window_samples, window_start = 0, 0, time.perf_counter()
    train_start = time.perf_counter()
    val_metrics: dict[str, float] = {}
    agent.train()
    bar = tqdm(total=tc.max_steps, desc="train", disable=not tc.progress, dynamic_ncols=True)
    step = 0
    try:
        for step in range(1, tc.max_steps + 1):
            if cursor + tc.batch_size > len(order):
                order = torch.randperm(len(train_data), generator=generator)
                cursor = 0
            idx = order[cursor : cursor + tc.batch_size]
            cursor += tc.batch_size
            batch_len = int(lengths[idx].max())
            images = train_data.images[idx].to(device, non_blocking=True)
            batch_tokens = tokens[idx, :batch_len].to(device, non_blocking=True)

            loss, logs = agent.loss(images, batch_tokens, lengths[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = tc.grad_clip if tc.grad_clip is not None else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            optimizer.step()
            scheduler.step()

            for k, v in logs.items():
                sums[k] += v
            sums["charts/grad_norm"] += grad_norm
            count += 1
            samples_seen += len(idx)
            window_samples += len(idx)
            bar.update(1)
            if step % tc.log_interval == 0 or step == tc.max_steps:
                now = time.perf_counter()
                rate = window_samples / max(now - window_start, 1e-9)
                for k, v in sums.items():
                    writer.add_scalar(k, v / count, step)
                writer.add_scalar("charts/learning_rate", scheduler.get_last_lr()[0], step)
                writer.add_scalar("charts/samples_per_sec", rate, step)
                writer.add_scalar("charts/epoch", samples_seen / len(train_data), step)
                bar.set_postfix(loss=f"{sums['losses/total'] / count:.3f}", sps=f"{rate:.0f}")
                sums.clear()
                count, window_samples, window_start = 0, 0, now
            if step % tc.eval_interval == 0 and step != tc.max_steps:
                val_metrics, _, _ = evaluate_split(
                    agent, val_data, vocab, grid_hw, 1, cfg.eval.max_len,
                    cfg.eval.batch_size, device, limit=tc.eval_size,
                )  # fmt: skip
                for k, v in val_metrics.items():
                    writer.add_scalar(f"eval/val_{k}", v, step)
                window_start = time.perf_counter()  # evaluation time is not training time
            if step % tc.checkpoint_interval == 0 and step != tc.max_steps:
                checkpoint(step)
    except KeyboardInterrupt:
        bar.close()
        checkpoint(step)
        writer.close()
        print(
            f"\ninterrupted at step {step}; checkpoint saved to {run_dir / 'checkpoints'}",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    bar.close()
    train_time = time.perf_counter() - train_start
    checkpoint(tc.max_steps)

    ec = cfg.eval
    eval_data = {"test": test_data, "val": val_data}[ec.split]
    results: dict[str, dict[str, float]] = {}
    decode_modes = {"greedy": 1}
    if ec.beam_size > 1:
        decode_modes[f"beam{ec.beam_size}"] = ec.beam_size
    for name, beam in decode_modes.items():
        metrics, captions, maps = evaluate_split(
            agent, eval_data, vocab, grid_hw, beam, ec.max_len, ec.batch_size, device,
            with_meteor=ec.meteor,
        )  # fmt: skip
        results[name] = metrics
        for k, v in metrics.items():
            writer.add_scalar(f"eval/{ec.split}_{name}_{k}", v, tc.max_steps)
        if beam == ec.beam_size:  # the headline decoding: save its captions and pictures
            _write_samples(run_dir, writer, eval_data, captions, maps, grid_hw, ec, tc.max_steps)
    val_final, _, _ = evaluate_split(
        agent, val_data, vocab, grid_hw, 1, ec.max_len, ec.batch_size, device, tc.eval_size
    )
    for k, v in val_final.items():
        writer.add_scalar(f"eval/val_{k}", v, tc.max_steps)

    headline = results[list(decode_modes)[-1]]
    summary = {
        "agent": cfg.agent._target_,
        "steps": tc.max_steps,
        "batch_size": tc.batch_size,
        "parameters": n_params,
        "grid": list(grid_hw),
        "train_time_s": round(train_time, 2),
        "total_time_s": round(time.perf_counter() - started, 2),
        "train_samples_per_s": round(samples_seen / train_time, 1),
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
    return summary


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
        picture = attention_panels(image, captions[i].split(), maps[i], grid_hw)
        writer.add_image(f"attention/{ec.split}_{i}", picture, step, dataformats="HWC")
        Image.fromarray(picture).save(out / f"{ec.split}_{i}.png")


@hydra.main(config_path="pkg://rl_attn.configs", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = run_cli(train, cfg, run_dir)
    split, decoding = summary["split"], summary["decoding"]
    m = summary[split][decoding]
    line = ", ".join(f"{k} {v:.3f}" for k, v in m.items())
    print(f"{split} ({decoding}): {line}")
    print(f"run directory: {run_dir}")


def main() -> None:
    """Console entry point: check group names first, so a typo gets one line, then run Hydra."""
    check_group_choices(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
