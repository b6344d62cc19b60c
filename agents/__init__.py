"""Agents: how a captioner chooses where to look. All share :class:`CaptionAgent`'s protocol."""

from rl_attn.agents.base import (
    CaptionAgent,
    Captions,
    Classes,
    Location,
    OptimizerStep,
    Policy,
    Rollout,
)
from rl_attn.agents.cnn import CNNClassifierAgent
from rl_attn.agents.gumbel import GumbelAgent
from rl_attn.agents.no_attention import NoAttentionAgent
from rl_attn.agents.ppo import PPOAgent
from rl_attn.agents.random_glimpse import RandomGlimpseAgent
from rl_attn.agents.reinforce import ReinforceAgent
from rl_attn.agents.soft import SoftAttentionAgent

__all__ = [
    "CaptionAgent",
    "Captions",
    "Classes",
    "CNNClassifierAgent",
    "GumbelAgent",
    "Location",
    "OptimizerStep",
    "Policy",
    "NoAttentionAgent",
    "PPOAgent",
    "RandomGlimpseAgent",
    "ReinforceAgent",
    "Rollout",
    "SoftAttentionAgent",
]
