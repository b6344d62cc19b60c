"""Generated scenes: coloured shapes on a background, a caption naming each one, and their boxes.

The default task needs no download. Every image is drawn from its own random stream
``numpy.random.default_rng([seed, split_id, index])``, so image ``i`` of a split is the same
whatever the split's size, and the three splits never share a stream.

A caption names every object as ``a <size> <colour> <shape>`` in left-to-right order of the object
centres, joined by ``,`` and a final ``and``: "a small red circle , a large blue square and a medium
green triangle". The order is the reason the task needs attention: a decoder that sees only the
mean-pooled feature grid has lost where things are, so it cannot tell which object comes first, nor
which colour belongs to which shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

SIZES: dict[str, float] = {"small": 0.16, "medium": 0.24, "large": 0.34}  # side / image side
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 100, 240),
    "yellow": (235, 225, 40),
    "magenta": (215, 60, 215),
    "cyan": (40, 215, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
# What each attribute word of a caption says: "size", "colour" or "shape".
WORD_KINDS: dict[str, str] = {
    **dict.fromkeys(SIZES, "size"),
    **dict.fromkeys(COLOURS, "colour"),
    **dict.fromkeys(SHAPES, "shape"),
}
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn.

    Args:
        image_size: side of the square RGB image in pixels.
        min_objects / max_objects: objects per scene, drawn uniformly in this range.
        background: ``"plain"`` (one dark grey per image) or ``"texture"`` (plus pixel noise).
        clutter: number of small distractor specks per image (not named in the caption).
        min_gap: minimum horizontal distance in pixels between object centres, so that the
            left-to-right order in the caption is never ambiguous.
    """

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    background: str = "texture"
    clutter: int = 0
    min_gap: int = 4

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                "need 1 <= min_objects <= max_objects, got "
                f"min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        if self.max_objects > 4:
            raise ValueError(f"max_objects must be <= 4 to fit the image, got {self.max_objects}")
        if self.background not in ("plain", "texture"):
            raise ValueError(f"background must be 'plain' or 'texture', got {self.background!r}")
        if self.clutter < 0:
            raise ValueError(f"clutter must be >= 0, got {self.clutter}")


@dataclass
class Scene:
    """One drawn scene: ``image`` (H, W, 3) uint8, one caption, one box per named object.

    ``boxes`` are ``(x0, y0, x1, y1)`` in pixels (x1, y1 exclusive), in caption order.
    """

    image: np.ndarray
    caption: str
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    objects: list[tuple[str, str, str]] = field(default_factory=list)  # (size, colour, shape)


