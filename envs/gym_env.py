"""The glimpse task as a plain Gymnasium ``Env`` (one episode, numpy), for any RL library.

``gymnasium.make("rl_attn/GlimpseCaptions-v0")`` needs nothing else from rl_attn: the observation
and the reward alone define the task. Each episode is one generated scene and its caption. The
agent sees the image only through glimpses: the pixels of one cell of a ``grid x grid`` partition
(the *patch* sensor, no learned encoder), or with ``window`` a larger square centred on that cell,
plus a coarse *gist* of the whole image: its colours, or with ``gist_colour=False`` only its
brightness, like peripheral vision, so that the gist shows where things are and a glimpse must be
spent to see what colour they are.

Step ``t`` takes ``action = [cell, word]`` (a ``MultiDiscrete([L, V])``): the cell to look at
next, and the agent's guess of target word ``t - 1`` (ignored at step 0, when nothing has been
seen). The reward is 1 for a correct word. The episode ends after the caption's last word
(``<end>``). Teacher forcing: the observation carries the previous target word.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rl_attn.scenes import COLOURS, SHAPES, SIZES, SceneConfig, draw_scene
from rl_attn.vocab import Vocabulary


def draw_box(
    image: np.ndarray, box: tuple[int, int, int, int], colour: tuple[int, int, int]
) -> np.ndarray:
    """Outline ``box`` ``(x0, y0, x1, y1)`` (x1, y1 exclusive) one pixel wide on ``image``
    ``(H, W, 3)`` uint8, in place, and return it. A box reaching past the image's edge is
    clipped to it, so its outline then runs along the edge; a box wholly outside draws nothing."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], w) - 1, min(box[3], h) - 1
    if x0 > x1 or y0 > y1:
        return image
    image[[y0, y1], x0 : x1 + 1] = colour
    image[y0 : y1 + 1, [x0, x1]] = colour
    return image


def scene_vocabulary() -> Vocabulary:
    """Every word a generated caption can hold, so the action space is fixed in advance."""
    return Vocabulary(sorted({"a", ",", "and", *SIZES, *COLOURS, *SHAPES}))


