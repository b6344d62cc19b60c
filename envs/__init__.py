"""Glimpse environments: choosing where to look is the action, the task gives the reward.

* :class:`GlimpseCaptionVectorEnv` (``glimpse.py``): batched and torch-native over feature grids;
  what training runs through.
* :class:`GlimpseCaptionsEnv` (``gym_env.py``): one episode at a time, numpy, registered as
  ``rl_attn/GlimpseCaptions-v0`` for any Gymnasium agent library.
"""

import gymnasium as gym

from rl_attn.envs.glimpse import GlimpseCaptionVectorEnv, read_cells
from rl_attn.envs.gym_env import GlimpseCaptionsEnv

if "rl_attn/GlimpseCaptions-v0" not in gym.registry:
    gym.register(
        id="rl_attn/GlimpseCaptions-v0",
        entry_point="rl_attn.envs.gym_env:GlimpseCaptionsEnv",
        max_episode_steps=64,
    )

__all__ = ["GlimpseCaptionVectorEnv", "GlimpseCaptionsEnv", "read_cells"]
