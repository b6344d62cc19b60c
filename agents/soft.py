"""Soft (deterministic) attention, Xu et al. 2015 section 4.2: the expected context."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rl_attn.agents.base import CaptionAgent, Location
from rl_attn.decoder import Decoder, DecoderState
from rl_attn.distributed import mean_count
from rl_attn.encoder import Encoder

TEST_MODES = ("expectation", "argmax")


class SoftAttentionAgent(CaptionAgent):
    """Reads every cell, weighted by ``alpha = softmax(logits)``; trained end to end by backprop.

    Args:
        encoder, decoder: the shared modules.
        doubly_stochastic: ``lambda`` of the regulariser ``lambda * sum_i (1 - sum_t alpha_ti)^2``
            (summed over cells, averaged over the batch; only real words count in ``sum_t``),
            which pushes the decoder to look at every part of the image over the caption.
        reward: the environment's word reward (logged, not trained on).
        test_mode: how the map is read outside training: ``expectation`` (soft attention) or
            ``argmax`` (one cell, the map's most probable: the control that asks whether hard
            attention's policy adds anything to where soft attention's training looks).
    """

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        doubly_stochastic: float = 0.0,
        reward: str = "log_likelihood",
        test_mode: str = "expectation",
    ):
        super().__init__(encoder, decoder, reward)
        if test_mode not in TEST_MODES:
            raise ValueError(f"test_mode must be one of {', '.join(TEST_MODES)}, got {test_mode!r}")
        self.doubly_stochastic, self.test_mode = doubly_stochastic, test_mode

    def locate(self, logits: torch.Tensor, state: DecoderState) -> Location:
        if not self.training and self.test_mode == "argmax":
            cell = logits.argmax(dim=1)
            return Location(action=cell, weights=F.one_hot(cell, logits.shape[1]).to(logits))
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
