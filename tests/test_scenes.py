import numpy as np
import pytest

from rl_attn.scenes import (
    COLOURS,
    SHAPES,
    SIZES,
    SceneCaptions,
    SceneConfig,
    draw_scene,
    scene_splits,
)
from rl_attn.vocab import Vocabulary


def test_same_seed_same_scenes_and_index_independent_of_split_size():
    a = SceneCaptions("train", 20, seed=3)
    b = SceneCaptions("train", 50, seed=3)
    assert (a.images == b.images[:20]).all()
    assert a.captions == b.captions[:20]
    assert a.boxes == b.boxes[:20]


def test_seeds_and_splits_differ():
    base = SceneCaptions("train", 20, seed=0)
    assert base.captions != SceneCaptions("train", 20, seed=1).captions
    assert not (base.images == SceneCaptions("test", 20, seed=0).images).all()


def _nearest_colour(pixel: np.ndarray) -> str:
    return min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - pixel).sum())


@pytest.mark.parametrize("background", ["plain", "texture"])
def test_caption_names_each_boxed_object_left_to_right(background):
    cfg = SceneConfig(background=background, clutter=3)
    for i in range(60):
        scene = draw_scene(0, "train", i, cfg)
        phrases = scene.caption.replace(" and ", " , ").split(" , ")
        assert len(phrases) == len(scene.boxes) == len(scene.objects)
        centres = [(x0 + x1) / 2 for x0, _, x1, _ in scene.boxes]
        assert centres == sorted(centres)
        for phrase, box, (size, colour, shape) in zip(phrases, scene.boxes, scene.objects):
            assert phrase == f"a {size} {colour} {shape}"
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= cfg.image_size and 0 <= y0 < y1 <= cfg.image_size
            assert x1 - x0 == round(SIZES[size] * cfg.image_size)
            # Every shape covers its box centre, so the centre pixel shows the named colour.
            centre = scene.image[(y0 + y1) // 2, (x0 + x1) // 2].astype(int)
            assert _nearest_colour(centre) == colour, (i, phrase)
            assert shape in SHAPES


def test_boxes_do_not_overlap():
    for i in range(100):
        boxes = draw_scene(5, "val", i, SceneConfig(max_objects=4)).boxes
        for j, a in enumerate(boxes):
            for b in boxes[j + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_splits_and_vocabulary():
    splits = scene_splits(seed=0, train_size=200, val_size=10, test_size=20)
    assert {k: len(v) for k, v in splits.items()} == {"train": 200, "val": 10, "test": 20}
    assert splits["train"].images.shape == (200, 3, 64, 64)
    vocab = Vocabulary.build(splits["train"].captions)
    assert vocab.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    caption = splits["test"].captions[0]
    assert vocab.decode(vocab.encode(caption)) == caption
    assert vocab.encode("a purple blob")[2:4] == [vocab.unk, vocab.unk]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_objects": 0}, "min_objects"),
        ({"max_objects": 9}, "max_objects"),
        ({"background": "stripes"}, "background"),
        ({"image_size": 8}, "image_size"),
    ],
)
def test_bad_scene_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SceneConfig(**kwargs)
