"""The agent protocol: an encoder, the shared decoder, and two faces.

* Its **policy**, *where to look*: :meth:`CaptionAgent.locate` turns attention scores into a
  location action for the glimpse environment (with :meth:`~CaptionAgent.init_state` and
  :meth:`~CaptionAgent.attention_logits`, what the scores see). Evaluation, decoding and
  pictures use only this face.
* Its **update**, *how it learns*: :meth:`CaptionAgent.update` takes one batch and the trainer's
  optimiser step, and calls that step as often as its algorithm needs (once, with
  :meth:`CaptionAgent.loss`, by default; several epochs for PPO-clip).

Everything else (teacher-forced rollout, greedy and beam decoding) is shared, so two agents
differ only in how they turn scores into a location and how they learn.

Shapes: images ``(B, 3, H, W)``; tokens ``(B, T)`` each ``<start> w1 .. wn <end> <pad>..``;
grid ``(B, L, D)``; vocabulary size ``V``.

What a glimpse is comes from the agent's *sensor* (:mod:`rl_attn.envs.sensors`): by default a
:class:`~rl_attn.envs.sensors.GridSensor` (the encoder's grid, computed once per image);
``sensor=patch`` encodes only the regions looked at. Agents do not need to know which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from rl_attn.decoder import Decoder, DecoderState
from rl_attn.distributed import mean_count
from rl_attn.encoder import Encoder
from rl_attn.envs.glimpse import GlimpseCaptionVectorEnv
from rl_attn.envs.sensors import GridSensor, Sensor, SensorView
from rl_attn.vocab import Vocabulary

if TYPE_CHECKING:
    from rl_attn.agents.all_cells import ScoredCells


def draw_cells(pi: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` cells ``(B, k)`` drawn from ``pi: (B, L)`` one after another without replacement.
    One draw inverts the CDF (the first cell whose cumulative mass exceeds a uniform number
    scaled to the row's total: a zero-probability cell is never drawn), several times faster
    than ``torch.multinomial`` on a CPU; several draws use ``torch.multinomial``."""
    if k > 1:
        return torch.multinomial(pi, k)
    cdf = pi.cumsum(dim=1)
    u = torch.rand_like(cdf[:, -1:]) * cdf[:, -1:]
    return (cdf <= u).sum(dim=1, keepdim=True).clamp_(max=pi.shape[1] - 1)


@dataclass
class Location:
    """Where an agent looks at one step.

    ``action`` is what the environment reads: an index ``(B,)`` (one cell) or a probability
    vector ``(B, L)`` (every cell, weighted). ``weights: (B, L)`` is the attention map drawn and
    scored (one-hot for an index). Agents that sample set ``log_prob`` and ``entropy`` ``(B,)``;
    agents with a learned baseline set ``value`` ``(B,)``.
    """

    action: torch.Tensor
    weights: torch.Tensor
    log_prob: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    value: torch.Tensor | None = None


@dataclass
class Rollout:
    """A teacher-forced episode batch through the glimpse environment, ``n = T - 1`` words.

    ``word_logits: (B, n, V)`` predicts ``tokens[:, 1:]`` (zeros at a step that scores no
    word, where the decoder skips its output layer); ``weights: (B, n, L)`` the map used
    for each word; ``mask: (B, n)`` True on real (non-pad) target words; ``rewards: (B, n)`` the
    environment's reward for each word; ``locations`` each word's :class:`Location`;
    ``cells_read: (B,)`` what the environment counted; ``scored: (B, n)`` the steps whose
    prediction is scored (``mask`` without the silent glimpses of a classification episode).
    ``every_cell`` (``agent.branch=all`` only): each word's policy over every cell and the
    rewards the scored cells would have earned (:class:`~rl_attn.agents.all_cells.ScoredCells`).
    """

    word_logits: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    locations: list[Location]
    cells_read: torch.Tensor
    scored: torch.Tensor | None = None
    every_cell: ScoredCells | None = None


