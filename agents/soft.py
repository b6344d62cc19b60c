"""Soft (deterministic) attention, Xu et al. 2015 section 4.2: the expected context."""

from __future__ import annotations

import torch

from rl_attn.agents.base import CaptionAgent, Location
from rl_attn.decoder import Decoder, DecoderState
from rl_attn.distributed import mean_count
from rl_attn.encoder import Encoder


class SoftAttentionAgent(CaptionAgent):
    """Reads every cell, weighted by ``alpha = softmax(logits)``; trained end to end by backprop.

    Args:
        encoder, decoder: the shared modules.
        doubly_stochastic: ``lambda`` of the regulariser ``lambda * sum_i (1 - sum_t alpha_ti)^2``
            (summed over cells, averaged over the batch; only real words count in ``sum_t``),
            which pushes the decoder to look at every part of the image over the caption.
        reward: the environment's word reward (logged, not trained on).
    """

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        doubly_stochastic: float = 0.0,
        reward: str = "log_likelihood",
    ):
        super().__init__(encoder, decoder, reward)
        self.doubly_stochastic = doubly_stochastic

    def locate(self, logits: torch.Tensor, state: DecoderState) -> Location:
        weights = torch.softmax(logits, dim=1)
        return Location(action=weights, weights=weights)

    def loss(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.rollout(images, tokens)
        caption = self.caption_loss(out, tokens)
        coverage = (out.weights * out.mask.unsqueeze(-1)).sum(dim=1)  # (B, L): sum_t alpha_ti
        per_image = ((1.0 - coverage) ** 2).sum(dim=1)
        regulariser = per_image.sum() / mean_count(torch.tensor(per_image.shape[0]))
        total = caption + self.doubly_stochastic * regulariser
        return total, {
            "losses/total": total.item(),
            "losses/caption": caption.item(),
            "losses/doubly_stochastic": regulariser.item(),
            **self.env_logs(out),
        }
