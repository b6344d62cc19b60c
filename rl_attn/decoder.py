"""The Show-Attend-Tell LSTM decoder, with the choice of location left to the agent.

One decoding step, with ``grid: (B, L, D)`` and hidden state ``h: (B, H)``:

1. ``attention_logits(keys, h)`` scores every cell: ``e_i = w^T tanh(W_a a_i + W_h h)``, ``(B, L)``.
2. The *agent* turns the scores into a context vector ``(B, D)``: soft attention takes the
   softmax-weighted sum of the cells, hard attention reads one sampled cell, no attention the mean.
3. ``step(state, word, context)`` gates the context (``beta = sigmoid(W_b h)``), runs the LSTM (or,
   with ``cell="rnn"``, a ReLU RNN) on
   ``[E y_{t-1}, beta * context]`` and predicts the next word with the deep output layer
   ``L_o(E y_{t-1} + L_h h_t + L_z z_t)`` (Xu et al. 2015, eq. 7).

The initial ``h`` and ``c`` come from the mean annotation vector, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def tanh(x: torch.Tensor) -> torch.Tensor:
    """``tanh(x)``; on a CPU computed as ``2 sigmoid(2x) - 1``, the same function, because
    torch's CPU tanh kernel is several times slower than its sigmoid."""
    if x.device.type != "cpu":
        return torch.tanh(x)
    return torch.sigmoid(x * 2) * 2 - 1


@dataclass
class DecoderState:
    """``h, c: (B, H)``; ``keys: (B, L, A)`` is the grid's attention projection, computed once
    (doubled: see :meth:`Decoder.attention_logits`)."""

    h: torch.Tensor
    c: torch.Tensor
    keys: torch.Tensor

    def index(self, rows: torch.Tensor) -> DecoderState:
        """The state of the given rows (beam search reorders and repeats rows)."""
        return DecoderState(self.h[rows], self.c[rows], self.keys[rows])


