"""Word <-> index mapping built from training captions, with the four special tokens."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)


class Vocabulary:
    """Indices 0..3 are ``<pad> <start> <end> <unk>``; words follow in sorted order.

    Build one with :meth:`build` from training captions; words seen fewer than ``min_count``
    times map to ``<unk>``. Captions are split on spaces (they are tokenised already).
    """

    pad, start, end, unk = 0, 1, 2, 3

    def __init__(self, words: Sequence[str]):
        self.itos: list[str] = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> Vocabulary:
        counts = Counter(w for c in captions for w in c.split())
        return cls(sorted(w for w, n in counts.items() if n >= min_count))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, caption: str) -> list[int]:
        """``<start> w1 .. wn <end>`` as indices."""
        body = [self.stoi.get(w, self.unk) for w in caption.split()]
        return [self.start, *body, self.end]

    def encode_batch(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``tokens: (B, T)`` (each ``<start> .. <end>``) and ``lengths: (B,)``."""
        seqs = [self.encode(c) for c in captions]
        lengths = torch.tensor([len(s) for s in seqs])
        tokens = torch.full((len(seqs), int(lengths.max())), self.pad, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.tensor(s)
        return tokens, lengths

    def decode(self, indices: Iterable[int]) -> str:
        """Words up to the first ``<end>``, special tokens dropped."""
        words = []
        for i in indices:
            i = int(i)
            if i == self.end:
                break
            if i not in (self.pad, self.start):
                words.append(self.itos[i])
        return " ".join(words)
