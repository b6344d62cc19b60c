"""The random-glimpse control for learned hard attention.

Every step reads uniformly random cells, in training and at test time, so the decoder and the
encoder learn to caption from glimpses whose place carries no information from the image. A
learned hard-attention policy must beat this agent, at the same number of cells per word, to
show that *where* it looks was learned and not just what a random cell tells.
"""

from __future__ import annotations

import torch

from rl_attn.agents.base import CaptionAgent, Location
from rl_attn.decoder import Decoder, DecoderState
from rl_attn.encoder import Encoder


class RandomGlimpseAgent(CaptionAgent):
    """Reads ``cells_per_step`` uniformly random cells per word; the attention scores are ignored.

    Only the word predictor (encoder, LSTM, output layers) learns, by the caption loss; the
    attention MLP gets no gradient. The cells come from torch's global random number
    generator, so a run is reproducible from ``trainer.seed`` and the draws never depend on the
    image. The map drawn and scored is one-hot (``1/k`` on each of ``k`` cells).

    Args:
        encoder, decoder: the shared modules.
        cells_per_step: ``k``, cells read per word, drawn without replacement (every set of ``k``
            distinct cells equally likely); the glimpse is their mean. At most the number of
            cells; compare it with a hard agent reading the same ``k``.
        reward: the environment's word reward (logged, not trained on).
        revisit: ``False``: an episode reads no cell twice until it has read them all (the
            draws are uniform over the cells not yet read), the budget of a hard agent with
            the same setting.
    """

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        cells_per_step: int = 1,
        reward: str = "log_likelihood",
        revisit: bool = True,
    ):
        super().__init__(encoder, decoder, reward)
        self.revisit = revisit
        if (
            not isinstance(cells_per_step, int)
            or isinstance(cells_per_step, bool)
            or cells_per_step < 1
        ):
            raise ValueError(f"cells_per_step must be a positive integer, got {cells_per_step!r}")
        self.cells_per_step = cells_per_step

    def locate(self, logits: torch.Tensor, state: DecoderState) -> Location:
        b, n_cells = logits.shape
        k = self.cells_per_step
        if k > n_cells:
            raise ValueError(
                f"agent.cells_per_step={k} is more than the {n_cells} cells a step can read"
            )
        closed = logits == float("-inf")  # cells read already (revisit=False), never drawn
        if k == 1 and not bool(closed.any()):
            cells = torch.randint(n_cells, (b, 1), device=logits.device)
        else:
            # the k largest of L independent uniforms (closed cells below every open one): a
            # uniformly random set of k distinct open cells
            u = torch.rand(b, n_cells, device=logits.device).masked_fill_(closed, -1.0)
            cells = u.topk(k, dim=1).indices
        weights = torch.zeros(b, n_cells, device=logits.device, dtype=logits.dtype)
        weights.scatter_(1, cells, 1.0 / k)
        return Location(action=cells.squeeze(1) if k == 1 else cells, weights=weights)
