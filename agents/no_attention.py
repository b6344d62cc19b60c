"""The lower bound: no attention, the decoder always gets the mean-pooled grid."""

from __future__ import annotations

import torch

from rl_attn.agents.base import CaptionAgent, Location
from rl_attn.decoder import DecoderState


class NoAttentionAgent(CaptionAgent):
    """Context = mean of the grid at every step (uniform weights over the ``L`` cells).

    The decoder's attention scores are ignored, so this agent knows *what* is in the image but
    has lost *where*; it is the reference that attention must beat.
    """

    def locate(self, logits: torch.Tensor, state: DecoderState) -> Location:
        weights = torch.full_like(logits, 1.0 / logits.shape[1])
        return Location(action=weights, weights=weights)
