"""REINFORCE's cross-process statistics, for tests/test_estimators.py.

    torchrun --standalone --nproc-per-node=2 tests/_estimator_ranks.py OUT_DIR   # rank{r}.pt
    python -c "from _estimator_ranks import compute; compute()"                  # one process

Two training steps of a tiny REINFORCE agent on one fixed global batch of 8 captions of uneven
lengths (so the ranks hold different numbers of words), with the sampled cells fixed too, so
that one process and N processes see the same glimpses. Rank ``r`` takes every N-th caption, as
the trainer's sampler does. :func:`compute` returns what must not depend on the number of
processes: the global word count behind ``pg_words``, the advantage normalisation statistics,
the moving-average baseline, the logged loss (averaged over ranks) and the gradients after
the trainer's gradient average (the policy gradient on the attention MLP, and every
parameter's); for the moving-average and value baselines, and for every cell scored at every
word (``branch=all``, whose advantage scale is a global statistic too).

Tried once, to see the comparison fail: ``global_mean_std`` replaced by the local mean and
std, ``all_sum`` inside the moving average replaced by the identity, or ``mean_count``
replaced by the local count: each breaks the match with one process.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from rl_attn import distributed
from rl_attn.agents import ReinforceAgent
from rl_attn.agents.all_cells import AllCells
from rl_attn.agents.base import Rollout
from rl_attn.agents.ppo import Replay
from rl_attn.agents.reinforce import global_mean_std
from rl_attn.decoder import Decoder
from rl_attn.encoder import Encoder
from rl_attn.envs.sensors import SensorView

L, V = 4, 9
D = L + 1
LENGTHS = (1, 3, 2, 3, 1, 1, 3, 2)  # words per caption, before <end>
STEPS = 2
ATTENTION_MLP = ("decoder.att_grid", "decoder.att_hidden", "decoder.att_score")


class GridAsImage(Encoder):
    """The 'image' is already the grid: (B, L, D) in, (B, L, D) out, nothing to learn."""

    out_dim = D

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


class FixedCells(ReinforceAgent):
    """REINFORCE whose training rollout reads ``self.cells: (B, n)`` instead of sampling, and
    which records the statistics its loss uses."""

    cells: torch.Tensor
    seen: dict[str, torch.Tensor]

    def sample(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        p_soft: float,
        view: SensorView | None = None,
    ) -> tuple[Rollout, torch.Tensor, None]:
        view, tokens = self.expand(images, tokens, view)
        self.rollouts += 1
        given = [self.cells[:, t : t + 1] for t in range(self.cells.shape[1])]
        if self.branch == "all":
            every = FixedAllCells(self, view, tokens, given)
            out = self.rollout(images, tokens, view=view, policy=every)
            return replace(out, every_cell=every.recorded()), tokens, None
        policy = Replay(self, given)
        return self.rollout(images, tokens, view=view, policy=policy), tokens, None

    def baseline_of(
        self, out: Rollout, returns: torch.Tensor, pg_mask: torch.Tensor, pg_words: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        baseline, value_loss = super().baseline_of(out, returns, pg_mask, pg_words)
        sampled = pg_mask.bool()
        n = int(distributed.all_sum(sampled.sum()))
        mean, std = global_mean_std((returns - baseline)[sampled], n)
        self.seen = {
            "words": pg_words * distributed.world_size(),
            "advantage_mean": mean,
            "advantage_std": std,
        }
        return baseline, value_loss


class FixedAllCells(AllCells):
    """``branch=all``'s recording policy reading the given cells instead of sampling."""

    def __init__(self, agent: ReinforceAgent, view, tokens: torch.Tensor, given: list):
        super().__init__(agent, view, tokens)
        self.given = given

    def locate(self, logits: torch.Tensor, state):
        self.log_pi.append(self.agent.log_policy(logits))
        return self.agent.locate(logits, state, given=self.given[len(self.log_pi) - 1])


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole batch of ``step``: grids ``(8, L, D)``, tokens ``(8, T)``, cells ``(8, T-1)``."""
    gen = torch.Generator().manual_seed(step)
    b, t = len(LENGTHS), max(LENGTHS) + 2
    grids = torch.randn(b, L, D, generator=gen)
    tokens = torch.zeros(b, t, dtype=torch.long)  # <pad> = 0
    tokens[:, 0] = 1  # <start>
    for row, n in enumerate(LENGTHS):
        tokens[row, 1 : n + 1] = torch.randint(4, V, (n,), generator=gen)
        tokens[row, n + 1] = 2  # <end>
    cells = torch.randint(0, L, (b, t - 1), generator=gen)
    return grids, tokens, cells


ESTIMATORS = {
    "moving_average": {"baseline": "moving_average"},
    "value": {"baseline": "value"},
    "all": {"branch": "all", "baseline": "none", "scored_cells": None},
}


def make_agent(estimator: str) -> FixedCells:
    torch.manual_seed(0)
    decoder = Decoder(V, D, embed_dim=8, hidden_dim=16, attn_dim=8, dropout=0.0)
    options = ESTIMATORS[estimator]
    return FixedCells(GridAsImage(), decoder, normalize_advantage=True, **options)


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def train_steps(baseline: str) -> dict[str, torch.Tensor]:
    """``STEPS`` trainer-like updates (loss, backward, gradient average, SGD step) on this
    rank's share of each global batch; what each step measured, keyed ``step/name``."""
    agent = make_agent(baseline)
    distributed.broadcast_module(agent)
    params = list(agent.parameters())
    optimizer = torch.optim.SGD(params, lr=0.5)
    rank, world = distributed.rank(), distributed.world_size()
    results = {}
    for step in range(STEPS):
        grids, tokens, cells = global_batch(step)
        agent.cells = cells[rank::world]
        optimizer.zero_grad()
        loss, _ = agent.loss(grids[rank::world], tokens[rank::world])
        loss.backward()
        distributed.average_gradients(params)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        names = [name for name, _ in agent.named_parameters()]
        attention = [g for name, g in zip(names, grads) if name.startswith(ATTENTION_MLP)]
        results.update(
            {f"{step}/{k}": v.detach().clone() for k, v in getattr(agent, "seen", {}).items()}
        )
        results[f"{step}/loss"] = distributed.all_sum(loss.detach()) / world
        results[f"{step}/policy_gradient"] = flat(attention)
        results[f"{step}/gradient"] = flat(grads)
        if baseline == "moving_average":
            results[f"{step}/average_return"] = agent.average_return[: cells.shape[1]].clone()
        optimizer.step()
    return results


def compute() -> dict[str, torch.Tensor]:
    """Everything :func:`train_steps` measures, for each of :data:`ESTIMATORS`."""
    results = {}
    for baseline in ESTIMATORS:
        results.update({f"{baseline}/{k}": v for k, v in train_steps(baseline).items()})
    return results


if __name__ == "__main__":
    distributed.init_from_env()
    try:
        out = compute()
        torch.save(out, Path(sys.argv[1]) / f"rank{distributed.rank()}.pt")
    finally:
        distributed.shutdown()
