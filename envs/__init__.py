"""Glimpse environments: choosing where to look is the action, the task gives the reward.

* :class:`GlimpseCaptionVectorEnv` (``glimpse.py``): batched and torch-native over feature grids;
  what training runs through.
* :class:`GlimpseCaptionsEnv` (``gym_env.py``): one episode at a time, numpy, registered as
  ``rl_attn/GlimpseCaptions-v0`` for any Gymnasium agent library.
* :class:`GlimpseDigitsEnv` (``gym_digits.py``): the Recurrent Attention Model's digit tasks the
  same way, registered as ``rl_attn/GlimpseDigits-v0``.

``import rl_attn`` registers both ids (:func:`rl_attn.register_envs`).
"""

from rl_attn import register_envs
from rl_attn.envs.glimpse import GlimpseCaptionVectorEnv, read_cells
from rl_attn.envs.gym_digits import GlimpseDigitsEnv
from rl_attn.envs.gym_env import GlimpseCaptionsEnv

register_envs()  # `import rl_attn` has already done it; kept so this module states what it needs

__all__ = ["GlimpseCaptionVectorEnv", "GlimpseCaptionsEnv", "GlimpseDigitsEnv", "read_cells"]
