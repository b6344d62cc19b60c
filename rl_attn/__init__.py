"""rl_attn: hard visual attention by reinforcement learning, measured against soft attention.

Importing the package registers its Gymnasium environments (as ``import ap_gym`` does for its
suite), without importing them or torch: the ids point at string entry points, which
``gymnasium.make`` imports when an env is first made.
"""

__version__ = "0.1.0"

# id -> (entry point, max_episode_steps); the digit episode ends by itself after `glimpses` looks
GYM_ENVS: dict[str, tuple[str, int | None]] = {
    "rl_attn/GlimpseCaptions-v0": ("rl_attn.envs.gym_env:GlimpseCaptionsEnv", 64),
    "rl_attn/GlimpseDigits-v0": ("rl_attn.envs.gym_digits:GlimpseDigitsEnv", None),
}


def register_envs() -> None:
    """Register every id of :data:`GYM_ENVS` with Gymnasium; ids already registered are left
    as they are, so calling it again (or after a reload) is harmless."""
    import gymnasium as gym

    for env_id, (entry_point, max_steps) in GYM_ENVS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point, max_episode_steps=max_steps)


register_envs()