def caption_for(objects: list[tuple[str, str, str]]) -> str:
    """The caption for objects already in left-to-right order."""
    phrases = [f"a {size} {colour} {shape}" for size, colour, shape in objects]
    if len(phrases) == 1:
        return phrases[0]
    return " , ".join(phrases[:-1]) + " and " + phrases[-1]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill):
    x0, y0, x1, y1 = box
    # PIL's bounds are inclusive; our boxes are exclusive on the right and bottom.
    r, b = x1 - 1, y1 - 1
    cx, cy = (x0 + r) / 2, (y0 + b) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, r, b), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, r, b), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (r, b), (x0, b)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (r, cy), (cx, b), (x0, cy)], fill=fill)
    elif shape == "cross":
        t = max(2, (x1 - x0) // 3)
        draw.rectangle((cx - t / 2, y0, cx + t / 2 - 1, b), fill=fill)
        draw.rectangle((x0, cy - t / 2, r, cy + t / 2 - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _place(rng: np.random.Generator, sides: list[int], cfg: SceneConfig):
    """Non-overlapping boxes whose centres are at least ``min_gap`` apart horizontally."""
    n = cfg.image_size
    for _ in range(200):
        boxes: list[tuple[int, int, int, int]] = []
        for side in sides:
            for _ in range(50):
                x0 = int(rng.integers(0, n - side + 1))
                y0 = int(rng.integers(0, n - side + 1))
                box = (x0, y0, x0 + side, y0 + side)
                cx = x0 + side / 2
                clear = all(
                    (
                        box[2] + 1 <= o[0]
                        or o[2] + 1 <= box[0]
                        or box[3] + 1 <= o[1]
                        or o[3] + 1 <= box[1]
                    )
                    and abs(cx - (o[0] + o[2]) / 2) >= cfg.min_gap
                    for o in boxes
                )
                if clear:
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(sides):
            return boxes
    raise RuntimeError(f"could not place {len(sides)} objects in a {n}x{n} image")


def draw_scene(seed: int, split: str, index: int, cfg: SceneConfig) -> Scene:
    """Draw scene ``index`` of ``split``; the same arguments always give the same scene."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    n = cfg.image_size
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    size_names = list(SIZES)
    colour_names = list(COLOURS)
    objects = [
        (
            size_names[rng.integers(len(size_names))],
            colour_names[rng.integers(len(colour_names))],
            SHAPES[rng.integers(len(SHAPES))],
        )
        for _ in range(count)
    ]
    sides = [max(4, round(SIZES[s] * n)) for s, _, _ in objects]
    boxes = _place(rng, sides, cfg)

    grey = int(rng.integers(20, 70))
    image = Image.new("RGB", (n, n), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    for _ in range(cfg.clutter):
        side = int(rng.integers(2, 4))
        x, y = int(rng.integers(0, n - side)), int(rng.integers(0, n - side))
        colour = COLOURS[colour_names[rng.integers(len(colour_names))]]
        draw.rectangle((x, y, x + side - 1, y + side - 1), fill=colour)
    for (_, colour, shape), box in zip(objects, boxes):
        jitter = rng.integers(-15, 16, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
        _draw_shape(draw, shape, box, fill)
    pixels = np.asarray(image, dtype=np.uint8)
    if cfg.background == "texture":
        noise = rng.integers(-12, 13, size=pixels.shape)
        pixels = np.clip(pixels.astype(np.int16) + noise, 0, 255).astype(np.uint8)

    order = sorted(range(count), key=lambda i: (boxes[i][0] + boxes[i][2]) / 2)
    objects = [objects[i] for i in order]
    boxes = [boxes[i] for i in order]
    return Scene(image=pixels, caption=caption_for(objects), boxes=boxes, objects=objects)


class SceneCaptions(torch.utils.data.Dataset):
    """One split of generated scenes, drawn once into memory.

    Items are ``(image (3, H, W) uint8, caption str, index)``; boxes stay in ``self.boxes``
    (per image a list of ``(x0, y0, x1, y1)`` in caption order) for evaluation.
    """

    def __init__(self, split: str, size: int, seed: int = 0, cfg: SceneConfig | None = None):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if size <= 0:
            raise ValueError(f"{split} size must be > 0, got {size}")
        self.cfg = cfg or SceneConfig()
        self.split = split
        scenes = [draw_scene(seed, split, i, self.cfg) for i in range(size)]
        self.images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2)
        self.captions = [s.caption for s in scenes]
        self.boxes = [s.boxes for s in scenes]
        self.objects = [s.objects for s in scenes]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, int]:
        return self.images[i], self.captions[i], i

    @property
    def references(self) -> list[list[str]]:
        """Reference captions per image (one each for generated scenes)."""
        return [[c] for c in self.captions]


def scene_splits(
    seed: int = 0,
    train_size: int = 10000,
    val_size: int = 500,
    test_size: int = 1000,
    **scene: object,
) -> dict[str, SceneCaptions]:
    """The three splits of the generated-scene task; ``scene`` holds :class:`SceneConfig` fields."""
    cfg = SceneConfig(**scene)  # type: ignore[arg-type]
    sizes = {"train": train_size, "val": val_size, "test": test_size}
    return {split: SceneCaptions(split, n, seed, cfg) for split, n in sizes.items()}
