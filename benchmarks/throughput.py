"""Training throughput of every agent on the same model, batch and machine, in one run.

    python benchmarks/throughput.py [--batch-size 64] [--steps 40] [--rounds 3] [--agents A,B]
                                    [HYDRA_OVERRIDE ...]   # e.g. sensor=patch encoder=glimpse

Agents are timed in alternating rounds (soft, reinforce, ..., soft, ...) so that a slow
patch of the machine hits all of them; the median step time of each agent is reported, and the
ratio to soft. Also measures the environments' step rates. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import numpy as np
import torch
from hydra import compose, initialize_config_module

import rl_attn.envs  # noqa: F401  (registers the Gymnasium ids)
from rl_attn.build import build_agent
from rl_attn.envs.glimpse import GlimpseCaptionVectorEnv
from rl_attn.scenes import SceneCaptions
from rl_attn.vocab import Vocabulary

# name -> the overrides that make it; Xu et al.'s recipe is timed in its soft warm-up (expected
# context plus a sample). agent=reinforce is REINFORCE alone, one cell read per word: over the
# grid it scores 4 + 1 cells per word (branch=auto settles on all), over patches it is the
# episode estimator; reinforce_branch_episode is the grid's default until 2026-12-01.
AGENTS = {
    "soft": ["agent=soft"],
    "reinforce": ["agent=reinforce"],
    "reinforce_branch_episode": ["agent=reinforce", "agent.branch=episode"],
    "reinforce_branch_word4": [  # 4 samples per image branching at every word (an option)
        "agent=reinforce",
        "agent.branch=word",
        "agent.baseline=leave_one_out",
        "agent.samples_per_image=4",
    ],
    "reinforce_branch_all": [  # every cell's reward at every word (an option)
        "agent=reinforce",
        "agent.branch=all",
        "agent.baseline=none",
        "agent.scored_cells=null",
    ],
    "reinforce_branch_all_top8": [  # the 8 most probable cells and one drawn (sum-and-sample)
        "agent=reinforce",
        "agent.branch=all",
        "agent.baseline=none",
        "agent.scored_cells=8",
    ],
    "reinforce_branch_all_top2": [  # the 2 most probable cells and one drawn
        "agent=reinforce",
        "agent.scored_cells=2",
    ],
    "reinforce_xu, warm-up phase": ["agent=reinforce_xu", "agent.soft_warmup_steps=1000000"],
    "gumbel": ["agent=gumbel"],
    "random": ["agent=random"],
    "no_attention": ["agent=no_attention"],
}


def make(agent: list[str], vocab_size: int, overrides: list[str]):
    with initialize_config_module(config_module="rl_attn.configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*agent, *overrides])
    torch.manual_seed(0)
    model = build_agent(cfg, vocab_size)
    return model, torch.optim.Adam(model.parameters(), lr=cfg.trainer.lr)


def train_steps(model, opt, batches) -> float:
    start = time.perf_counter()
    for images, tokens in batches:
        loss, _ = model.loss(images, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / len(batches)


def vector_env_rate(batch: int, steps: int) -> float:
    """Steps/s of the batched env (each step = ``batch`` episodes advance) with hard actions."""
    env = GlimpseCaptionVectorEnv(64, 128, 25, max_words=steps)
    grid = torch.randn(batch, 64, 128)
    tokens = torch.randint(4, 25, (batch, steps + 1))
    env.reset(options={"grid": grid, "tokens": tokens})
    logits = torch.randn(batch, 25)
    cells = torch.randint(0, 64, (batch,))
    start = time.perf_counter()
    env.step({"location": cells, "prediction": None})
    for _ in range(steps - 1):
        env.step({"location": cells, "prediction": logits})
    return steps / (time.perf_counter() - start)


def gym_env_rate(steps: int) -> float:
    env = gym.make("rl_attn/GlimpseCaptions-v0")
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = [env.action_space.sample() for _ in range(64)]
    start = time.perf_counter()
    for i in range(steps):
        _, _, terminated, truncated, _ = env.step(actions[i % 64])
        if terminated or truncated:
            env.reset(seed=int(rng.integers(1 << 30)))
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--agents", default=",".join(AGENTS), help="comma-separated names (soft is always timed)"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every agent")
    args = parser.parse_args()
    names = ["soft", *[a for a in args.agents.split(",") if a and a != "soft"]]
    unknown = [a for a in names if a not in AGENTS]
    if unknown:
        parser.error(f"unknown agent(s) {', '.join(unknown)}; choose from {', '.join(AGENTS)}")

    data = SceneCaptions("train", args.batch_size * args.steps, seed=0)
    vocab = Vocabulary.build(data.captions)
    tokens, lengths = vocab.encode_batch(data.captions)
    batches = []
    for i in range(args.steps):
        idx = torch.arange(i * args.batch_size, (i + 1) * args.batch_size)
        n = int(lengths[idx].max())
        batches.append((data.images[idx], tokens[idx, :n]))

    models = {name: make(AGENTS[name], len(vocab), args.overrides) for name in names}
    for model, opt in models.values():
        train_steps(model, opt, batches[:3])  # warm-up
    times: dict[str, list[float]] = {a: [] for a in names}
    for _ in range(args.rounds):
        for agent, (model, opt) in models.items():
            times[agent].append(train_steps(model, opt, batches))
    rate = {a: args.batch_size / statistics.median(t) for a, t in times.items()}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    print("\n| agent | training samples/s | ratio to soft |\n|-|-|-|")
    for agent in names:
        print(f"| {agent} | {rate[agent]:.0f} | {rate[agent] / rate['soft']:.3f} |")
    print("\n| environment | steps/s | samples/s |\n|-|-|-|")
    v = vector_env_rate(args.batch_size, 16)
    b = args.batch_size
    print(f"| GlimpseCaptionVectorEnv, batch {b} | {v:.0f} | {v * b:.0f} |")
    g = gym_env_rate(20000)
    print(f"| rl_attn/GlimpseCaptions-v0 (single Env) | {g:.0f} | {g:.0f} |")


if __name__ == "__main__":
    main()
