"""The all-cells policy gradient of ``agent.branch=all``: every cell scored at every word.

With per-word credit (``gamma=0``) the glimpse for word ``t`` earns only that word's reward,
``r_t(l) = log p(w_t | s_{t-1}, l)``, and the state ``s_{t-1}`` it is chosen in does not depend
on it. So the expected reward of the choice has the exact gradient

    grad sum_l pi(l | s) r_t(l) = sum_l pi(l | s) (r_t(l) - b) grad log pi(l | s),

for any ``b`` that does not depend on ``l``: REINFORCE's estimate averaged over this word's
cell instead of drawn once (the "all-action" policy gradient, e.g. Allen et al. 2017's Mean
Actor-Critic; Ciosek and Whiteson 2018). Here ``r_t(l)`` is what the environment would pay
for reading cell ``l``, computed for all ``L`` cells by batched decoder steps without
autograd after the rollout, from the states it kept (the context enters a step linearly: see
:meth:`~rl_attn.decoder.Decoder.step_every_cell`), and ``b`` is the policy's expected reward
``sum_l pi(l) r_t(l)``. No gradient flows from the reward into the scores: the policy still
learns from reward alone, only without the noise of one draw per word. The episode itself
reads the one sampled cell per word, which trains the captioner as in every hard run.

What this costs: every cell's word logits at every word, ``L`` rows of the core's
nonlinearity and of the output layers per caption (no autograd); it reads the whole grid in
training, so it needs ``sensor=grid``. At test time the agent reads one cell per word, as
any hard agent.

Cheaper, and still unbiased: with ``scored_cells=m`` only ``m + 1`` cells are scored per word,
the ``m`` most probable exactly and one drawn from the others, weighted by the others' mass
(the sum-and-sample estimator, Liu et al. 2019, "Rao-Blackwellized stochastic gradients for
discrete distributions"): ``sum_{l in top} pi(l) (r(l) - b) grad log pi(l) + (1 - pi(top))
(r(j) - b) grad log pi(j)``, ``j ~ pi`` restricted to the rest, whose mean over ``j`` is the
sum over the rest. The baseline is the top cells' mean reward, ``b = sum_{top} pi r / pi(top)``,
which does not depend on ``j``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rl_attn.agents.base import draw_cells
from rl_attn.decoder import DecoderState
from rl_attn.distributed import all_sum
from rl_attn.envs.glimpse import word_reward
from rl_attn.envs.sensors import GridView, SensorView

if TYPE_CHECKING:
    from rl_attn.agents.base import Location
    from rl_attn.agents.reinforce import ReinforceAgent


_SCORED_ROWS = 1024  # (word, cell) rows per scoring call: its gates stay in cache


class AllCells:
    """A policy over ``agent``'s modules that samples as the agent does and also records, at
    every word, the policy's log-probabilities over all cells (with gradient) and the reward
    each cell would have earned (without). ``tokens: (B, T)`` are the episodes' captions."""

    def __init__(
        self,
        agent: ReinforceAgent,
        view: SensorView,
        tokens: torch.Tensor,
        scored: int | None = None,
    ):
        if not isinstance(view, GridView):
            raise ValueError(
                "agent.branch=all scores every cell of the feature grid at every word, so it "
                "needs sensor=grid"
            )
        self.agent, self.grid = agent, view.grid.detach()
        self.targets = tokens[:, 1:].clamp(min=0)  # pads score nothing: masked in the loss
        self.scored = scored if scored is not None and scored < view.num_cells else None
        # every cell's inputs once per episode; the scored few's with each chunk of rows
        self.cells = agent.decoder.cell_inputs(self.grid) if self.scored is None else None
        self.log_pi: list[torch.Tensor] = []
        self.states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (h, c, word)
        self.picked: list[tuple[torch.Tensor, torch.Tensor]] = []  # with scored: (cells, weights)

    def init_state(self, view: SensorView) -> DecoderState:
        return self.agent.init_state(view)

    def attention_logits(self, state: DecoderState) -> torch.Tensor:
        return self.agent.attention_logits(state)

    def locate(self, logits: torch.Tensor, state: DecoderState) -> Location:
        self.log_pi.append(self.agent.log_policy(logits))
        return self.agent.locate(logits, state)

    def decoder_step(
        self, state: DecoderState, word: torch.Tensor, context: torch.Tensor, predict: bool = True
    ) -> tuple[DecoderState, torch.Tensor | None]:
        """The decoder's step on the sampled glimpse. The state it starts from is kept, so that
        :meth:`recorded` scores the cells of all words at once."""
        if self.scored is not None:  # every caption's draw, so the random stream ignores padding
            self.picked.append(sum_and_sample(self.log_pi[-1].detach().exp(), self.scored))
        self.states.append((state.h.detach(), state.c.detach(), word))
        return self.agent.decoder.step(state, word, context, predict)

    def _score(self, picked: torch.Tensor | None) -> torch.Tensor:
        """The rewards ``(B, n, K)`` of every word's scored cells, from the kept states; 0 where
        the word is padding (the loss masks it), which is not run through the decoder. The real
        words of all steps are scored together, in chunks of about ``_SCORED_ROWS`` (word,
        cell) rows: a call per chunk instead of one per word, and each chunk's gates small
        enough to stay in cache (RESULTS, issue 14, "An eleventh session"). ``picked: (B, n,
        K)`` are the scored cells of :func:`sum_and_sample`, ``None`` when every cell is."""
        h, c, words = (torch.stack(x, dim=1) for x in zip(*self.states, strict=True))
        b, n = words.shape
        h, c, words = h.flatten(0, 1), c.flatten(0, 1), words.flatten()
        targets = self.targets[:, :n].flatten()
        real = (targets != 0).nonzero().squeeze(1)
        image = real.div(n, rounding_mode="floor")
        k = self.grid.shape[1] if self.scored is None else self.scored + 1
        rewards = h.new_zeros(b * n, k)
        if picked is not None:
            picked = picked.flatten(0, 1)
        chunk = max(1, _SCORED_ROWS // k)
        for rows, images in zip(real.split(chunk), image.split(chunk), strict=True):
            state = DecoderState(h[rows], c[rows], keys=self.grid[:0])  # no scores: no keys
            if picked is not None:
                cells = self.agent.decoder.cell_inputs(self.grid[images.unsqueeze(1), picked[rows]])
            else:
                cells = (self.cells[0][images], self.cells[1][images])
            every = self.agent.decoder.step_every_cell(state, words[rows], cells)
            target = targets[rows].repeat_interleave(k)
            reward = word_reward(every.flatten(0, 1), target, self.agent.reward)
            rewards.index_copy_(0, rows, reward.view(-1, k))
        return rewards.view(b, n, k)

    def recorded(self) -> ScoredCells:
        """Word ``t``'s policy over the cells and what the scored cells would have earned."""
        log_pi = torch.stack(self.log_pi, dim=1)
        if self.scored is None:
            return ScoredCells(log_pi, self._score(None))
        cells, weights = (torch.stack(x, dim=1) for x in zip(*self.picked, strict=True))
        return ScoredCells(log_pi, self._score(cells), cells, weights)


@dataclass
class ScoredCells:
    """What ``branch=all`` measured, ``n`` words: ``log_pi: (B, n, L)`` the policy (with
    gradient) and ``rewards: (B, n, K)`` the reward of the scored cells; every cell (``K = L``)
    when ``cells`` is ``None``, else the cells ``(B, n, K)`` of :func:`sum_and_sample` with their
    ``weights``."""

    log_pi: torch.Tensor
    rewards: torch.Tensor
    cells: torch.Tensor | None = None
    weights: torch.Tensor | None = None


def sum_and_sample(pi: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cells ``(B, m + 1)`` scored for ``pi: (B, L)``: the ``m`` most probable, then one
    drawn from the rest in proportion to ``pi``; and their weights: ``pi`` for the first ``m``,
    the rest's total mass for the draw (0, and any cell, where the rest has no mass)."""
    top = pi.topk(m, dim=1).indices
    rest = pi.scatter(1, top, 0.0)
    mass = rest.sum(dim=1, keepdim=True)
    return torch.cat([top, draw_cells(rest, 1)], dim=1), torch.cat([pi.gather(1, top), mass], 1)


def all_cells_policy_loss(
    scored: ScoredCells, mask: torch.Tensor, words: torch.Tensor, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy term ``-sum_l w(l) A(l) log pi(l)`` per word over the scored cells, summed
    over the real words of ``mask: (B, n)`` and divided by ``words`` (the loss normaliser).
    Every cell: ``w = pi``, ``A(l) = r(l) - b``, ``b = sum_l pi(l) r(l)``. Sum-and-sample:
    ``w`` are the weights of :func:`sum_and_sample` and ``b`` the top cells' mean reward. With
    ``normalize``, ``A`` is divided by its ``w``-weighted standard deviation over the real words
    of every process. Returns the loss, ``b: (B, n)`` and the divisor of ``A`` (1 without
    ``normalize``)."""
    log_pi, rewards = scored.log_pi, scored.rewards
    if scored.cells is None:
        weights = log_pi.detach().exp()
        expected = (weights * rewards).sum(dim=2, keepdim=True)
    else:
        log_pi = log_pi.gather(2, scored.cells)
        weights = scored.weights
        top, top_rewards = weights[..., :-1], rewards[..., :-1]
        expected = (top * top_rewards).sum(2, keepdim=True) / top.sum(2, keepdim=True)
    advantage = rewards - expected
    divisor = torch.ones(())
    if normalize:
        spread = all_sum(((weights * advantage**2).sum(dim=2) * mask).sum())
        count = all_sum(mask.sum()).clamp(min=1)
        divisor = (spread / count).sqrt() + 1e-8
        advantage = advantage / divisor
    per_word = (weights * advantage * log_pi.masked_fill(weights == 0, 0.0)).sum(dim=2)
    return -(per_word * mask).sum() / words, expected.squeeze(2), divisor.detach()