class Decoder(nn.Module):
    """LSTM caption decoder in the Show-Attend-Tell form.

    Args:
        vocab_size: number of output words (including the special tokens).
        grid_dim: ``D``, the feature size of a grid cell.
        embed_dim: word embedding size (also the deep output's inner size).
        hidden_dim: LSTM size ``H``.
        attn_dim: inner size ``A`` of the attention MLP.
        dropout: dropout on the deep output's input (0: none, the default).
        gate: use the gating scalar ``beta`` on the context.
        key_dim: size of the vectors the attention scores and the initial state are computed
            from (the sensor's summary of the image); ``None`` means ``grid_dim``, the grid
            itself. A patch sensor's gist is smaller than a glimpse.
        cell: the recurrent core, ``lstm`` (Show-Attend-Tell) or ``rnn`` (a ReLU RNN, the
            Recurrent Attention Model's core for classification; its ``c`` is its ``h``).
    """

    def __init__(
        self,
        vocab_size: int,
        grid_dim: int,
        embed_dim: int = 64,
        hidden_dim: int = 256,
        attn_dim: int = 128,
        dropout: float = 0.0,
        gate: bool = True,
        key_dim: int | None = None,
        cell: str = "lstm",
    ):
        super().__init__()
        if cell not in ("lstm", "rnn"):
            raise ValueError(f"decoder.cell must be lstm or rnn, got {cell!r}")
        self.cell = cell
        self.vocab_size, self.grid_dim, self.hidden_dim = vocab_size, grid_dim, hidden_dim
        self.embed = nn.Embedding(vocab_size, embed_dim)
        key_dim = grid_dim if key_dim is None else key_dim
        self.init_h = nn.Linear(key_dim, hidden_dim)
        self.init_c = nn.Linear(key_dim, hidden_dim) if cell == "lstm" else None
        self.att_grid = nn.Linear(key_dim, attn_dim)
        self.att_hidden = nn.Linear(hidden_dim, attn_dim)
        self.att_score = nn.Linear(attn_dim, 1)
        self.gate = nn.Linear(hidden_dim, 1) if gate else None
        if cell == "lstm":
            self.lstm = nn.LSTMCell(embed_dim + grid_dim, hidden_dim)
        else:
            self.rnn = nn.RNNCell(embed_dim + grid_dim, hidden_dim, nonlinearity="relu")
        self.out_hidden = nn.Linear(hidden_dim, embed_dim)
        self.out_context = nn.Linear(grid_dim, embed_dim)
        self.out_word = nn.Linear(embed_dim, vocab_size)
        self.dropout = nn.Dropout(dropout)

    def init_state(self, grid: torch.Tensor, key_grid: torch.Tensor | None = None) -> DecoderState:
        """grid ``(B, L, Dk)`` (the sensor's summary: the feature grid, or a patch sensor's gist)
        -> the state before the first word. The attention keys are computed from ``key_grid``
        when given (an agent may pass a detached grid)."""
        mean = grid.mean(dim=1)
        h = torch.tanh(self.init_h(mean))
        return DecoderState(
            h=h,
            c=torch.tanh(self.init_c(mean)) if self.init_c is not None else h,
            keys=self.att_grid(grid if key_grid is None else key_grid) * 2,
        )

    def attention_logits(self, state: DecoderState) -> torch.Tensor:
        """Scores of every cell given the previous hidden state: ``(B, L)``.

        ``w^T tanh(z) + b`` with ``z = W_a a_i + W_h h`` is computed as
        ``2 (w^T sigmoid(2 z) + b) - b - sum(w)``, the same function. The keys are stored
        doubled, so the ``(B, L, A)`` tensor, the largest of a hard-attention step, sees one
        add and one sigmoid (and their backward) instead of an add and the four passes of
        :func:`tanh`
        (RESULTS, "Cheaper attention scores")."""
        query = self.att_hidden(state.h).unsqueeze(1) * 2
        scores = self.att_score(torch.sigmoid(state.keys + query)).squeeze(-1)
        return scores * 2 - (self.att_score.bias + self.att_score.weight.sum())

    @torch.no_grad()
    def cell_inputs(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What each cell of ``grid: (B, L, D)``, read as the context, adds to a step before
        the gate scales it: to the recurrent core's pre-activations ``(B, L, G)`` and to the
        deep output ``(B, L, E)`` (biases excluded). Computed once per episode for
        :meth:`step_every_cell`; no gradient."""
        core = self.lstm if self.cell == "lstm" else self.rnn
        e = self.embed.embedding_dim
        return grid @ core.weight_ih[:, e:].T, grid @ self.out_context.weight.T

    @torch.no_grad()
    def step_every_cell(
        self, state: DecoderState, word: torch.Tensor, cells: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """The word logits ``(B, L, V)`` that :meth:`step` would give from ``state`` and
        ``word: (B,)`` with each cell ``i`` of the grid as the context, for every ``i`` at once
        (``cells`` from :meth:`cell_inputs`); without dropout and without gradient. The
        context enters a step linearly, scaled by the gate, so only the core's nonlinearity
        and the output layers run per cell."""
        emb = self.embed(word)
        core = self.lstm if self.cell == "lstm" else self.rnn
        e = emb.shape[1]
        beta = torch.ones_like(state.h[:, :1])
        if self.gate is not None:
            beta = torch.sigmoid(self.gate(state.h))
        shared = emb @ core.weight_ih[:, :e].T + state.h @ core.weight_hh.T
        if core.bias_ih is not None:
            shared = shared + core.bias_ih + core.bias_hh
        cell_core, cell_deep = cells
        pre = torch.addcmul(shared.unsqueeze(1), beta.unsqueeze(2), cell_core)  # (B, L, G)
        if self.cell == "lstm":
            i, f, g, o = pre.chunk(4, dim=2)
            c = torch.sigmoid(f) * state.c.unsqueeze(1) + torch.sigmoid(i) * tanh(g)
            h = torch.sigmoid(o) * tanh(c)
        else:
            h = torch.relu(pre)
        deep = self.out_hidden(h) + (emb + self.out_context.bias).unsqueeze(1)
        deep = torch.addcmul(deep, beta.unsqueeze(2), cell_deep)
        return self.out_word(deep)

    def step(
        self, state: DecoderState, word: torch.Tensor, context: torch.Tensor, predict: bool = True
    ) -> tuple[DecoderState, torch.Tensor | None]:
        """Previous words ``(B,)`` and contexts ``(B, D)`` -> new state, word logits ``(B, V)``
        (``None`` with ``predict=False``: a step whose prediction nobody reads, such as a
        classification episode's silent glimpses)."""
        emb = self.embed(word)
        if self.gate is not None:
            context = torch.sigmoid(self.gate(state.h)) * context
        x = torch.cat([emb, context], dim=1)
        if self.cell == "lstm":
            h, c = self.lstm(x, (state.h, state.c))
        else:
            h = c = self.rnn(x, state.h)
        if not predict:
            return DecoderState(h, c, state.keys), None
        deep = emb + self.out_hidden(h) + self.out_context(context)
        logits = self.out_word(self.dropout(deep))
        return DecoderState(h, c, state.keys), logits