@dataclass
class Captions:
    """Decoded captions: ``tokens: (B, T)`` without ``<start>``, ``<pad>`` after ``<end>``;
    ``weights: (B, T, L)`` the attention map used for each emitted word."""

    tokens: torch.Tensor
    weights: torch.Tensor


OptimizerStep = Callable[[torch.Tensor, dict[str, float]], bool]
"""The trainer's optimiser step, handed to :meth:`CaptionAgent.update`: ``step(loss, logs)``
back-propagates ``loss`` (a scalar to minimise), averages the gradients over processes, clips
them and updates the parameters. It returns ``False`` when it skipped the update because the loss
or the gradients were not finite (``trainer.nonfinite=skip``; ``logs`` name the loss terms in
that report), and raises when the run must stop."""


@dataclass
class Classes:
    """A classification episode's outcome: ``tokens: (B, 1)`` the predicted class token,
    ``weights: (B, K, L)`` what each of its ``K`` steps read and ``scores: (B, C)`` the
    log-probabilities of the ``C`` classes (``None`` when the agent gives none)."""

    tokens: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor | None = None


class Policy(Protocol):
    """Where to look, step by step: what :meth:`CaptionAgent.rollout` asks. Every agent is its
    own policy; an algorithm may roll out another one over the same modules (Xu et al.'s mix of
    sampled and expected contexts, a replay of stored cells, or samples that branch at every
    word). Optionally ``decoder_step``, run instead of the decoder's own ``step``."""

    def init_state(self, view: SensorView) -> DecoderState: ...

    def attention_logits(self, state: DecoderState) -> torch.Tensor: ...

    def locate(self, logits: torch.Tensor, state: DecoderState) -> Location: ...


class Agent(nn.Module):
    """What the trainer, evaluation and comparison need of any agent: an encoder, the sensor
    that turns it into a grid of cells, and how it learns (:meth:`update`, by default one
    :meth:`loss` and one optimiser step). A classifier that never looks (the plain CNN) is an
    :class:`Agent`; everything that chooses where to look is a :class:`CaptionAgent`.

    ``classifies_only``: the trainer refuses the agent on a captioning task.
    """

    classifies_only = False

    sensor: Sensor  # set by the subclass once its own modules are registered (the grid's)

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def use_sensor(self, sensor: Sensor) -> None:
        """Read glimpses through ``sensor`` (the builder calls this for ``sensor=patch``)."""
        self.sensor = sensor

    def grid_shape(self, image_size: int) -> tuple[int, int]:
        """``(h, w)`` of the cells for square images of ``image_size`` pixels."""
        return self.sensor.grid_shape(self.encoder, image_size)

    def param_groups(self, lr: float) -> list[dict]:
        """The optimiser's parameter groups at base learning rate ``lr``: one group of every
        trainable parameter; an agent that learns some parts faster overrides this."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def update(
        self, images: torch.Tensor, tokens: torch.Tensor, step: OptimizerStep
    ) -> dict[str, float]:
        """Learn from one batch: :meth:`loss`, then one optimiser ``step``. Returns the logs."""
        loss, logs = self.loss(images, tokens)
        step(loss, logs)
        return logs

    def loss(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``(scalar loss to minimise, {tag: float} to log)`` for a batch of ``images`` and
        their target ``tokens: (B, T)``."""
        raise NotImplementedError

    def classify(self, images: torch.Tensor, glimpses: int, classes: torch.Tensor) -> Classes:
        """A classification episode: ``tokens: (B, 1)`` the predicted class token and
        ``weights: (B, K, L)`` what was read at each of its ``glimpses`` steps."""
        raise NotImplementedError


