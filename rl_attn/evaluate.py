"""Score a trained checkpoint: ``python -m rl_attn.evaluate checkpoint=PATH [key=value ...]``.

Keys: ``checkpoint`` (a ``.pt`` file or a run directory), ``split`` (test | val), ``beam_size``,
``max_len``, ``batch_size``, ``device``, ``meteor`` (true | false), ``cost`` (true | false: also
measure FLOPs by part, cells read, latency and peak memory of greedy decoding on the first 100
images; see :mod:`rl_attn.cost`), ``test_mode`` (replaces the agent's ``agent.test_mode``: a soft
checkpoint with ``test_mode=argmax`` is the soft-trained map read out by argmax, hard attention's
control), ``output`` (the JSON file to write; by default ``eval_<split>_<decoding>.json``, or
``eval_<split>_<decoding>_<test_mode>.json`` with ``test_mode``, in the checkpoint's run
directory).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rl_attn.agents.base import Agent
from rl_attn.build import build_agent, build_task
from rl_attn.checkpoint import load_checkpoint
from rl_attn.cli import run_cli
from rl_attn.config_checks import resolve_device
from rl_attn.cost import measure_cost
from rl_attn.errors import UserError
from rl_attn.evaluation import evaluate_split
from rl_attn.vocab import Vocabulary

DEFAULTS: dict[str, Any] = {
    "checkpoint": None,
    "split": "test",
    "beam_size": 3,
    "max_len": 24,
    "batch_size": 250,
    "device": "auto",
    "meteor": True,
    "cost": False,
    "test_mode": None,
    "output": None,
}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """``key=value`` arguments over :data:`DEFAULTS`; unknown keys and bad values are errors."""
    for arg in argv:
        key = arg.split("=", 1)[0]
        if "=" not in arg or key not in DEFAULTS:
            raise UserError(
                f"unexpected argument {arg!r}; use key=value with keys: {', '.join(DEFAULTS)}"
            )
    try:
        args = {**DEFAULTS, **OmegaConf.to_container(OmegaConf.from_dotlist(argv))}
    except OmegaConfBaseException as exc:
        raise UserError(f"cannot parse arguments: {exc}") from None
    if not args["checkpoint"]:
        raise UserError("checkpoint=PATH is required (a .pt file or a run directory)")
    for key in ("meteor", "cost"):
        if not isinstance(args[key], bool):
            raise UserError(f"{key} must be true or false, got {args[key]!r}")
    if args["split"] not in ("test", "val"):
        raise UserError(f"split must be test or val, got {args['split']!r}")
    for key in ("beam_size", "max_len", "batch_size"):
        if not isinstance(args[key], int) or isinstance(args[key], bool) or args[key] <= 0:
            raise UserError(f"{key} must be a positive integer, got {args[key]!r}")
    return args


def load_trained(
    checkpoint: str | Path, device: torch.device, test_mode: str | None = None
) -> tuple[Agent, DictConfig, Vocabulary, dict[str, Any]]:
    """The agent a checkpoint holds, in eval mode on ``device``, with its config, vocabulary
    and the whole payload (``weights_only`` loading: see :mod:`rl_attn.checkpoint`);
    ``test_mode`` replaces the config's ``agent.test_mode``."""
    payload = load_checkpoint(checkpoint)
    cfg = OmegaConf.create(payload["config"])
    if test_mode is not None:
        cfg.agent.test_mode = test_mode
    if "weights_path" in cfg.encoder:  # the checkpoint holds the weights; the file may be gone
        cfg.encoder.weights_path = None
    if cfg.encoder.get("_target_") == "rl_attn.encoder.ConvEncoder":
        cfg.encoder.setdefault("out_coords", False)  # trained before the option existed
    vocab = Vocabulary(payload["vocab"])
    agent = build_agent(cfg, len(vocab))
    try:
        agent.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise UserError(
            f"checkpoint weights do not fit the model its config builds: {exc}"
        ) from None
    agent.to(device).eval()
    return agent, cfg, vocab, payload


def evaluate(args: dict[str, Any]) -> dict[str, Any]:
    """Load the checkpoint, decode the split, score it, write the JSON; return the result."""
    device = resolve_device(args["device"], key="device")
    agent, cfg, vocab, payload = load_trained(args["checkpoint"], device, args["test_mode"])
    data = build_task(cfg)[args["split"]]
    grid_hw = agent.grid_shape(data.images.shape[-1])
    metrics, captions, _ = evaluate_split(
        agent, data, vocab, grid_hw, args["beam_size"], args["max_len"], args["batch_size"],
        device, with_meteor=bool(args["meteor"]),
    )  # fmt: skip
    decoding = "greedy" if args["beam_size"] == 1 else f"beam{args['beam_size']}"
    result = {
        "checkpoint": str(args["checkpoint"]),
        "step": payload["step"],
        "agent": cfg.agent._target_,
        "split": args["split"],
        "decoding": decoding,
        "test_mode": cfg.agent.get("test_mode"),
        "metrics": metrics,
        "cost": measure_cost(agent, data.images[:100].to(device), args["max_len"])
        if args["cost"]
        else None,
        "samples": [
            {"generated": c, "references": data.references[i]} for i, c in enumerate(captions[:5])
        ],
    }
    output = args["output"]
    if output is None:
        ckpt = Path(args["checkpoint"]).expanduser()
        run_dir = ckpt if ckpt.is_dir() else ckpt.parent
        run_dir = run_dir.parent if run_dir.name == "checkpoints" else run_dir
        mode = f"_{args['test_mode']}" if args["test_mode"] is not None else ""
        output = run_dir / f"eval_{args['split']}_{decoding}{mode}.json"
    try:
        Path(output).write_text(json.dumps(result, indent=2))
    except OSError as exc:
        raise UserError(f"cannot write the results to {str(output)!r}: {exc.strerror}") from None
    result["output"] = str(output)
    return result


def main(argv: list[str] | None = None) -> None:
    args = run_cli(parse_args, sys.argv[1:] if argv is None else argv)
    torch.set_grad_enabled(False)
    result = run_cli(evaluate, args)
    mode = f", test_mode {result['test_mode']}" if result["test_mode"] else ""
    print(
        f"{result['agent']} step {result['step']}, {result['split']} split, "
        f"{result['decoding']}{mode}"
    )
    for k, v in result["metrics"].items():
        print(f"  {k:<22} {v:.4f}")
    for k, v in (result["cost"] or {}).items():
        print(f"  {k:<22} {v:,.4g}")
    print(f"written to {result['output']}")


if __name__ == "__main__":
    main()
