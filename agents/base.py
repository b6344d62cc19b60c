"""The agent protocol: an encoder, the shared decoder, and one decision, *where to look*.

A subclass implements :meth:`CaptionAgent.attend` (attention scores -> context) and may add terms
to :meth:`CaptionAgent.loss`. Everything else (teacher-forced rollout, greedy and beam decoding)
is shared, so two agents differ only in how they turn scores into a location.

Shapes: images ``(B, 3, H, W)``; tokens ``(B, T)`` each ``<start> w1 .. wn <end> <pad>..``;
lengths ``(B,)`` counting ``<start>`` and ``<end>``; grid ``(B, L, D)``; vocabulary size ``V``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rl_attn.decoder import Decoder, DecoderState
from rl_attn.encoder import Encoder
from rl_attn.vocab import Vocabulary


@dataclass
class Attention:
    """What an agent read at one step.

    ``context: (B, D)`` is what the decoder receives; ``weights: (B, L)`` is the attention map
    (a distribution over cells: one-hot for hard attention); ``log_prob`` and ``entropy``
    ``(B,)`` are set by agents that sample the location.
    """

    context: torch.Tensor
    weights: torch.Tensor
    log_prob: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


@dataclass
class Rollout:
    """A teacher-forced pass: ``word_logits: (B, T-1, V)`` predicts ``tokens[:, 1:]``;
    ``weights: (B, T-1, L)``; ``mask: (B, T-1)`` is True on real (non-pad) targets;
    ``steps`` keeps each step's :class:`Attention` for agents that need more."""

    word_logits: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor
    steps: list[Attention]


@dataclass
class Captions:
    """Decoded captions: ``tokens: (B, T)`` without ``<start>``, ``<pad>`` after ``<end>``;
    ``weights: (B, T, L)`` the attention map used for each emitted word."""

    tokens: torch.Tensor
    weights: torch.Tensor


class CaptionAgent(nn.Module):
    """Base class of every captioning agent.

    Args:
        encoder: images -> grid ``(B, L, D)``.
        decoder: the shared :class:`~rl_attn.decoder.Decoder`.

    Subclass contract:
        * :meth:`attend` maps ``logits: (B, L)`` and ``grid: (B, L, D)`` to an :class:`Attention`.
          It must read ``self.training`` to tell training from evaluation.
        * :meth:`loss` returns ``(scalar loss to minimise, {name: float} to log)``; the base
          version is the per-word cross-entropy (mean over real target words).
    """

    def __init__(self, encoder: Encoder, decoder: Decoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def attend(self, logits: torch.Tensor, grid: torch.Tensor) -> Attention:
        raise NotImplementedError

    def rollout(self, images: torch.Tensor, tokens: torch.Tensor) -> Rollout:
        """Teacher forcing: feed ``tokens[:, t]`` and predict ``tokens[:, t + 1]``."""
        grid = self.encoder(images)
        state = self.decoder.init_state(grid)
        steps, logits = [], []
        for t in range(tokens.shape[1] - 1):
            att = self.attend(self.decoder.attention_logits(state), grid)
            state, word_logits = self.decoder.step(state, tokens[:, t], att.context)
            steps.append(att)
            logits.append(word_logits)
        return Rollout(
            word_logits=torch.stack(logits, dim=1),
            weights=torch.stack([s.weights for s in steps], dim=1),
            mask=tokens[:, 1:] != Vocabulary.pad,
            steps=steps,
        )

    def loss(
        self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.rollout(images, tokens)
        caption = self.caption_loss(out, tokens)
        return caption, {"losses/total": caption.item(), "losses/caption": caption.item()}

    @staticmethod
    def caption_loss(out: Rollout, tokens: torch.Tensor) -> torch.Tensor:
        """Cross-entropy per real target word, averaged over all of them in the batch."""
        return F.cross_entropy(
            out.word_logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=Vocabulary.pad
        )

    @torch.no_grad()
    def caption(self, images: torch.Tensor, max_len: int = 30, beam_size: int = 1) -> Captions:
        """Decode captions of at most ``max_len`` words (``<end>`` included); greedy when
        ``beam_size == 1``, else beam search keeping the highest total log-probability."""
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        grid = self.encoder(images)
        if beam_size == 1:
            return self._greedy(grid, max_len)
        return self._beam(grid, max_len, beam_size)

    def _greedy(self, grid: torch.Tensor, max_len: int) -> Captions:
        b = grid.shape[0]
        state = self.decoder.init_state(grid)
        word = torch.full((b,), Vocabulary.start, dtype=torch.long, device=grid.device)
        done = torch.zeros(b, dtype=torch.bool, device=grid.device)
        words, weights = [], []
        for _ in range(max_len):
            att = self.attend(self.decoder.attention_logits(state), grid)
            state, logits = self.decoder.step(state, word, att.context)
            word = logits.argmax(dim=1).masked_fill(done, Vocabulary.pad)
            words.append(word)
            weights.append(att.weights)
            done |= word == Vocabulary.end
            if bool(done.all()):
                break
        return Captions(torch.stack(words, dim=1), torch.stack(weights, dim=1))

    def _beam(self, grid: torch.Tensor, max_len: int, k: int) -> Captions:
        b, n_cells, _ = grid.shape
        v = self.decoder.vocab_size
        dev = grid.device
        grid = grid.repeat_interleave(k, dim=0)  # (B*k, L, D), beams of an image adjacent
        state = self.decoder.init_state(grid)
        word = torch.full((b * k,), Vocabulary.start, dtype=torch.long, device=dev)
        scores = torch.full((b, k), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # all beams start identical: keep one so top-k does not pick copies
        done = torch.zeros(b * k, dtype=torch.bool, device=dev)
        seqs = torch.empty(b * k, 0, dtype=torch.long, device=dev)
        maps = torch.empty(b * k, 0, n_cells, device=dev)
        # A finished beam may only continue with <pad> at no cost, so its score stays fixed.
        frozen = torch.full((v,), float("-inf"), device=dev)
        frozen[Vocabulary.pad] = 0.0
        for _ in range(max_len):
            att = self.attend(self.decoder.attention_logits(state), grid)
            state, logits = self.decoder.step(state, word, att.context)
            logp = F.log_softmax(logits, dim=1)
            logp = torch.where(done.unsqueeze(1), frozen, logp)
            total = (scores.view(b * k, 1) + logp).view(b, k * v)
            scores, flat = total.topk(k, dim=1)
            rows = (flat // v + torch.arange(b, device=dev).unsqueeze(1) * k).flatten()
            word = (flat % v).flatten()
            state = state.index(rows)
            grid = grid[rows]
            seqs = torch.cat([seqs[rows], word.unsqueeze(1)], dim=1)
            maps = torch.cat([maps[rows], att.weights[rows].unsqueeze(1)], dim=1)
            done = done[rows] | (word == Vocabulary.end)
            if bool(done.all()):
                break
        best = scores.argmax(dim=1) + torch.arange(b, device=dev) * k
        return Captions(seqs[best], maps[best])


def expected_context(weights: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``sum_i weights_i * grid_i`` as a batched matmul (FLOP counters see it): ``(B, D)``."""
    return torch.einsum("bl,bld->bd", weights, grid)


__all__ = ["Attention", "CaptionAgent", "Captions", "DecoderState", "Rollout", "expected_context"]
