"""How confident a trained ``branch=all`` agent's policy is, and where its policy gradient is.

    python benchmarks/policy_confidence.py RUN_DIR/checkpoints/last.pt [--scenes 256] [--seed 123]

One training rollout of fresh training scenes (``agent.sample``, the agent in training mode),
then the share of real words whose policy puts more than ``p`` of its mass on one cell, and the
share of the squared norm of the policy term's gradient (``all_cells_policy_loss``,
differentiated with respect to the policy's logits) that those words carry. Words the policy is
sure of add little to the gradient but cost as much to score as any other.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from rl_attn.agents.all_cells import all_cells_policy_loss
from rl_attn.cli import run_cli
from rl_attn.evaluate import load_trained
from rl_attn.scenes import SceneCaptions

THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)


def confidence(checkpoint: str, scenes: int, seed: int) -> list[tuple[float, float, float]]:
    """``(p, share of words with max pi > p, their share of the squared gradient norm)``."""
    agent, _, vocab, _ = load_trained(checkpoint, "cpu", None)
    if getattr(agent, "branch", None) != "all":
        raise SystemExit(f"{checkpoint}: this agent does not score cells (agent.branch=all)")
    agent.train()
    data = SceneCaptions("train", scenes, seed=seed)
    tokens, lengths = vocab.encode_batch(data.captions)
    torch.manual_seed(seed)
    out, _, _ = agent.sample(data.images, tokens[:, : int(lengths.max())], 0.0)
    scored, mask = out.every_cell, out.mask.float()
    logits = scored.log_pi.detach().clone().requires_grad_(True)
    loss, _, _ = all_cells_policy_loss(
        replace(scored, log_pi=logits.log_softmax(2)), mask, mask.sum(), normalize=True
    )
    loss.backward()
    pmax = scored.log_pi.detach().exp().max(dim=2).values[out.mask]
    grad = logits.grad.norm(dim=2)[out.mask] ** 2
    return [
        (p, float((pmax > p).float().mean()), float(grad[pmax > p].sum() / grad.sum()))
        for p in THRESHOLDS
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--scenes", type=int, default=256)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = run_cli(confidence, args.checkpoint, args.scenes, args.seed)
    print("| max pi above | share of words | share of the squared gradient norm |\n|-|-|-|")
    for p, words, grad in rows:
        print(f"| {p} | {words:.3f} | {grad:.3f} |")


if __name__ == "__main__":
    main()
