"""rl_attn: hard visual attention by reinforcement learning, measured against soft attention."""

__version__ = "0.1.0"
