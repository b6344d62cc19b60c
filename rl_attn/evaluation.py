"""Decode a split and score it: COCO caption metrics and attention correctness; the periodic
and final evaluations of a training run, its attention pictures and ``metrics.json``."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from rl_attn.agents.base import Agent, CaptionAgent
from rl_attn.attention_maps import attention_panels, glimpse_path, reads_a_part
from rl_attn.classification import evaluate_classification, is_classification
from rl_attn.metrics import caption_metrics
from rl_attn.monitor import Monitor
from rl_attn.scenes import WORD_KINDS
from rl_attn.vocab import Vocabulary


def cell_overlap(
    box: tuple[int, int, int, int], grid_hw: tuple[int, int], image_size: int
) -> np.ndarray:
    """Share of each grid cell's area inside ``box`` (pixels, right/bottom exclusive): ``(L,)``."""
    h, w = grid_hw
    x0, y0, x1, y1 = box
    xs = np.linspace(0, image_size, w + 1)
    ys = np.linspace(0, image_size, h + 1)
    fx = np.clip(np.minimum(xs[1:], x1) - np.maximum(xs[:-1], x0), 0, None) / np.diff(xs)
    fy = np.clip(np.minimum(ys[1:], y1) - np.maximum(ys[:-1], y0), 0, None) / np.diff(ys)
    return np.outer(fy, fx).reshape(-1)


def object_words(
    words: Sequence[str], boxes: Sequence[tuple[int, int, int, int]]
) -> Iterator[tuple[int, str, tuple[int, int, int, int]]]:
    """``(t, kind, box)`` for each size, colour or shape word ``words[t]`` of one generated
    caption and the box of the object it describes: the k-th shape word names the k-th object
    of the scene in caption (left-to-right) order, and the words before it describe the same
    one; words past the scene's last object describe nothing and are skipped."""
    k = 0
    for t, word in enumerate(words):
        kind = WORD_KINDS.get(word)
        if kind is None:
            continue
        if k < len(boxes):
            yield t, kind, boxes[k]
        k += kind == "shape"


def attention_correctness(
    words: Sequence[Sequence[str]],
    weights: Sequence[np.ndarray],
    boxes: Sequence[Sequence[tuple[int, int, int, int]]],
    grid_hw: tuple[int, int],
    image_size: int,
) -> float:
    """Mean share of attention mass inside the box of the object each generated noun names.

    The k-th shape word of a generated caption names the k-th object of the scene in caption
    (left-to-right) order; words past the scene's last object name nothing. Attention on a cell
    is spread evenly over the cell, so a cell half inside the box contributes half its weight.

    Args:
        words: per image, the generated words.
        weights: per image, ``(T, L)`` attention maps, row ``t`` used to emit ``words[t]``.
        boxes: per image, the object boxes in caption order.
    Returns:
        the mean over all naming words, in [0, 1]; NaN when no word names an object.
    """
    shares = [
        float(alpha[t] @ cell_overlap(box, grid_hw, image_size))
        for ws, alpha, objs in zip(words, weights, boxes)
        for t, kind, box in object_words(ws, objs)
        if kind == "shape"
    ]
    return float(np.mean(shares)) if shares else float("nan")


@torch.no_grad()
def decode_split(
    agent: CaptionAgent,
    images: torch.Tensor,
    vocab: Vocabulary,
    beam_size: int = 1,
    max_len: int = 24,
    batch_size: int = 250,
    device: torch.device | str = "cpu",
) -> tuple[list[str], list[np.ndarray]]:
    """Captions (strings) and their ``(T, L)`` attention maps for ``images: (N, 3, H, W)``."""
    was_training = agent.training
    agent.eval()
    captions: list[str] = []
    maps: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        out = agent.caption(images[start : start + batch_size].to(device), max_len, beam_size)
        for tokens, alpha in zip(out.tokens.cpu(), out.weights.cpu()):
            ids = tokens.tolist()
            end = ids.index(vocab.end) if vocab.end in ids else len(ids)
            # the words decode() keeps, and the map that emitted each of them
            keep = [t for t in range(end) if ids[t] not in (vocab.pad, vocab.start)]
            captions.append(vocab.decode(ids))
            maps.append(alpha[keep].numpy())
    agent.train(was_training)
    return captions, maps


def score(
    captions: Sequence[str],
    maps: Sequence[np.ndarray],
    references: Sequence[Sequence[str]],
    boxes: Sequence[Sequence[tuple[int, int, int, int]]] | None,
    grid_hw: tuple[int, int],
    image_size: int,
    with_meteor: bool = True,
) -> dict[str, float]:
    """COCO caption metrics, the cells read per generated word, and attention correctness when
    boxes are known."""
    refs = {i: list(r) for i, r in enumerate(references)}
    hyps = {i: c for i, c in enumerate(captions)}
    result = caption_metrics(refs, hyps, with_meteor=with_meteor)
    reads = [int((m > 0).sum()) for m in maps]
    words = sum(len(m) for m in maps)
    result["cells_read_per_word"] = sum(reads) / words if words else float("nan")
    if boxes is not None:
        result["attention_correctness"] = attention_correctness(
            [c.split() for c in captions], maps, boxes, grid_hw, image_size
        )
    return result


