"""Hard attention trained without RL: the straight-through Gumbel-softmax estimator
(Jang et al. 2017; Maddison et al. 2017).

In training every word reads ONE cell, ``l = argmax_i (logits_i + g_i)`` with ``g_i`` standard
Gumbel noise: by the Gumbel-max trick an exact sample of ``softmax(logits)``. The action the
environment reads is the probability vector ``onehot(l) + (y - stop_gradient(y))`` with the
relaxed sample ``y = softmax((logits + g) / tau)``. Its value is exactly the one-hot (``y - y``
is 0 in floating point), so the glimpse is the one cell and the environment counts one read;
its gradient is ``y``'s, so the caption loss trains the attention scores by backprop through
the relaxation, as soft attention's loss does, with no policy gradient. The estimate is biased
(the forward pass is not the relaxation it differentiates); a lower ``tau`` brings the
relaxation closer to the one-hot at the price of more variance (Jang et al.).

The gradient of every cell's score goes through that cell's features (the glimpse is the
weighted sum ``sum_i a_i cell_i``, a matmul on the grid), so the grid of every cell must exist:
``sensor=grid`` computes it anyway; ``sensor=patch`` would have to encode every patch, all the
cost hard attention saves there, so that combination is refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rl_attn.agents.base import CaptionAgent, Location
from rl_attn.decoder import Decoder, DecoderState
from rl_attn.encoder import Encoder
from rl_attn.envs.sensors import PatchSensor, Sensor
from rl_attn.errors import UserError

TEST_MODES = ("argmax", "sample")


def gumbel_noise(like: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log U)``, ``U`` uniform in (0, 1), shaped like ``like``.
    Drawn with one ``torch.rand_like`` call on torch's global generator (runs are reproducible
    from the seed); carries no gradient."""
    u = torch.rand_like(like).clamp_(min=torch.finfo(like.dtype).tiny)  # log(0) would be -inf
    return -torch.log(-torch.log(u))


class GumbelAgent(CaptionAgent):
    """Hard attention, one cell per word, trained by the straight-through Gumbel-softmax.

    Training reads ``argmax(logits + g)`` (``g`` from :func:`gumbel_noise`, drawn once per
    step and nothing else drawn by :meth:`locate`) and backpropagates through
    ``softmax((logits + g) / tau)``. The map drawn and scored is always the one-hot of the cell
    read.

    Args:
        encoder, decoder: the shared modules.
        tau: temperature of the relaxation, > 0. It changes only the backward pass (the cell
            read is the same for every ``tau``): small values make the relaxed sample nearly
            one-hot (less bias, larger gradients on fewer cells), large values spread the
            gradient over many cells.
        test_mode: how a cell is chosen outside training: ``argmax`` (the highest score) or
            ``sample`` (one draw from ``softmax(logits)``).
        reward: the environment's word reward (logged, not trained on).
        revisit: ``False``: an episode reads no cell twice until it has read them all (the
            cells read score ``-inf``, so neither the noisy argmax nor the relaxation
            reaches them).
    """

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        tau: float = 1.0,
        test_mode: str = "argmax",
        reward: str = "log_likelihood",
        revisit: bool = True,
    ):
        super().__init__(encoder, decoder, reward)
        self.revisit = revisit
        if (
            isinstance(tau, bool)
            or not isinstance(tau, (int, float))
            or not (math.isfinite(tau) and tau > 0)
        ):
            raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
        if test_mode not in TEST_MODES:
            raise ValueError(f"test_mode must be one of {', '.join(TEST_MODES)}, got {test_mode!r}")
        self.tau = float(tau)
        self.test_mode = test_mode

    def use_sensor(self, sensor: Sensor) -> None:
        if isinstance(sensor, PatchSensor):
            raise UserError(
                "agent=gumbel needs sensor=grid: its straight-through gradient reaches each "
                "cell's score through that cell's features, and sensor=patch encodes only the "
                "cells read (encoding all of them would cost what soft attention costs)"
            )
        super().use_sensor(sensor)

    def locate(self, logits: torch.Tensor, state: DecoderState) -> Location:
        n_cells = logits.shape[1]
        if self.training:
            perturbed = (logits + gumbel_noise(logits)) / self.tau
            relaxed = torch.softmax(perturbed, dim=1)
            hard = F.one_hot(perturbed.argmax(dim=1), n_cells).to(relaxed.dtype)
            # value: exactly the one-hot; gradient: the relaxed sample's
            action = hard + (relaxed - relaxed.detach())
            return Location(action=action, weights=hard)
        if self.test_mode == "sample":  # Gumbel-max: an exact draw from softmax(logits)
            cell = (logits + gumbel_noise(logits)).argmax(dim=1)
        else:
            cell = logits.argmax(dim=1)
        return Location(action=cell, weights=F.one_hot(cell, n_cells).to(logits.dtype))
