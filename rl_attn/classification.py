"""Classification tasks (e.g. ``task=digits``) through the captioning machinery.

A classification episode is K glimpses and one prediction, the Recurrent Attention Model's
episode. It runs through the same glimpse environment, agents and decoder as a caption: the
target sequence is ``SILENT x (K-1), class`` (see :mod:`rl_attn.envs.glimpse`), so the decoder
is the recurrent core, the agent's ``locate`` picks every glimpse, and only the prediction after
the last glimpse is scored (reward 1 when correct with ``agent.reward=correct``, as in RAM).
The "vocabulary" is the class names.

A task is a classification task when its splits have ``labels`` and ``glimpses`` and no
``captions``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rl_attn.agents.base import Agent, Classes
from rl_attn.envs.glimpse import SILENT
from rl_attn.vocab import Vocabulary


def mean_of_paths(outs: list[Classes], classes: torch.Tensor) -> torch.Tensor:
    """The predicted class token ``(B,)`` of one or more episodes of the same images: a
    single episode's own prediction, or the class of highest mean probability over several."""
    if len(outs) == 1:
        return outs[0].tokens[:, 0]
    if any(out.scores is None for out in outs):
        raise ValueError("averaging paths needs the agent's class scores (Classes.scores)")
    mean = torch.stack([out.scores.exp() for out in outs]).mean(0)
    return classes.to(mean.device)[mean.argmax(dim=1)]


def is_classification(data: Any) -> bool:
    return hasattr(data, "labels") and hasattr(data, "glimpses") and not hasattr(data, "captions")


def class_vocabulary(data: Any) -> Vocabulary:
    """Special tokens, then the class names in the task's order (so class ``c`` is token
    ``4 + c`` when the names are already sorted, as digit names are)."""
    return Vocabulary(list(data.class_names))


def class_tokens(vocab: Vocabulary, data: Any) -> torch.Tensor:
    """Token index of each class: ``(C,)``."""
    return torch.tensor([vocab.stoi[name] for name in data.class_names])


def episode_tokens(
    labels: torch.Tensor, glimpses: int, classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, K + 1)`` token sequences ``<start>, SILENT x (K-1), class`` and their lengths."""
    n = labels.shape[0]
    tokens = torch.full((n, glimpses + 1), SILENT, dtype=torch.long)
    tokens[:, 0] = Vocabulary.start
    tokens[:, -1] = classes[labels]
    return tokens, torch.full((n,), glimpses + 1, dtype=torch.long)


@torch.no_grad()
def evaluate_classification(
    agent: Agent,
    data: Any,
    vocab: Vocabulary,
    batch_size: int,
    device: torch.device,
    limit: int | None = None,
    paths: int = 1,
) -> tuple[dict[str, float], list[str], list[np.ndarray]]:
    """Accuracy and error of the (first ``limit``) images, the predicted class names and the
    ``(K, L)`` map of every glimpse. ``paths`` > 1 runs that many episodes per image and
    predicts the class of highest mean probability over them (RAM's Monte Carlo test; it
    changes only an agent that samples at test time); the maps are the first path's, and
    the cells read count every path's."""
    n = len(data) if limit is None else min(limit, len(data))
    classes = class_tokens(vocab, data)
    was_training = agent.training
    agent.eval()
    predicted: list[int] = []
    maps: list[np.ndarray] = []
    reads = 0
    for start in range(0, n, batch_size):
        images = data.images[start : min(start + batch_size, n)].to(device)
        outs = [agent.classify(images, data.glimpses, classes) for _ in range(paths)]
        predicted += mean_of_paths(outs, classes).tolist()
        maps += list(outs[0].weights.cpu().numpy())
        reads += sum(int((out.weights > 0).sum()) for out in outs)
    agent.train(was_training)
    truth = classes[data.labels[:n]].tolist()
    correct = sum(int(p == t) for p, t in zip(predicted, truth))
    metrics = {
        "accuracy": correct / n,
        "error": 1 - correct / n,
        "cells_read_per_glimpse": reads / (n * data.glimpses),
    }
    return metrics, [vocab.itos[p] for p in predicted], maps
