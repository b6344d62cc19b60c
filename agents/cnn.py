"""The non-attention reference for classification: a plain CNN over the whole image.

The encoder (the same one the attention agents use) runs over the full image; its grid is
averaged and a linear layer predicts the class. No glimpses, no recurrent core: what a
convolutional network does with the same encoder and training budget (the RAM paper compares
its attention model with convolutional networks in the same way). It classifies only, so it is
an :class:`~rl_attn.agents.base.Agent` and not a caption agent: it has no decoder and chooses
no location.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rl_attn.agents.base import Agent, Classes
from rl_attn.encoder import Encoder
from rl_attn.envs.sensors import GridSensor, Sensor


class CNNClassifierAgent(Agent):
    """Encoder over the whole image, mean over the grid, one linear layer to the classes.

    Args:
        encoder: images -> grid ``(B, L, D)``.
        vocab_size: ``V``, the task's vocabulary (the class tokens are among its words).

    It is trained on the last target of each classification episode (the class).
    """

    classifies_only = True  # the trainer refuses it on a captioning task

    def __init__(self, encoder: Encoder, vocab_size: int):
        super().__init__(encoder)
        self.head = nn.Linear(encoder.out_dim, vocab_size)
        self.sensor = GridSensor()

    def use_sensor(self, sensor: Sensor) -> None:
        """Nothing: the CNN runs its encoder over the whole image, whatever sensor the glimpse
        agents of the same config read through."""

    def class_logits(self, grid: torch.Tensor) -> torch.Tensor:
        """Grid ``(B, L, D)`` -> ``(B, V)`` logits over the vocabulary (the class tokens
        among them)."""
        return self.head(grid.mean(dim=1))

    def loss(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if tokens.shape[1] < 2 or bool((tokens[:, 1:-1] >= 0).any()):
            raise ValueError(
                "the cnn agent classifies only: use it with a classification task (task=digits)"
            )
        logits = self.class_logits(self.encoder(images))
        loss = F.cross_entropy(logits, tokens[:, -1])
        correct = (logits.argmax(dim=1) == tokens[:, -1]).float().mean()
        return loss, {
            "losses/total": loss.item(),
            "losses/caption": loss.item(),
            "charts/reward": correct.item(),
            "charts/cells_read": 0.0,
        }

    @torch.no_grad()
    def classify(self, images: torch.Tensor, glimpses: int, classes: torch.Tensor) -> Classes:
        grid = self.encoder(images)
        logits = self.class_logits(grid)
        classes = classes.to(logits.device)
        scores = torch.log_softmax(logits[:, classes], dim=1)
        predicted = classes[scores.argmax(dim=1)]
        # the whole grid is "read", once
        weights = torch.full_like(grid[:, None, :, 0], 1.0 / grid.shape[1])
        return Classes(predicted.unsqueeze(1), weights, scores)
