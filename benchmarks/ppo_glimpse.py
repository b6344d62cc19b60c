"""SB3 PPO on ``rl_attn/GlimpseCaptions-v0``, against the same PPO with random glimpses.

    python benchmarks/ppo_glimpse.py [--steps 100000] [--episodes 300] [--seed 0]
        [--grid 8] [--window PIXELS] [--gist 4] [--grey-gist] [--objects 3] [--envs 1]
        [--lr 3e-4] [--n-steps 2048] [--batch-size 64] [--ent-coef 0] [--gamma 0.99]

Both agents are SB3's PPO with ``MultiInputPolicy``, unchanged (the hyperparameter options
default to SB3's defaults). The control wraps the environment so that whatever cell the policy
asks for, a uniformly random cell is read; if learned glimpses help, the first agent captions
better. Prints words correct per episode (deterministic policy, held-out scenes) for both and
for uniformly random actions, and how often each agent's glimpse for a size, colour or shape word
showed part of that word's object.
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np

import rl_attn.envs  # noqa: F401  (registers the ids)
from rl_attn.scenes import WORD_KINDS


class RandomGlimpses(gym.ActionWrapper):
    """Replaces the cell of every action by a uniformly random one."""

    def action(self, action: np.ndarray) -> np.ndarray:
        action = np.array(action, copy=True)
        action[0] = self.np_random.integers(self.unwrapped.num_cells)
        return action


def on_object(env: gym.Env, cell: int, box: tuple[int, int, int, int]) -> bool:
    """Whether the glimpse aimed at ``cell`` of ``env``'s grid shows part of ``box``."""
    left, top, right, bottom = env.unwrapped.window_box(cell)
    x0, y0, x1, y1 = box
    return x0 < right and left < x1 and y0 < bottom and top < y1


def evaluate(env: gym.Env, policy, episodes: int, seed: int) -> tuple[float, float, float]:
    """Mean correct words per episode, mean fraction of words correct, and the share of size,
    colour and shape words whose glimpse showed part of the object they name."""
    totals, fractions, hits = [], [], []
    for i in range(episodes):
        obs, info = env.reset(seed=seed + i)
        words = info["caption"].split()
        done, total, t, obj = False, 0.0, 0, -1
        while not done:
            action = policy(obs)
            if t > 0 and t <= len(words):  # this step guesses words[t - 1] from this glimpse
                obj += words[t - 1] == "a"
                if words[t - 1] in WORD_KINDS:
                    hits.append(on_object(env, int(obs["location"]), info["boxes"][obj]))
            obs, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated
            t += 1
        totals.append(total)
        fractions.append(total / (len(words) + 1))
    return float(np.mean(totals)), float(np.mean(fractions)), float(np.mean(hits))


def main() -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=int, default=8, help="cells per image side")
    parser.add_argument("--window", type=int, default=None, help="glimpse side in pixels")
    parser.add_argument("--gist", type=int, default=4, help="side of the colour gist")
    parser.add_argument("--objects", type=int, default=3, help="at most this many per scene")
    parser.add_argument("--grey-gist", action="store_true", help="the gist shows brightness only")
    parser.add_argument("--envs", type=int, default=1, help="environments PPO steps together")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--n-steps", type=int, default=2048, help="steps per env per rollout")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ent-coef", type=float, default=0.0)
    parser.add_argument("--gamma", type=float, default=0.99)
    args = parser.parse_args()
    ppo_options = {
        "learning_rate": args.lr,
        "n_steps": args.n_steps,
        "batch_size": args.batch_size,
        "ent_coef": args.ent_coef,
        "gamma": args.gamma,
    }

    def make(random_glimpses: bool, split: str) -> gym.Env:
        env = gym.make(
            "rl_attn/GlimpseCaptions-v0",
            split=split,
            grid=args.grid,
            window=args.window,
            gist=args.gist,
            max_objects=args.objects,
            gist_colour=not args.grey_gist,
        )
        return RandomGlimpses(env) if random_glimpses else env

    rows = []
    for name, random_glimpses in (("PPO, learned glimpses", False), ("PPO, random glimpses", True)):
        start = time.perf_counter()
        train_env = make_vec_env(
            lambda random_glimpses=random_glimpses: make(random_glimpses, "train"),
            n_envs=args.envs,
            seed=args.seed,
        )
        model = PPO("MultiInputPolicy", train_env, seed=args.seed, verbose=0, **ppo_options)
        model.learn(total_timesteps=args.steps)
        seconds = time.perf_counter() - start
        test_env = make(random_glimpses, "test")
        test_env.action_space.seed(args.seed)

        def policy(obs, model=model):
            return model.predict(obs, deterministic=True)[0]

        rows.append((name, *evaluate(test_env, policy, args.episodes, 10_000), seconds))
    env = make(False, "test")
    env.action_space.seed(args.seed)
    scores = evaluate(env, lambda o: env.action_space.sample(), args.episodes, 10_000)
    rows.append(("uniformly random actions", *scores, 0.0))

    print(f"{args.steps} PPO steps each, {args.episodes} test episodes\n")
    print(
        "| agent | correct words / episode | share of words correct "
        "| glimpses on the named object | train s |\n|-|-|-|-|-|"
    )
    for name, words, share, hits, seconds in rows:
        print(f"| {name} | {words:.2f} | {share:.3f} | {hits:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
