"""What an agent costs at inference: FLOPs split by part, cells read, latency, peak memory.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix multiplies and
convolutions (``2 * M * N * K``) and nothing else; gathers, softmax and element-wise ops count
zero. Every weighted sum of glimpses is a matmul inside a module (the sensor's ``reader``), so
it is counted, and each count is attributed to the module that ran it:

* ``encoder``: the encoder (over the whole image for ``sensor=grid``, over each patch read for
  ``sensor=patch``) and the sensor's own layers (the gist, the scale combiner);
* ``attention``: the decoder's attention MLP (``att_*``) and the weighted sums of glimpses;
* ``decoder``: the rest of the decoder (LSTM, gate, output layers, initial state);
* ``other``: anything else an agent computes (a custom agent's own modules).

Peak memory is the CUDA allocator's peak on a GPU; on a CPU it is the most bytes held at once
by the tensors the decoding creates (tracked through a dispatch mode), not counting the weights
and the input images.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from rl_attn.agents.base import Agent
from rl_attn.vocab import Vocabulary

PARTS = ("encoder", "attention", "decoder", "other")


class _Probe(nn.Module):
    """Runs a function of the agent as a module's ``forward``, so the FLOP counter names every
    submodule by its path in the agent (``_Probe.agent.decoder.lstm``)."""

    def __init__(self, agent: Agent, fn: Callable[[Agent], Any]):
        super().__init__()
        self.agent = agent
        self.fn = fn

    def forward(self) -> Any:
        return self.fn(self.agent)


def _part(name: str) -> str | None:
    """The part whose count a module path carries, for exactly one path per FLOP: the
    encoder itself, the sensor's and the decoder's children, the agent's other children.
    ``None`` for every other path (containers and modules inside those)."""
    parts = name.split(".")[2:]  # drop "_Probe.agent"
    if parts == ["encoder"]:
        return "encoder"
    if len(parts) == 2 and parts[0] == "sensor":
        return "attention" if parts[1] == "reader" else "encoder"
    if len(parts) == 2 and parts[0] == "decoder":
        return "attention" if parts[1].startswith("att_") else "decoder"
    if len(parts) == 1 and parts[0] not in ("sensor", "decoder"):
        return "other"
    return None


def flop_split(
    agent: Agent,
    images: torch.Tensor,
    max_len: int = 24,
    tokens: torch.Tensor | None = None,
    episode: tuple[int, torch.Tensor] | None = None,
) -> dict[str, float]:
    """FLOPs per image of decoding ``images`` greedily (or of a teacher-forced rollout of
    ``tokens``, which fixes the number of steps; or, with ``episode = (glimpses, class
    tokens)``, of classification episodes), split into :data:`PARTS`, plus ``total``.

    The agent is put in eval mode (test-time choice of locations) and restored after.
    """
    was_training = agent.training
    agent.eval()

    def run(a: Agent) -> Any:
        with torch.no_grad():
            if tokens is not None:
                return a.rollout(images, tokens)
            return _infer(a, images, max_len, episode)

    counter = FlopCounterMode(display=False)
    try:
        with counter:
            _Probe(agent, run)()
    finally:
        agent.train(was_training)
    counts = counter.get_flop_counts()
    split = dict.fromkeys(PARTS, 0.0)
    for name, ops in counts.items():
        part = _part(name) if name.startswith("_Probe.agent.") else None
        if part is not None:
            split[part] += float(sum(ops.values()))
    total = float(sum(counts.get("Global", {}).values()))
    split["other"] += total - sum(split.values())
    n = images.shape[0]
    result = {k: v / n for k, v in split.items()}
    result["total"] = total / n
    return result


class PeakMemory(TorchDispatchMode):
    """Most bytes held at once by tensors created inside the ``with`` block (CPU or any
    device): a tensor's storage counts from the op that made it until its last Python
    reference is gone."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, references]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse and other storage-less tensors
            return
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0:
            return
        entry = self.live.get(key)
        if entry is None:
            if key in inputs:  # a view of a tensor from before the block (weights, inputs)
                return
            self.live[key] = [size, 1]
            self.current += size
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        inputs = set()
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                inputs.add(t.untyped_storage().data_ptr())
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t, inputs)
        return out


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of memory ``fn`` allocates beyond what exists before it runs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with PeakMemory() as tracker:
        fn()
    return tracker.peak


def _seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_cost(
    agent: Agent,
    images: torch.Tensor,
    max_len: int = 24,
    large_batch: int = 100,
    single_images: int = 10,
    repeats: int = 3,
    episode: tuple[int, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Inference cost of greedy decoding (or of classification episodes, with ``episode =
    (glimpses, class tokens)``), per image.

    Args:
        images: test images ``(N, 3, H, W)`` on the agent's device (``N >= large_batch``).
        large_batch: the batch for FLOPs, cells read, batched latency and peak memory.
        single_images: images decoded one at a time for the batch-1 latency.
        repeats: timed runs per latency (the median is kept).
    Returns:
        ``flops_<part>`` and ``flops_total`` (per image), ``cells_read`` and ``words`` (per
        image), ``latency_b1_ms``, ``latency_batch_ms`` (per image at ``large_batch``),
        ``peak_memory_mb`` (decoding ``large_batch`` images), ``parameters``.
    """
    device = images.device
    was_training = agent.training
    agent.eval()
    batch = images[:large_batch]
    # a frozen encoder's feature cache would turn encoder work into file reads: measure without
    cache = getattr(agent.encoder, "cache", None)
    if cache is not None:
        agent.encoder.cache = None
    try:
        flops = flop_split(agent, batch, max_len, episode=episode)
        with torch.no_grad():
            out = _infer(agent, batch, max_len, episode)
            if episode is None:
                words = _words(out.tokens)
            else:  # every glimpse of an episode reads
                words = torch.ones(out.weights.shape[:2], dtype=torch.bool, device=device)
            reads = (out.weights > 0).sum(dim=2) * words  # (B, T) cells read per emitted word
            cells_read = float(reads.sum()) / batch.shape[0]
            n_words = float(words.sum()) / batch.shape[0]

            def decode_batch() -> Any:
                return _infer(agent, batch, max_len, episode)

            batched = _seconds(decode_batch, device, repeats) / batch.shape[0]
            singles = [
                _seconds(
                    lambda i=i: _infer(agent, images[i : i + 1], max_len, episode), device, repeats
                )
                for i in range(min(single_images, images.shape[0]))
            ]
            peak = peak_memory_bytes(decode_batch, device)
    finally:
        agent.train(was_training)
        if cache is not None:
            agent.encoder.cache = cache
    result = {f"flops_{k}": v for k, v in flops.items()}
    result.update(
        cells_read=cells_read,
        words=n_words,
        latency_b1_ms=1000 * statistics.mean(singles),
        latency_batch_ms=1000 * batched,
        peak_memory_mb=peak / 2**20,
        parameters=float(sum(p.numel() for p in agent.parameters())),
    )
    return result


def _infer(
    agent: Agent,
    images: torch.Tensor,
    max_len: int,
    episode: tuple[int, torch.Tensor] | None,
) -> Any:
    """Greedy captions, or classification episodes when ``episode`` is given."""
    if episode is None:
        return agent.caption(images, max_len=max_len, beam_size=1)
    return agent.classify(images, *episode)


def _words(tokens: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` mask of the decoding steps that emitted a word, ``<end>`` included: every
    such step read glimpses."""
    is_end = (tokens == Vocabulary.end).long()
    return (is_end.cumsum(dim=1) - is_end) == 0