def evaluate_split(
    agent: Agent,
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


def validate(
    agent: Agent,
    data: Any,
    vocab: Vocabulary,
    grid_hw: tuple[int, int],
    cfg: DictConfig,
    device: torch.device,
    monitor: Monitor,
    step: int,
) -> dict[str, float]:
    """The periodic evaluation: greedy decoding of ``trainer.eval_size`` validation images,
    logged as ``eval/val_*``."""
    ec = cfg.eval
    metrics, _, _ = evaluate_split(
        agent, data, vocab, grid_hw, 1, ec.max_len, ec.batch_size, device, cfg.trainer.eval_size
    )
    monitor.add_scalars(metrics, step, prefix="eval/val_")
    return metrics


def final_evaluation(
    agent: Agent,
    splits: dict[str, Any],
    vocab: Vocabulary,
    grid_hw: tuple[int, int],
    cfg: DictConfig,
    device: torch.device,
    monitor: Monitor,
    step: int,
    run_dir: Path,
) -> tuple[dict[str, dict[str, float]], dict[str, float], str]:
    """The end of a run: the evaluation split (``eval.split``) decoded greedily and, for
    captions with ``eval.beam_size > 1``, by beam search (for classification with
    ``eval.paths > 1``, also by the mean of that many episodes per image, a separate entry
    that is never the headline); the headline decoding's captions and
    attention pictures written; the validation images of the periodic evaluation once more.
    Returns ``({decoding: metrics}, validation metrics, headline decoding)``."""
    ec = cfg.eval
    data = splits[ec.split]
    decodings = {"greedy": 1}
    if ec.beam_size > 1 and not is_classification(data):
        decodings[f"beam{ec.beam_size}"] = ec.beam_size
    headline = list(decodings)[-1]
    results: dict[str, dict[str, float]] = {}
    for name, beam in decodings.items():
        metrics, captions, maps = evaluate_split(
            agent, data, vocab, grid_hw, beam, ec.max_len, ec.batch_size, device,
            with_meteor=ec.meteor,
        )  # fmt: skip
        results[name] = metrics
        monitor.add_scalars(metrics, step, prefix=f"eval/{ec.split}_{name}_")
        if name == headline:
            write_samples(run_dir, monitor, data, captions, maps, grid_hw, ec, step)
    paths = ec.get("paths", 1)
    if paths > 1 and is_classification(data):  # reported beside the single path, never for it
        name = f"mean_of_{paths}_paths"
        results[name], _, _ = evaluate_classification(
            agent, data, vocab, ec.batch_size, device, paths=paths
        )
        monitor.add_scalars(results[name], step, prefix=f"eval/{ec.split}_{name}_")
    val = validate(agent, splits["val"], vocab, grid_hw, cfg, device, monitor, step)
    return results, val, headline


def step_labels(caption: str, maps: np.ndarray) -> list[str]:
    """A label per attention map: the words of a caption, or for a classification episode
    (one predicted class after K glimpses) the glimpse numbers and then the class."""
    words = caption.split()
    if len(words) == len(maps):
        return words
    return [f"glimpse {t + 1}" for t in range(len(maps) - 1)] + [f"-> {caption}"]


def write_samples(
    run_dir: Path,
    monitor: Monitor,
    data: Any,
    captions: list[str],
    maps: list[np.ndarray],
    grid_hw: tuple[int, int],
    ec: DictConfig,
    step: int,
) -> None:
    """``<split>_captions.json``, a table of captions in TensorBoard, and the attention
    pictures of the first ``eval.attention_images`` images (and a hard agent's glimpse path)."""
    rows = [
        {"index": i, "generated": c, "references": data.references[i]}
        for i, c in enumerate(captions)
    ]
    (run_dir / f"{ec.split}_captions.json").write_text(json.dumps(rows, indent=1))
    table = ["|image|generated|reference|", "|-|-|-|"]
    table += [f"|{r['index']}|{r['generated']}|{r['references'][0]}|" for r in rows[:8]]
    monitor.add_text("samples/captions", "\n".join(table), step)
    out = run_dir / "attention"
    out.mkdir(exist_ok=True)
    writer = monitor.writer
    for i in range(min(ec.attention_images, len(captions))):
        image = data.images[i].permute(1, 2, 0).numpy()
        words = step_labels(captions[i], maps[i])
        picture = attention_panels(image, words, maps[i], grid_hw)
        if writer is not None:
            writer.add_image(f"attention/{ec.split}_{i}", picture, step, dataformats="HWC")
        Image.fromarray(picture).save(out / f"{ec.split}_{i}.png")
        if reads_a_part(maps[i]):  # a hard agent: draw its path too
            path = glimpse_path(image, maps[i], grid_hw, words)
            if writer is not None:
                writer.add_image(f"glimpse_path/{ec.split}_{i}", path, step, dataformats="HWC")
            Image.fromarray(path).save(out / f"path_{ec.split}_{i}.png")


def write_metrics(
    run_dir: Path, monitor: Monitor, summary: dict[str, Any], hparams: dict[str, Any]
) -> None:
    """``metrics.json``, and the headline metrics beside the hyperparameters in TensorBoard."""
    headline = summary[summary["split"]][summary["decoding"]]
    if monitor.writer is not None:
        monitor.writer.add_hparams(
            {
                k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in hparams.items()
            },
            {f"hparam/{k}": v for k, v in headline.items() if not math.isnan(v)},
            run_name=".",
        )
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
