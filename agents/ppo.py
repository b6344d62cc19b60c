"""Hard attention whose location policy learns by PPO-clip (Schulman et al. 2017).

One batch is one rollout: the glimpses are sampled once, with their log-probabilities, the
environment's rewards, the reward-to-go and the baseline (all without gradient). Then
``epochs`` optimiser steps replay the *same* cells through today's encoder, decoder and policy
and minimise

    caption cross-entropy
    - mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)     rho_t = pi(l_t) / pi_old(l_t)
    - entropy_coef * entropy + value_coef * (V(h_t) - G_t)^2

so the policy may move several steps on one rollout but not far from the policy that drew it.
This is the algorithm that needs :meth:`~rl_attn.agents.base.CaptionAgent.update`: the trainer
hands it its optimiser step and it calls that step ``epochs`` times per batch.
"""

from __future__ import annotations

from typing import Any

import torch

from rl_attn.agents.base import Location, OptimizerStep, Rollout
from rl_attn.agents.reinforce import ReinforceAgent
from rl_attn.decoder import DecoderState
from rl_attn.distributed import mean_count
from rl_attn.envs.sensors import SensorView


class Replay:
    """A policy over ``agent``'s modules that reads the cells ``cells[t]: (B, k)`` at step
    ``t`` and scores them (log-probability, entropy, value) under the agent's policy today."""

    def __init__(self, agent: ReinforceAgent, cells: list[torch.Tensor]):
        self.agent, self.cells, self.t = agent, cells, 0

    def init_state(self, view: SensorView) -> DecoderState:
        return self.agent.init_state(view)

    def attention_logits(self, state: DecoderState) -> torch.Tensor:
        return self.agent.attention_logits(state)

    def locate(self, logits: torch.Tensor, state: DecoderState) -> Location:
        loc = self.agent.locate(logits, state, given=self.cells[self.t])
        self.t += 1
        return loc


class PPOAgent(ReinforceAgent):
    """Hard attention, the location policy trained by PPO-clip on each batch's rollout.

    Args:
        epochs: optimiser steps per batch, each on the whole batch's rollout (>= 1; with 1 it
            is REINFORCE with the clipped ratio, which is then always 1).
        clip_range: ``eps`` of the clipped ratio, in (0, 1).
        everything else: as :class:`~rl_attn.agents.reinforce.ReinforceAgent` (its warm-up
            and expected-context arguments are not used: PPO reads sampled glimpses only).
    """

    def __init__(self, *args: Any, epochs: int = 4, clip_range: float = 0.2, **kwargs: Any):
        kwargs.setdefault("branch", "episode")  # not reinforce's auto: ppo replays episodes
        kwargs.setdefault("baseline", "value")
        super().__init__(*args, **kwargs)
        if self.expected_context_prob > 0 or self.soft_warmup_steps > 0:
            raise ValueError(
                "the ppo agent samples every glimpse: expected_context_prob and "
                "soft_warmup_steps must be 0 (Xu et al.'s mix is agent=reinforce_xu)"
            )
        if self.branch != "episode":
            raise ValueError("the ppo agent replays whole episodes: branch must be episode")
        if self.cell_reconstruction:
            raise ValueError(
                "the ppo agent's loss has no cell reconstruction: cell_reconstruction must be 0 "
                "(it is agent=reinforce's)"
            )
        if self.baseline == "self_critical":
            raise ValueError(
                "the ppo agent replays sampled paths only: baseline self_critical is reinforce's"
            )
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        if not 0.0 < clip_range < 1.0:
            raise ValueError(f"clip_range must be in (0, 1), got {clip_range}")
        self.epochs, self.clip_range = epochs, clip_range

    def update(
        self, images: torch.Tensor, tokens: torch.Tensor, step: OptimizerStep
    ) -> dict[str, float]:
        """One rollout, then ``epochs`` optimiser steps on it; the last step's logs."""
        with torch.no_grad():
            first, sampled_tokens, _ = self.sample(images, tokens, 0.0)
            cells = [loc.action.view(loc.action.shape[0], -1) for loc in first.locations]
            old_log_prob = torch.stack([loc.log_prob for loc in first.locations], dim=1)
            mask = first.mask.float()
            returns = self.returns_of(first, mask)
            words = mean_count(mask.sum())
            baseline, _ = self.baseline_of(first, returns, mask, words)
            advantage = self.advantage_of(returns, baseline, mask.bool())
        logs: dict[str, float] = {}
        for _ in range(self.epochs):
            view, _ = self.expand(images, tokens)
            out = self.rollout(images, sampled_tokens, view=view, policy=Replay(self, cells))
            loss, logs = self._clipped_loss(out, sampled_tokens, old_log_prob, advantage, returns)
            step(loss, logs)
        return {**logs, **self.env_logs(first), **self.return_logs(returns, baseline, mask.bool())}

    def _clipped_loss(
        self,
        out: Rollout,
        tokens: torch.Tensor,
        old_log_prob: torch.Tensor,
        advantage: torch.Tensor,
        returns: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        caption = self.caption_loss(out, tokens)
        mask = out.mask.float()
        words = mean_count(mask.sum())
        log_prob = torch.stack([loc.log_prob for loc in out.locations], dim=1)
        entropy = torch.stack([loc.entropy for loc in out.locations], dim=1)
        log_ratio = log_prob - old_log_prob
        ratio = log_ratio.exp()
        clipped = ratio.clamp(1 - self.clip_range, 1 + self.clip_range)
        surrogate = torch.min(ratio * advantage, clipped * advantage)
        policy_loss = -(surrogate * mask).sum() / words
        mean_entropy = (entropy * mask).sum() / words
        value_loss = torch.zeros((), device=caption.device)
        if self.baseline == "value":
            values = torch.stack([loc.value for loc in out.locations], dim=1)
            value_loss = ((values - returns) ** 2 * mask).sum() / words
        total = (
            caption + policy_loss - self.entropy_coef * mean_entropy + self.value_coef * value_loss
        )
        with torch.no_grad():  # CleanRL's diagnostics: how far the policy moved, how often clipped
            approx_kl = (((ratio - 1) - log_ratio) * mask).sum() / words
            clip_fraction = (((ratio - 1).abs() > self.clip_range).float() * mask).sum() / words
        return total, {
            "losses/total": total.item(),
            "losses/caption": caption.item(),
            "losses/policy": policy_loss.item(),
            "losses/entropy": mean_entropy.item(),
            "losses/value": value_loss.item(),
            "losses/approx_kl": approx_kl.item(),
            "losses/clip_fraction": clip_fraction.item(),
            "charts/policy_entropy": mean_entropy.item(),
        }
