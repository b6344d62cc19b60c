"""SB3 PPO on ``rl_attn/GlimpseCaptions-v0``, against the same PPO with random glimpses.

    python benchmarks/ppo_glimpse.py [--steps 100000] [--episodes 300] [--seed 0]

Both agents are SB3's PPO with ``MultiInputPolicy``, unchanged. The control wraps the environment
so that whatever cell the policy asks for, a uniformly random cell is read; if learned glimpses
help, the first agent captions better. Prints words correct per episode (deterministic policy,
held-out scenes) for both and for uniformly random actions.
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np

import rl_attn.envs  # noqa: F401  (registers the ids)


class RandomGlimpses(gym.ActionWrapper):
    """Replaces the cell of every action by a uniformly random one."""

    def action(self, action: np.ndarray) -> np.ndarray:
        action = np.array(action, copy=True)
        action[0] = self.np_random.integers(self.unwrapped.num_cells)
        return action


def evaluate(env: gym.Env, policy, episodes: int, seed: int) -> tuple[float, float]:
    """Mean correct words per episode and mean fraction of words correct."""
    totals, fractions = [], []
    for i in range(episodes):
        obs, info = env.reset(seed=seed + i)
        n_words = len(info["caption"].split()) + 1
        done, total = False, 0.0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs))
            total += reward
            done = terminated or truncated
        totals.append(total)
        fractions.append(total / n_words)
    return float(np.mean(totals)), float(np.mean(fractions))


def main() -> None:
    from stable_baselines3 import PPO

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    def make(random_glimpses: bool, split: str) -> gym.Env:
        env = gym.make("rl_attn/GlimpseCaptions-v0", split=split)
        return RandomGlimpses(env) if random_glimpses else env

    rows = []
    for name, random_glimpses in (("PPO, learned glimpses", False), ("PPO, random glimpses", True)):
        start = time.perf_counter()
        model = PPO("MultiInputPolicy", make(random_glimpses, "train"), seed=args.seed, verbose=0)
        model.learn(total_timesteps=args.steps)
        seconds = time.perf_counter() - start
        test_env = make(random_glimpses, "test")
        test_env.action_space.seed(args.seed)

        def policy(obs, model=model):
            return model.predict(obs, deterministic=True)[0]

        words, share = evaluate(test_env, policy, args.episodes, 10_000)
        rows.append((name, words, share, seconds))
    env = make(False, "test")
    env.action_space.seed(args.seed)
    words, share = evaluate(env, lambda o: env.action_space.sample(), args.episodes, 10_000)
    rows.append(("uniformly random actions", words, share, 0.0))

    print(f"{args.steps} PPO steps each, {args.episodes} test episodes\n")
    print("| agent | correct words / episode | share of words correct | train s |\n|-|-|-|-|")
    for name, words, share, seconds in rows:
        print(f"| {name} | {words:.2f} | {share:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