class CaptionAgent(Agent):
    """Base class of every agent that chooses where to look (captioning and classification
    episodes alike: a class is a one-word caption after silent glimpses).

    Args:
        encoder: images -> grid ``(B, L, D)``.
        decoder: the shared :class:`~rl_attn.decoder.Decoder`.
        reward: the glimpse environment's word reward, ``log_likelihood`` or ``correct``.

    Subclass contract:
        * :meth:`locate` maps the decoder's attention ``logits: (B, L)`` (and its ``state``,
          for agents that need more than the scores) to a :class:`Location`. It must read
          ``self.training`` to tell training from evaluation.
        * :meth:`loss` returns ``(scalar loss to minimise, {tag: float} to log)``; the base
          version is the per-word cross-entropy (mean over real target words). Tags are
          TensorBoard names such as ``losses/caption``; ``losses/total`` is expected.
        * :meth:`update` is one training batch: by default one :meth:`loss` and one optimiser
          step. Override it for an algorithm that steps several times per batch.
    """

    def __init__(self, encoder: Encoder, decoder: Decoder, reward: str = "log_likelihood"):
        super().__init__(encoder)
        self.decoder = decoder
        self.reward = reward
        self.sensor = GridSensor()
        self._env: GlimpseCaptionVectorEnv | None = None
        # False: an episode reads no cell twice until it has read every cell (see :meth:`look`)
        self.revisit = True

    def use_sensor(self, sensor: Sensor) -> None:
        super().use_sensor(sensor)
        self._env = None

    def observe(self, images: torch.Tensor) -> SensorView:
        """What the sensor makes of ``images``: the view the environment reads glimpses from."""
        return self.sensor.observe(self.encoder, images)

    def locate(self, logits: torch.Tensor, state: DecoderState) -> Location:
        raise NotImplementedError

    def init_state(self, view: SensorView) -> DecoderState:
        """The decoder state before the first word, from the view's ``summary`` (the grid, or
        a patch sensor's gist). Override to change what attention sees."""
        return self.decoder.init_state(view.summary)

    def attention_logits(self, state: DecoderState) -> torch.Tensor:
        """The scores handed to :meth:`locate`: ``(B, L)``. Override to change what they see."""
        return self.decoder.attention_logits(state)

    def read_record(self, view: SensorView) -> torch.Tensor | None:
        """A new episode's record of the cells it has read: ``(B, L)`` bool, all False (see
        :meth:`look`); ``None`` when the agent may read a cell again (``revisit``)."""
        if self.revisit:
            return None
        return torch.zeros(view.batch_size, view.num_cells, dtype=torch.bool,
                           device=view.summary.device)  # fmt: skip

    def look(
        self, policy: Policy, state: DecoderState, read: torch.Tensor | None
    ) -> tuple[Location, torch.Tensor | None]:
        """One location from ``policy``'s scores, and the cells read once it is read. With
        ``read`` (``revisit`` off), the cells read earlier in the episode score ``-inf``, so
        no policy can choose them (a sampled cell, an argmax, a random draw alike); once fewer
        unread cells are left than one step reads, every cell is open again."""
        logits = policy.attention_logits(state)
        if read is None:
            return policy.locate(logits, state), None
        loc = policy.locate(logits.masked_fill(read, float("-inf")), state)
        read = read | (loc.weights > 0)
        k = getattr(self, "cells_per_step", 1)
        full = (~read).sum(dim=1, keepdim=True) < k
        return loc, read & ~full

    def env_for(self, view: SensorView, n_words: int) -> GlimpseCaptionVectorEnv:
        """The glimpse environment for views like ``view`` (made once, reused)."""
        cells, dim = view.num_cells, view.dim
        env = self._env
        if (
            env is None
            or (env.num_cells, env.feature_dim) != (cells, dim)
            or n_words > env.max_words
        ):
            env = GlimpseCaptionVectorEnv(
                cells, dim, self.decoder.vocab_size, max(n_words, 32), reward=self.reward
            )
            self._env = env
        return env

    def rollout(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        view: SensorView | None = None,
        policy: Policy | None = None,
    ) -> Rollout:
        """Teacher forcing through the environment: word ``t`` is predicted from the glimpse at
        the location chosen for it and the previous target word, and scored one step later.
        ``view`` skips :meth:`observe` when the caller has observed ``images`` already;
        ``policy`` chooses the locations instead of the agent itself (a policy with a
        ``decoder_step`` method, the decoder's :meth:`~rl_attn.decoder.Decoder.step`
        signature, also runs the decoder: see :class:`~rl_attn.agents.reinforce.WordBranches`)."""
        if view is None:
            view = self.observe(images)
        if policy is None:
            policy = self
        decoder_step = getattr(policy, "decoder_step", None) or self.decoder.step
        n = tokens.shape[1] - 1
        env = self.env_for(view, n)
        obs, info = env.reset(options={"view": view, "tokens": tokens})
        state = policy.init_state(view)
        read = self.read_record(view)
        loc, read = self.look(policy, state, read)
        obs, *_ = env.step({"location": loc.action, "prediction": None})
        locations, logits, rewards = [loc], [], []
        unscored: torch.Tensor | None = None  # the logits recorded for silent steps
        for t in range(1, n + 1):
            state, word_logits = decoder_step(
                state, obs["word"], obs["glimpse"], predict=env.step_scored[t - 1]
            )
            if word_logits is None:
                if unscored is None:
                    unscored = state.h.new_zeros(state.h.shape[0], self.decoder.vocab_size)
                logits.append(unscored)
            else:
                logits.append(word_logits)
            if t < n:
                loc, read = self.look(policy, state, read)
                locations.append(loc)
                action = loc.action
            else:  # the episode ends here: this location would never be read
                action = torch.zeros_like(tokens[:, 0])
            obs, reward, _, _, info = env.step({"location": action, "prediction": word_logits})
            rewards.append(reward)
        return Rollout(
            word_logits=torch.stack(logits, dim=1),
            weights=torch.stack([loc.weights for loc in locations], dim=1),
            mask=info["target_mask"],
            rewards=torch.stack(rewards, dim=1),
            locations=locations,
            cells_read=info["cells_read"],
            scored=info["scored"],
        )

    def loss(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.rollout(images, tokens)
        caption = self.caption_loss(out, tokens)
        return caption, {
            "losses/total": caption.item(),
            "losses/caption": caption.item(),
            **self.env_logs(out),
        }

    @staticmethod
    def env_logs(out: Rollout) -> dict[str, float]:
        """What the environment measured: mean reward per scored prediction (real word, or
        the class after the last glimpse), cells read per episode."""
        scored = out.mask if out.scored is None else out.scored
        return {
            "charts/reward": float(out.rewards[scored].mean()),
            "charts/cells_read": float(out.cells_read.float().mean()),
        }

    @staticmethod
    def caption_loss(out: Rollout, tokens: torch.Tensor) -> torch.Tensor:
        """Cross-entropy per real target word, averaged over all of them in the batch (the
        global batch under torchrun: see :func:`rl_attn.distributed.mean_count`)."""
        targets = tokens[:, 1:].clamp(min=Vocabulary.pad)  # silent steps (-1) score nothing
        total = F.cross_entropy(
            out.word_logits.flatten(0, 1),
            targets.flatten(),
            ignore_index=Vocabulary.pad,
            reduction="sum",
        )
        return total / mean_count((targets != Vocabulary.pad).sum())

    @torch.no_grad()
    def caption(self, images: torch.Tensor, max_len: int = 30, beam_size: int = 1) -> Captions:
        """Decode captions of at most ``max_len`` words (``<end>`` included); greedy when
        ``beam_size == 1``, else beam search keeping the highest total log-probability."""
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        view = self.observe(images)
        if beam_size == 1:
            return self._greedy(view, max_len)
        return self._beam(view, max_len, beam_size)

    @torch.no_grad()
    def classify(self, images: torch.Tensor, glimpses: int, classes: torch.Tensor) -> Classes:
        """A classification episode: ``glimpses`` steps of looking (the decoder's input word
        stays ``<start>``), then the most probable of the ``classes`` token indices.
        Returns ``tokens: (B, 1)``, the predicted class token, ``weights: (B, K, L)`` and the
        classes' log-probabilities ``scores: (B, C)``."""
        view = self.observe(images)
        b, dev = view.batch_size, view.summary.device
        state = self.init_state(view)
        word = torch.full((b,), Vocabulary.start, dtype=torch.long, device=dev)
        weights, read = [], self.read_record(view)
        for i in range(glimpses):
            loc, read = self.look(self, state, read)
            last = i == glimpses - 1
            state, logits = self.decoder.step(state, word, view.read(loc.action), predict=last)
            weights.append(loc.weights)
        classes = classes.to(dev)
        scores = F.log_softmax(logits[:, classes], dim=1)
        predicted = classes[scores.argmax(dim=1)]
        return Classes(predicted.unsqueeze(1), torch.stack(weights, dim=1), scores)

    def _greedy(self, view: SensorView, max_len: int) -> Captions:
        b, dev = view.batch_size, view.summary.device
        state = self.init_state(view)
        word = torch.full((b,), Vocabulary.start, dtype=torch.long, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        words, weights, read = [], [], self.read_record(view)
        for _ in range(max_len):
            loc, read = self.look(self, state, read)
            state, logits = self.decoder.step(state, word, view.read(loc.action, ~done))
            word = logits.argmax(dim=1).masked_fill(done, Vocabulary.pad)
            words.append(word)
            weights.append(loc.weights)
            done |= word == Vocabulary.end
            if bool(done.all()):
                break
        return Captions(torch.stack(words, dim=1), torch.stack(weights, dim=1))

    def _beam(self, view: SensorView, max_len: int, k: int) -> Captions:
        b, n_cells = view.batch_size, view.num_cells
        v = self.decoder.vocab_size
        dev = view.summary.device
        # (B*k) rows, the beams of an image adjacent
        view = view.index(torch.arange(b, device=dev).repeat_interleave(k))
        state = self.init_state(view)
        word = torch.full((b * k,), Vocabulary.start, dtype=torch.long, device=dev)
        scores = torch.full((b, k), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # all beams start identical: keep one so top-k does not pick copies
        done = torch.zeros(b * k, dtype=torch.bool, device=dev)
        seqs = torch.empty(b * k, 0, dtype=torch.long, device=dev)
        read = self.read_record(view)
        maps = torch.empty(b * k, 0, n_cells, device=dev)
        # A finished beam may only continue with <pad> at no cost, so its score stays fixed.
        frozen = torch.full((v,), float("-inf"), device=dev)
        frozen[Vocabulary.pad] = 0.0
        for _ in range(max_len):
            loc, read = self.look(self, state, read)
            state, logits = self.decoder.step(state, word, view.read(loc.action, ~done))
            logp = F.log_softmax(logits, dim=1)
            logp = torch.where(done.unsqueeze(1), frozen, logp)
            total = (scores.view(b * k, 1) + logp).view(b, k * v)
            scores, flat = total.topk(k, dim=1)
            rows = (flat // v + torch.arange(b, device=dev).unsqueeze(1) * k).flatten()
            word = (flat % v).flatten()
            state = state.index(rows)
            view = view.index(rows)
            read = None if read is None else read[rows]
            seqs = torch.cat([seqs[rows], word.unsqueeze(1)], dim=1)
            maps = torch.cat([maps[rows], loc.weights[rows].unsqueeze(1)], dim=1)
            done = done[rows] | (word == Vocabulary.end)
            if bool(done.all()):
                break
        best = scores.argmax(dim=1) + torch.arange(b, device=dev) * k
        return Captions(seqs[best], maps[best])


__all__ = [
    "Agent",
    "CaptionAgent", "Captions", "DecoderState", "Location", "OptimizerStep", "Policy", "Rollout",
]  # fmt: skip