class GlimpseCaptionsEnv(gym.Env):
    """Caption a generated scene word by word, seeing it one cell at a time.

    Observation (``Dict``): ``glimpse`` the pixels in [0, 1] of the ``window x window`` square
    centred on the last cell read, ``(window, window, 3)`` flattened (black beyond the image's
    edge; zeros before the first look); ``gist`` the image average-pooled to
    ``gist x gist`` colours (or grey levels), flattened; ``location`` the last cell read
    (``L`` before any); ``step``; ``word`` the previous target word (``<start>`` at first).
    ``reset``'s info holds the ``caption``, the ``scene`` index and the objects' ``boxes``
    ``(x0, y0, x1, y1)`` in caption order (for analysis; the agent needs none of it).
    ``render()`` (``render_mode="rgb_array"``) returns the image with the window of every
    glimpse read so far outlined in white.

    Args:
        grid: the image is cut into ``grid x grid`` cells; ``L = grid * grid``.
        window: side in pixels of the square a glimpse shows, centred on the chosen cell (24 by
            default); ``None`` for the cell itself (``image_size // grid``). A window wider than
            the cell shows a whole object around the cell it is aimed at, so that a glimpse can
            show its shape.
        gist: side of the coarse colour summary (0 to leave it out of the observation's use:
            it is then all zeros).
        gist_colour: the gist's blocks hold their mean colour (3 values); ``False`` (the
            default): their mean grey level (1 value), which says where the objects are but not
            their colours, so that a glimpse must be spent to see them.
        split, seed: which generated scenes episodes draw from (``seed`` fixes the scene set;
            the episode order comes from ``reset(seed=...)``).
        num_scenes: episodes draw uniformly from scenes ``0 .. num_scenes - 1`` of the split.
        scene: :class:`~rl_attn.scenes.SceneConfig` fields (image size, objects, clutter);
            ``max_objects`` is 1 unless given (the trainer's scenes hold up to 3).

    The defaults (24-pixel windows, a grey gist, one object) are where SB3's PPO at its own
    default hyperparameters learns glimpses that beat random ones (benchmarks/RESULTS.md): an
    8x8-pixel cell shows too little of a shape, a colour gist tells the colour without a look,
    and a memoryless policy cannot tell which of several objects the caption names next.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 2}

    def __init__(
        self,
        grid: int = 8,
        window: int | None = 24,
        gist: int = 4,
        gist_colour: bool = False,
        split: str = "train",
        seed: int = 0,
        num_scenes: int = 10_000,
        render_mode: str | None = None,
        **scene: Any,
    ):
        self.scene_cfg = SceneConfig(**{"max_objects": 1, **scene})
        size = self.scene_cfg.image_size
        if grid < 1 or size % grid:
            raise ValueError(f"grid must divide the image size {size}, got {grid}")
        if gist < 0 or (gist and size % gist):
            raise ValueError(f"gist must be 0 or divide the image size {size}, got {gist}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.grid, self.gist_side, self.split, self.scene_seed = grid, gist, split, seed
        self.gist_colour = bool(gist_colour)
        self.num_scenes, self.render_mode = num_scenes, render_mode
        self.cell = size // grid
        self.window = self.cell if window is None else int(window)
        if self.window < self.cell or (self.window - self.cell) % 2:
            raise ValueError(
                f"window must be at least the cell side {self.cell} and differ from it by an even "
                f"number of pixels, got {window}"
            )
        self._margin = (self.window - self.cell) // 2
        self.vocab = scene_vocabulary()
        self.num_cells = grid * grid
        self.max_words = 4 * self.scene_cfg.max_objects + (self.scene_cfg.max_objects - 1) + 1
        self.action_space = spaces.MultiDiscrete([self.num_cells, len(self.vocab)])
        self.observation_space = spaces.Dict(
            {
                "glimpse": spaces.Box(0.0, 1.0, (self.window * self.window * 3,), np.float32),
                "gist": spaces.Box(
                    0.0, 1.0, (max(gist, 1) ** 2 * (3 if self.gist_colour else 1),), np.float32
                ),
                "location": spaces.Discrete(self.num_cells + 1),
                "step": spaces.Discrete(self.max_words + 2),
                "word": spaces.Discrete(len(self.vocab)),
            }
        )

    def window_box(self, cell: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` in image pixels (x1, y1 exclusive) of what a glimpse at ``cell``
        shows; it reaches past the image's edge by up to the window's margin."""
        r, c = divmod(int(cell), self.grid)
        s, m = self.cell, self._margin
        return c * s - m, r * s - m, (c + 1) * s + m, (r + 1) * s + m

    def _cell_pixels(self, cell: int) -> np.ndarray:
        x0, y0, x1, y1 = self.window_box(cell)
        m = self._margin  # the padded image starts m pixels before the image
        return self._padded[y0 + m : y1 + m, x0 + m : x1 + m].reshape(-1)

    def _obs(self, glimpse: np.ndarray, location: int) -> dict[str, Any]:
        return {
            "glimpse": glimpse.copy(),  # fresh arrays: callers keep what they are given
            "gist": self._gist.copy(),
            "location": int(location),
            "step": int(self._t),
            "word": int(self._tokens[max(self._t - 1, 0)]),
        }

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=seed)
        index = int(self.np_random.integers(self.num_scenes))
        scene = draw_scene(self.scene_seed, self.split, index, self.scene_cfg)
        self._scene, self._index = scene, index
        self._image = scene.image.astype(np.float32) / 255.0
        m = self._margin
        self._padded = np.pad(self._image, ((m, m), (m, m), (0, 0))) if m else self._image
        if self.gist_side:
            k = self.scene_cfg.image_size // self.gist_side
            pooled = self._image.reshape(self.gist_side, k, self.gist_side, k, 3).mean((1, 3))
            if not self.gist_colour:
                pooled = pooled.mean(axis=2)
            self._gist = pooled.reshape(-1).astype(np.float32)
        else:
            self._gist = np.zeros(self.observation_space["gist"].shape, np.float32)
        self._tokens = self.vocab.encode(scene.caption)  # <start> w1 .. <end>
        self._t = 0
        self._cells_read = 0
        self._read: list[int] = []  # the cells glimpsed, for render()
        glimpse = np.zeros(self.observation_space["glimpse"].shape, np.float32)
        info = {"caption": scene.caption, "scene": index, "boxes": list(scene.boxes)}
        return self._obs(glimpse, self.num_cells), info

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        cell, word = cell_and_choice(action, self.action_space, "word")
        reward = 0.0
        if self._t > 0:
            reward = float(word == self._tokens[self._t])
        n_words = len(self._tokens) - 1
        terminated = self._t >= n_words
        self._t += 1
        if terminated:
            glimpse = np.zeros(self.observation_space["glimpse"].shape, np.float32)
        else:
            glimpse = self._cell_pixels(cell)
            self._cells_read += 1
            self._read.append(cell)
        info = {"cells_read": self._cells_read, "target": self._tokens[self._t - 1]}
        return self._obs(glimpse, cell), reward, terminated, False, info

    def render(self) -> np.ndarray | None:
        """``(size, size, 3)`` uint8: the scene with each glimpse read so far outlined in white
        (the backgrounds are dark grey and no object is white)."""
        if self.render_mode != "rgb_array":
            return None
        frame = self._scene.image.copy()
        for cell in self._read:
            draw_box(frame, self.window_box(cell), (255, 255, 255))
        return frame


def cell_and_choice(action: Any, space: spaces.MultiDiscrete, choice: str) -> tuple[int, int]:
    """A ``[cell, choice]`` action as two ints; integral floats are accepted, anything else
    outside ``space`` is a one-line :class:`ValueError` naming the ranges."""
    action = np.asarray(action)
    if action.shape != (2,) or not np.issubdtype(action.dtype, np.integer):
        if action.shape == (2,) and np.all(np.isfinite(action)) and np.all(action % 1 == 0):
            action = action.astype(np.int64)
        else:
            raise ValueError(
                f"action {action.tolist()} is not in the action space {space} "
                f"(two integers: [cell, {choice}])"
            )
    if not space.contains(action):
        cells, choices = (int(n) for n in space.nvec)
        raise ValueError(
            f"action {action.tolist()} is outside the action space {space}: "
            f"cell in [0, {cells}), {choice} in [0, {choices})"
        )
    return int(action[0]), int(action[1])
