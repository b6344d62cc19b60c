"""Data-parallel training under ``torchrun``: one process per device, gradients averaged.

    torchrun --nproc-per-node=2 -m rl_attn.train agent=reinforce     # 2 CPU processes (gloo)
    torchrun --nproc-per-node=4 -m rl_attn.train trainer.device=cuda # 4 GPUs (NCCL)

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`init_from_env` joins the
process group (gloo for CPU tensors, NCCL for CUDA tensors when CUDA is present). The choices
this module makes, so that N processes behave like one process with the same global batch:

* ``trainer.batch_size`` is the *global* batch. Every rank draws the same permutation of the
  training set and takes every N-th image of each global batch (a distributed sampler).
* Every rank starts from rank 0's weights (:func:`broadcast_module`), and after every backward
  pass the gradients are averaged over the ranks (:func:`average_gradients`, called by the
  trainer's optimiser step). That is what DistributedDataParallel does, done by hand so that an
  agent's update may run several forward and backward passes per batch (PPO epochs) in any
  order.
* Losses are normalised by *global* counts (:func:`mean_count`): a rank's loss is its sum
  divided by the global word count over N, so the gradient average equals the gradient of the
  global-batch mean. Advantage normalisation and the moving-average baseline use statistics
  reduced over all ranks (:func:`all_sum`), so every rank sees the same baseline.
* BatchNorm statistics are computed per rank and rank 0's buffers are broadcast before each
  step (:func:`broadcast_buffers`); that is the one place N processes differ from one.
* Each rank seeds its sampling RNG with ``seed + rank``, so ranks draw different glimpses.
* Rank 0 alone writes TensorBoard events, checkpoints and results; logged scalars are means
  over ranks.

Outside ``torchrun`` (or with one process) every helper is a no-op, at no cost.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def active() -> bool:
    """Whether this process is one of several in a process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the process that logs and writes files (rank 0; the only one outside torchrun)."""
    return rank() == 0


def launched() -> bool:
    """Whether torchrun (or a compatible launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> bool:
    """Join the process group torchrun describes; return whether training is distributed."""
    if not launched() or not dist.is_available():
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_world_size() > 1


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over all ranks (a new tensor; ``x`` itself is left alone)."""
    if not active():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def mean_count(count: torch.Tensor) -> torch.Tensor:
    """A loss normaliser: the global ``count`` divided by the number of ranks (at least 1).

    ``loss = sum / mean_count(n)`` on each rank, averaged by DDP over ranks, is the global sum
    over the global count: the same gradient as one process with the whole batch.
    """
    return (all_sum(count.float()) / world_size()).clamp(min=1.0)


def broadcast_module(module: torch.nn.Module) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank 0's, in place."""
    if active():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Overwrite the buffers of ``module`` (running statistics, counters) with rank 0's."""
    if active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over the ranks, in one all-reduce. A parameter without
    a gradient on some rank counts as zero there (and gets the mean, so every rank steps the
    same way)."""
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def mean_logs(logs: dict[str, float]) -> dict[str, float]:
    """Each tag's mean over the ranks that logged it."""
    if not active():
        return logs
    merged: dict[str, list[float]] = {}
    for part in gather(logs):
        for k, v in part.items():
            merged.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in merged.items()}
