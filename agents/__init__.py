"""Agents: how a captioner chooses where to look. All share :class:`CaptionAgent`'s protocol."""

from rl_attn.agents.base import Attention, CaptionAgent, Captions, Rollout
from rl_attn.agents.no_attention import NoAttentionAgent
from rl_attn.agents.soft import SoftAttentionAgent

__all__ = [
    "Attention",
    "CaptionAgent",
    "Captions",
    "NoAttentionAgent",
    "Rollout",
    "SoftAttentionAgent",
]
