"""Glimpse selection over a feature grid, B episodes at once, in torch (the training path).

One episode is one caption. Each step's action says *where to look next* and *what the agent
predicts from what it has seen so far*:

    obs_0 = reset(grid, tokens)               nothing read yet; word = <start>
    step 0: action (l_0, -)      -> obs_1     glimpse = cell(s) at l_0; the prediction is ignored
    step t: action (l_t, p_t)    -> obs_t+1   p_t is scored against target word y_{t-1};
                                              the glimpse at l_t is what y_t will be predicted from
    step n: action (-, p_n)      -> terminal  after the last of the n target words (<end> included)

So the location chosen at step ``t`` earns its reward one step later, as the word it helps
predict is scored; reward-to-go credits it with that word and all later ones.

A target of ``SILENT`` (-1) is a step that reads a glimpse but scores nothing (reward 0, and the
decoder's input word stays ``<start>``). A classification episode of K glimpses is the target
sequence ``SILENT x (K-1), label``: the prediction after the last glimpse earns the reward, as in
the Recurrent Attention Model. A step at which no episode's target is scored may omit the
prediction (``None``), so an agent need not compute word logits nobody reads.

A location is an index ``(B,)`` (hard attention: one cell read), indices ``(B, k)`` (k cells
read, the glimpse is their mean) or a probability vector ``(B, L)`` (soft attention: every cell
with weight is read, the glimpse is the weighted sum, differentiable). What a read costs is the
sensor's business (:mod:`rl_attn.envs.sensors`): a precomputed grid, or patches encoded on
demand. The environment counts the cells each episode has read. Targets ride in
``info`` so that agents can train their word predictor by backprop while the location policy
learns from the reward.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from gymnasium.vector import AutoresetMode

from rl_attn.envs.sensors import CellReader, GridView, SensorView

REWARDS = ("log_likelihood", "correct")
SILENT = -1  # a target that is read but not scored (a glimpse before a classification)
START = 1  # <start>, the decoder's input at silent steps


_READER = CellReader()


def read_cells(grid: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
    """The glimpse at ``location``: a cell of ``grid: (B, L, D)`` for an index ``(B,)``, the
    mean of the cells of indices ``(B, k)``, the weighted sum for a probability vector
    ``(B, L)`` (a batched matmul, so FLOP counters see it and gradients reach the weights).
    Returns ``(B, D)``."""
    return _READER(grid, location)


def word_reward(prediction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Reward ``(B,)`` for predicting ``target: (B,)``: the target's log-probability under
    ``prediction`` logits ``(B, V)``, or 1/0 for a correct word (index ``(B,)`` or logits).
    Never carries gradient."""
    prediction = prediction.detach()
    if kind == "log_likelihood":
        if prediction.dim() != 2:
            raise ValueError("the log_likelihood reward needs prediction logits of shape (B, V)")
        return F.log_softmax(prediction, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    word = prediction.argmax(dim=1) if prediction.dim() == 2 else prediction
    return (word == target).float()


class GlimpseCaptionVectorEnv(gym.vector.VectorEnv):
    """Batched, torch-native glimpse environment for captioning over a feature grid.

    ``reset(options={"grid": (B, L, D), "tokens": (B, T)})`` starts B episodes (``tokens`` are
    ``<start> w1 .. <end> <pad>..``; ``B`` may change from one reset to the next); a sensor's
    ``"view"`` may stand in for ``"grid"`` (e.g. patches encoded on demand). Observations
    are a dict of tensors on the grid's device: ``glimpse (B, D)`` (what the last action read;
    zeros before the first) and ``word (B,)`` (the previous target word, for teacher forcing:
    what the decoder reads beside the glimpse). ``step`` takes ``{"location": (B,) long |
    (B, k) long | (B, L) float, "prediction": (B,) long | (B, V) float}`` and returns
    ``(obs, reward (B,), terminated (B,), truncated (B,), info)``; ``info`` holds
    ``targets (B, T-1)``, ``target_mask``, ``scored``, ``cells_read (B,)`` and ``active (B,)``
    (episodes still running before this step). Finished episodes read nothing and earn 0 until
    the next reset.

    Args:
        num_cells: ``L``, the cells of the grid.
        feature_dim: ``D``.
        vocab_size: ``V``.
        max_words: the longest caption (target words, ``<end>`` included) an episode may have.
        reward: ``"log_likelihood"`` (of the target word under the predicted logits) or
            ``"correct"`` (1 when the predicted word is the target).
        check_actions: validate every action (shape, range, NaN); off only for benchmarks.
    """

    metadata = {"autoreset_mode": AutoresetMode.DISABLED}

    def __init__(
        self,
        num_cells: int,
        feature_dim: int,
        vocab_size: int,
        max_words: int = 32,
        reward: str = "log_likelihood",
        check_actions: bool = True,
    ):
        if reward not in REWARDS:
            raise ValueError(f"reward must be one of {', '.join(REWARDS)}, got {reward!r}")
        self.num_cells, self.feature_dim, self.vocab_size = num_cells, feature_dim, vocab_size
        self.max_words, self.reward_kind, self.check_actions = max_words, reward, check_actions
        self.single_action_space = spaces.Dict(
            {"location": spaces.Discrete(num_cells), "prediction": spaces.Discrete(vocab_size)}
        )
        self.single_observation_space = spaces.Dict(
            {
                "glimpse": spaces.Box(-np.inf, np.inf, (feature_dim,), np.float32),
                "word": spaces.Discrete(vocab_size),
            }
        )
        self._set_batch(1)

    def _set_batch(self, n: int) -> None:
        self.num_envs = n
        self.action_space = spaces.Dict(
            {
                "location": spaces.MultiDiscrete([self.num_cells] * n),
                "prediction": spaces.MultiDiscrete([self.vocab_size] * n),
            }
        )
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, n)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if seed is not None:
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
        if not options or not ({"grid", "view"} & set(options)) or "tokens" not in options:
            raise ValueError(
                "reset needs options={'grid': (B, L, D) tensor, 'tokens': (B, T)} "
                "(or a sensor's 'view' instead of 'grid')"
            )
        view, tokens = options.get("view"), options["tokens"]
        if view is None:
            grid = options["grid"]
            if grid.dim() != 3 or grid.shape[1:] != (self.num_cells, self.feature_dim):
                raise ValueError(
                    f"grid must have shape (B, {self.num_cells}, {self.feature_dim}), "
                    f"got {tuple(grid.shape)}"
                )
            view = GridView(grid)
        elif not isinstance(view, SensorView):
            raise ValueError(f"view must be a SensorView, got {type(view).__name__}")
        elif (view.num_cells, view.dim) != (self.num_cells, self.feature_dim):
            raise ValueError(
                f"the view has {view.num_cells} cells of size {view.dim}; this environment "
                f"reads {self.num_cells} of size {self.feature_dim}"
            )
        if tokens.dim() != 2 or tokens.shape[0] != view.batch_size:
            raise ValueError(
                f"tokens must have shape ({view.batch_size}, T), got {tuple(tokens.shape)}"
            )
        if tokens.shape[1] - 1 > self.max_words:
            raise ValueError(f"captions longer than max_words={self.max_words} words")
        b = view.batch_size
        if b != self.num_envs:  # the spaces cost a deepcopy each: rebuilt only when b changes
            self._set_batch(b)
        self.view = view
        dev = view.summary.device
        self.tokens = tokens.to(dev)
        self.targets = self.tokens[:, 1:]
        self.target_mask = self.targets != 0  # <pad> is 0; silent steps count as steps
        self.scored = self.target_mask & (self.targets != SILENT)
        # step_scored[t]: does any episode score target t (a prediction is needed at step t+1)
        self.step_scored: list[bool] = self.scored.any(dim=0).tolist()
        self.inputs = _input_word(self.tokens)  # the decoder's input word at each step
        self.n_words = self.target_mask.sum(dim=1)
        self.t = 0
        self.cells_read = torch.zeros(b, dtype=torch.long, device=dev)
        self.active = torch.ones(b, dtype=torch.bool, device=dev)
        obs = {
            "glimpse": view.summary.new_zeros(b, self.feature_dim),
            "word": self.inputs[:, 0],
        }
        return obs, self._info()

    def _info(self) -> dict[str, Any]:
        return {
            "targets": self.targets,
            "target_mask": self.target_mask,
            "scored": self.scored,
            "cells_read": self.cells_read,
            "active": self.active,
        }

    def _check(self, location: torch.Tensor, prediction: torch.Tensor | None) -> None:
        b, n = self.num_envs, self.num_cells
        space = (
            f"the location space Discrete({n}) (an index), k distinct indices (B, k) "
            f"or a probability vector over {n} cells"
        )
        if location.shape == (b,) or (
            location.dim() == 2 and location.shape[0] == b and not location.is_floating_point()
        ):
            if location.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"location indices must be integers; {space}")
            lo, hi = int(location.min()), int(location.max())
            if lo < 0 or hi >= n:
                raise ValueError(f"location {lo if lo < 0 else hi} is outside {space}")
            if location.dim() == 2:
                if location.shape[1] > n:
                    raise ValueError(f"{location.shape[1]} cells per step is more than {space}")
                ordered = location.sort(dim=1).values
                if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
                    raise ValueError(f"a step reads the same cell twice; {space}")
        elif location.shape == (b, n):
            if not location.is_floating_point() or not bool(torch.isfinite(location).all()):
                raise ValueError(f"location weights must be finite floats; {space}")
            if bool((location < 0).any()) or not torch.allclose(
                location.sum(dim=1), torch.ones_like(location[:, 0]), atol=1e-4
            ):
                raise ValueError(f"location weights must be >= 0 and sum to 1; {space}")
        else:
            raise ValueError(
                f"location has shape {tuple(location.shape)}, "
                f"expected ({b},), ({b}, k) or ({b}, {n}); {space}"
            )
        if prediction is not None:
            self._check_prediction(prediction)

    def _check_prediction(self, prediction: torch.Tensor) -> None:
        b, v = self.num_envs, self.vocab_size
        pspace = f"the prediction space Discrete({v}) (a word) or logits over {v} words"
        if prediction.shape == (b,):
            if prediction.is_floating_point():
                raise ValueError(f"predicted words must be integers; {pspace}")
            lo, hi = int(prediction.min()), int(prediction.max())
            if lo < 0 or hi >= v:
                raise ValueError(f"prediction {lo if lo < 0 else hi} is outside {pspace}")
        elif prediction.shape == (b, v):
            if not bool(torch.isnan(prediction).logical_not().all()):
                raise ValueError(f"prediction logits contain NaN; {pspace}")
        else:
            raise ValueError(
                f"prediction has shape {tuple(prediction.shape)}, "
                f"expected ({b},) or ({b}, {v}); {pspace}"
            )

    def step(
        self, actions: dict[str, torch.Tensor | None]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        location, prediction = actions["location"], actions.get("prediction")
        t = self.t
        if self.check_actions:
            self._check(location, prediction if t > 0 else None)
        active = self.active
        reward = torch.zeros(self.num_envs, device=self.tokens.device)
        if t > 0 and (prediction is not None or self.step_scored[t - 1]):
            if prediction is None:
                raise ValueError(f"step {t} needs a prediction for target word {t - 1}")
            target = self.targets[:, t - 1]
            reward = word_reward(prediction, target.clamp(min=0), self.reward_kind)
            reward = reward * (active & self.scored[:, t - 1])
        # The episode of a caption with n words ends after step n, when word n-1 is scored.
        terminated = self.n_words <= t
        reads = active & ~terminated
        glimpse = self.view.read(location, reads)
        glimpse = glimpse * reads.unsqueeze(1).to(glimpse.dtype)
        # A probability vector reads every cell it gives weight to (all L for a softmax).
        if location.is_floating_point():
            per_read = (location > 0).sum(dim=1)
        else:
            per_read = 1 if location.dim() == 1 else location.shape[1]
        self.cells_read = self.cells_read + reads.long() * per_read
        self.active = reads
        self.t = t + 1
        obs = {
            "glimpse": glimpse,
            "word": self.inputs[:, min(t, self.tokens.shape[1] - 1)],
        }
        info = self._info()
        info["active"] = active
        truncated = torch.zeros_like(terminated)
        return obs, reward, terminated, truncated, info


def _input_word(word: torch.Tensor) -> torch.Tensor:
    """The decoder's input for a target: the word itself, ``<start>`` for a silent step."""
    return torch.where(word == SILENT, torch.full_like(word, START), word)
