"""The ablation of hard attention learned from reward alone, one row per change.

    python benchmarks/rl_ablation.py                         # every variant, seed 0
    python benchmarks/rl_ablation.py --variants gamma0,random --seeds 0,1,2

Each variant is the default run (`python -m rl_attn.train`) with a few overrides, trained for
1500 updates unless it sets its own budget;
each runs in its own process, alone (time nothing while another job runs). Rows are appended to
``benchmarks/runs/ablation/results.jsonl`` and printed as a markdown table: BLEU-4 of the final
beam and greedy decodings, attention correctness (of the beam decoding), updates and training
seconds. A finished run
(its ``metrics.json`` exists) is read, not trained again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# The controls every claim stands beside, then the changes tried on pure REINFORCE.
VARIANTS: dict[str, list[str]] = {
    "soft": ["agent=soft"],
    "no_attention": ["agent=no_attention"],
    "random": ["agent=random"],
    "soft_argmax": [  # the soft-trained map read out by argmax: no policy gradient at all
        "agent=reinforce_xu", "agent.soft_warmup_steps=1500", "agent.soft_warmup_hold=1",
        "agent.test_mode=argmax",
    ],
    "xu_frozen_policy": [  # Xu's warm-up, then sampled glimpses with the policy frozen
        "agent=reinforce_xu", "agent.expected_context_prob=0", "agent.policy_coef=0",
    ],
    "reinforce_xu": ["agent=reinforce_xu"],
    # pure REINFORCE before gamma=0
    "reinforce_gamma1": [
        "agent=reinforce", "agent.branch=episode", "agent.gamma=1",
    ],
    # agent=reinforce's default since 2026-11-30
    "gamma0": [
        "agent=reinforce", "agent.branch=episode", "agent.gamma=0",
    ],
    "gamma0_policy_lr3": [
        "agent=reinforce", "agent.branch=episode", "agent.gamma=0", "agent.policy_lr_scale=3",
    ],
    "gamma0_policy_lr10": [
        "agent=reinforce", "agent.branch=episode", "agent.gamma=0", "agent.policy_lr_scale=10",
    ],
    "gamma0_temperature0.5": [
        "agent=reinforce", "agent.branch=episode", "agent.gamma=0", "agent.temperature=0.5",
    ],
    "gamma0_temperature0.25": [
        "agent=reinforce", "agent.branch=episode", "agent.gamma=0", "agent.temperature=0.25",
    ],
    "gamma0_temperature0.1": [
        "agent=reinforce", "agent.branch=episode", "agent.gamma=0", "agent.temperature=0.1",
    ],
    "gamma0_ppo2_equal_time": [  # two PPO epochs per batch, in the default run's training time
        "agent=ppo", "agent.gamma=0", "agent.epochs=2", "trainer.max_time_s=200",
        "trainer.max_steps=1000000",
    ],
    "gamma0_rloo4": [
        "agent=reinforce", "agent.branch=episode", "agent.gamma=0", "agent.baseline=leave_one_out",
        "agent.samples_per_image=4",
    ],
    "gamma0_reward_correct": [
        "agent=reinforce", "agent.branch=episode", "agent.gamma=0", "agent.reward=correct",
    ],
    # on today's default (gamma 0, temperature 0.25):
    "rloo2": [
        "agent=reinforce", "agent.branch=episode", "agent.baseline=leave_one_out",
        "agent.samples_per_image=2",
    ],
    "rloo2_batch32": [
        "agent=reinforce", "agent.branch=episode", "agent.baseline=leave_one_out",
        "agent.samples_per_image=2",
        "trainer.batch_size=32",
    ],
    "attached_policy_input": [
        "agent=reinforce", "agent.branch=episode", "agent.detach_policy_input=false",
    ],
    # the samples of an image branch at every word (a vine), leave-one-out per word:
    "word_branches4": [
        "agent=reinforce", "agent.branch=word", "agent.baseline=leave_one_out",
        "agent.samples_per_image=4",
    ],
    "word_branches4_probe_caption": [
        "agent=reinforce", "agent.branch=word", "agent.baseline=leave_one_out",
        "agent.samples_per_image=4", "agent.probe_caption=true",
    ],
    "word_branches4_220s": [
        "agent=reinforce", "agent.branch=word", "agent.baseline=leave_one_out",
        "agent.samples_per_image=4", "trainer.max_time_s=220", "trainer.max_steps=1000000",
    ],
    "word_branches2_220s": [
        "agent=reinforce", "agent.branch=word", "agent.baseline=leave_one_out",
        "agent.samples_per_image=2", "trainer.max_time_s=220", "trainer.max_steps=1000000",
    ],
    "word_branches4_batch32_220s": [
        "agent=reinforce", "agent.branch=word", "agent.baseline=leave_one_out",
        "agent.samples_per_image=4", "trainer.batch_size=32", "trainer.max_time_s=220",
        "trainer.max_steps=1000000",
    ],
    # credit from later words through a critic: GAE(lambda) over the value head
    "gae_gamma0.9_lambda0.9": [
        "agent=reinforce", "agent.branch=episode", "agent.gamma=0.9", "agent.gae_lambda=0.9",
    ],
    "gae_gamma0.9_lambda0.5": [
        "agent=reinforce", "agent.branch=episode", "agent.gamma=0.9", "agent.gae_lambda=0.5",
    ],
    # the default budget since 2026-11-30: 240 s of training
    "reinforce_240s": ["agent=reinforce", "agent.branch=episode", "trainer.max_time_s=240"],
    "soft_240s": ["agent=soft", "trainer.max_time_s=240"],
    # the self-critical baseline: each image's second path reads the argmax (64 episodes per update)
    "self_critical_240s": [
        "agent=reinforce", "agent.branch=episode", "agent.baseline=self_critical",
        "agent.samples_per_image=2", "trainer.batch_size=32", "trainer.max_time_s=240",
    ],
    "gumbel": ["agent=gumbel"],
    # two or four cells read per word (k distinct draws from the policy, the glimpse their mean)
    "k2_240s": [
        "agent=reinforce", "agent.branch=episode", "agent.cells_per_step=2",
        "trainer.max_time_s=240",
    ],
    "k4_240s": [
        "agent=reinforce", "agent.branch=episode", "agent.cells_per_step=4",
        "trainer.max_time_s=240",
    ],
    # every cell's reward at every word: the exact mean of the policy gradient over the cell
    "all_cells_240s": ["agent=reinforce", "agent.branch=all", "agent.baseline=none",
                       "trainer.max_time_s=240"],
    "all_cells": ["agent=reinforce", "agent.branch=all", "agent.baseline=none"],
    # the 8 most probable cells scored and one drawn from the rest (sum-and-sample)
    "top8_240s": ["agent=reinforce", "agent.branch=all", "agent.baseline=none",
                  "agent.scored_cells=8", "trainer.max_time_s=240"],
    "top8": ["agent=reinforce", "agent.branch=all", "agent.baseline=none", "agent.scored_cells=8"],
    "top4_240s": ["agent=reinforce", "agent.branch=all", "agent.baseline=none",
                  "agent.scored_cells=4", "trainer.max_time_s=240"],
    # reinforce_240s again, beside the branch=all rows (this machine's speed drifts by the hour)
    "reinforce_240s_again": ["agent=reinforce", "agent.branch=episode", "trainer.max_time_s=240"],
    "top8_attached_240s": ["agent=reinforce", "agent.branch=all", "agent.baseline=none",
                           "agent.scored_cells=8", "agent.detach_policy_input=false",
                           "trainer.max_time_s=240"],
    "top4_policy_lr3_240s": ["agent=reinforce", "agent.branch=all", "agent.baseline=none",
                             "agent.scored_cells=4", "agent.policy_lr_scale=3",
                             "trainer.max_time_s=240"],
    # the default since 2026-12-01 (agent.branch=auto: 4 + 1 scored cells over the grid),
    # exactly as a user runs it, and the controls in the same 240 s:
    "default_240s": ["trainer.max_time_s=240"],
    "random_240s": ["agent=random", "trainer.max_time_s=240"],
    "no_attention_240s": ["agent=no_attention", "trainer.max_time_s=240"],
    "gumbel_240s": ["agent=gumbel", "trainer.max_time_s=240"],
    "default_temperature0.5_240s": ["agent.temperature=0.5", "trainer.max_time_s=240"],
    "default_scored2_240s": ["agent.scored_cells=2", "trainer.max_time_s=240"],
}  # fmt: skip

OUT = Path(__file__).resolve().parent / "runs" / "ablation"


def budget(overrides: list[str]) -> list[str]:
    """1500 updates, the budget every row here was measured with (the default run's budget
    became 240 s of training on 2026-11-30), unless the overrides set a budget themselves."""
    pins = {"trainer.max_steps": "1500", "trainer.max_time_s": "null"}
    if any(o.split("=")[0] in pins for o in overrides):
        return []
    return [f"{key}={value}" for key, value in pins.items()]


def run(name: str, seed: int, extra: list[str]) -> dict:
    run_dir = OUT / f"{name}_s{seed}"
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        cmd = [sys.executable, "-m", "rl_attn.train", *VARIANTS[name], *extra,
               *budget(VARIANTS[name] + extra), f"trainer.seed={seed}", "eval.meteor=false",
               "trainer.progress=false", f"hydra.run.dir={run_dir}"]  # fmt: skip
        print(" ".join(cmd[1:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    m = json.loads(metrics.read_text())
    test = m[m["split"]][m["decoding"]]
    row = {
        "variant": name,
        "seed": seed,
        "overrides": VARIANTS[name] + extra,
        "BLEU-4": round(test["BLEU-4"], 3),
        "BLEU-4 greedy": round(m[m["split"]]["greedy"]["BLEU-4"], 3),
        "attention_correctness": round(test["attention_correctness"], 3),
        "train_time_s": m["train_time_s"],
        "steps": m["steps"],
        "run_dir": str(run_dir),
    }
    with (OUT / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides given to every run")
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    rows = [run(n, int(s), args.extra) for n in names for s in args.seeds.split(",")]
    print(
        "| variant | seed | BLEU-4 (beam 3) | BLEU-4 (greedy) | attention correctness | updates "
        "| train s |"
    )
    print("|-|-|-|-|-|-|-|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['seed']} | {r['BLEU-4']:.3f} | {r['BLEU-4 greedy']:.3f} | "
            f"{r['attention_correctness']:.3f} | {r['steps']} | {r['train_time_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
