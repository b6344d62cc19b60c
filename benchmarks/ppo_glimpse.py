"""SB3 PPO on the registered glimpse environments, against the same PPO with random glimpses.

    python benchmarks/ppo_glimpse.py [--env captions|digits] [--steps 300000] [--episodes 500]
        [--seed 0] [--envs 1] [--lr 3e-4] [--n-steps 2048] [--batch-size 64] [--ent-coef 0]
        [--gamma 0.99] [--make KEY=VALUE ...]

``--env captions`` is ``rl_attn/GlimpseCaptions-v0``, ``--env digits`` is
``rl_attn/GlimpseDigits-v0``, each at its defaults unless ``--make KEY=VALUE`` passes
``gym.make`` arguments (``--make window=8 --make gist_colour=false``; integers, floats and
true/false/none are parsed). Both agents are SB3's PPO with ``MultiInputPolicy``, unchanged
(the hyperparameter options default to SB3's defaults). The control wraps the environment so
that whatever cell the policy asks for, a uniformly random cell is read; if learned glimpses
help, the first agent scores higher. Prints, for both and for uniformly random actions, the
return per episode (deterministic policy, held-out episodes), its ratio to the control's, the
share of words or digits right, and how often a glimpse showed the object it is read for: for
captions, the glimpse for a size, colour or shape word overlapping that word's object; for
digits, the centre of a glimpse's cell inside the digit's 28x28 square, and the glimpses' mean
ink (the mean grey level of the finest square read).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

import rl_attn  # noqa: F401  (registers the ids)
from rl_attn.errors import UserError
from rl_attn.scenes import WORD_KINDS

ENV_IDS = {"captions": "rl_attn/GlimpseCaptions-v0", "digits": "rl_attn/GlimpseDigits-v0"}


class RandomGlimpses(gym.ActionWrapper):
    """Replaces the cell of every action by a uniformly random one."""

    def action(self, action: np.ndarray) -> np.ndarray:
        action = np.array(action, copy=True)
        action[0] = self.np_random.integers(self.unwrapped.num_cells)
        return action


def on_object(env: gym.Env, cell: int, box: tuple[int, int, int, int]) -> bool:
    """Whether the caption glimpse aimed at ``cell`` of ``env``'s grid shows part of ``box``."""
    left, top, right, bottom = env.unwrapped.window_box(cell)
    x0, y0, x1, y1 = box
    return x0 < right and left < x1 and y0 < bottom and top < y1


def centre_inside(env: gym.Env, cell: int, box: tuple[int, int, int, int]) -> bool:
    """Whether the centre of digit-grid ``cell`` lies inside ``box``."""
    left, top, right, bottom = env.unwrapped.window_box(cell)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    return box[0] <= cx < box[2] and box[1] <= cy < box[3]


Policy = Callable[[dict[str, Any]], np.ndarray]


def evaluate_captions(env: gym.Env, policy: Policy, episodes: int, seed: int) -> dict[str, float]:
    """Return per episode, share of words right, and the share of size, colour and shape words
    whose glimpse showed part of the object they name."""
    totals, fractions, hits = [], [], []
    for i in range(episodes):
        obs, info = env.reset(seed=seed + i)
        words = info["caption"].split()
        done, total, t, obj = False, 0.0, 0, -1
        while not done:
            action = policy(obs)
            if 0 < t <= len(words):  # this step guesses words[t - 1] from this glimpse
                obj += words[t - 1] == "a"
                if words[t - 1] in WORD_KINDS:
                    hits.append(on_object(env, int(obs["location"]), info["boxes"][obj]))
            obs, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated
            t += 1
        totals.append(total)
        fractions.append(total / (len(words) + 1))
    return {"return": np.mean(totals), "right": np.mean(fractions), "on": np.mean(hits)}


def evaluate_digits(env: gym.Env, policy: Policy, episodes: int, seed: int) -> dict[str, float]:
    """Return per episode, share of digits right (the class step's), the share of glimpses
    whose cell centre lies inside the digit's square, and the glimpses' mean ink: the mean grey
    level of the finest square read (on mnist28 every centre is inside the digit's square, so
    only the ink tells a look at the strokes from a look at the black border)."""
    totals, right, hits, ink = [], [], [], []
    finest = env.unwrapped.glimpse**2
    for i in range(episodes):
        obs, info = env.reset(seed=seed + i)
        done, total = False, 0.0
        while not done:
            obs, reward, terminated, truncated, step_info = env.step(policy(obs))
            total += reward
            done = terminated or truncated
            if not done:
                hits.append(centre_inside(env, int(obs["location"]), info["box"]))
                ink.append(float(obs["glimpse"][:finest].mean()))
        totals.append(total)
        right.append(float(step_info["correct"]))
    return {
        "return": np.mean(totals),
        "right": np.mean(right),
        "on": np.mean(hits),
        "ink": np.mean(ink),
    }


def parse_make(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> ``gym.make`` keyword arguments (ints, floats, bools, None)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--make takes KEY=VALUE, got {item!r}")
        words = {"true": True, "false": False, "none": None, "null": None}
        if text.lower() in words:
            out[key] = words[text.lower()]
            continue
        for kind in (int, float):
            try:
                out[key] = kind(text)
                break
            except ValueError:
                continue
        else:
            out[key] = text
    return out


def check_make(env_id: str, options: dict[str, Any]) -> None:
    """Build the test environment once, so that a bad ``--make`` is one line of error before
    any training, not a traceback."""
    try:
        gym.make(env_id, split="test", **options).close()
    except (TypeError, ValueError, UserError) as exc:  # unknown keyword, refused value or file
        raise SystemExit(f"error: --make {options}: {exc}") from None


def main() -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", choices=sorted(ENV_IDS), default="captions")
    parser.add_argument("--steps", type=int, default=300_000)
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--make", action="append", default=[], metavar="KEY=VALUE")
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
    options = parse_make(args.make)
    evaluate = evaluate_digits if args.env == "digits" else evaluate_captions

    def make(random_glimpses: bool, split: str) -> gym.Env:
        env = gym.make(ENV_IDS[args.env], split=split, **options)
        return RandomGlimpses(env) if random_glimpses else env

    check_make(ENV_IDS[args.env], options)
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

        rows.append((name, evaluate(test_env, policy, args.episodes, 10_000), seconds))
    env = make(False, "test")
    env.action_space.seed(args.seed)
    scores = evaluate(env, lambda o: env.action_space.sample(), args.episodes, 10_000)
    rows.append(("uniformly random actions", scores, 0.0))

    control = rows[1][1]["return"]
    print(f"{ENV_IDS[args.env]} {options}, seed {args.seed}")
    print(f"{args.steps} PPO steps each, {args.episodes} test episodes\n")
    print(
        "| agent | return / episode | / control's | share right "
        "| glimpses on the object | glimpse ink | train s |\n|-|-|-|-|-|-|-|"
    )
    for name, s, seconds in rows:
        ratio = s["return"] / control if control else float("nan")
        ink = f"{s['ink']:.3f}" if "ink" in s else "-"
        print(
            f"| {name} | {s['return']:.3f} | {ratio:.3f} | {s['right']:.3f} | {s['on']:.3f} "
            f"| {ink} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
