import math

import numpy as np
import pytest

from rl_attn.attention_maps import attention_panels
from rl_attn.evaluation import attention_correctness, cell_overlap


def test_cell_overlap_counts_partial_cells():
    # a 4x4 grid over 8x8 pixels: cells of 2x2 pixels
    frac = cell_overlap((1, 0, 4, 2), (4, 4), 8).reshape(4, 4)
    assert frac[0].tolist() == [0.5, 1.0, 0.0, 0.0]
    assert frac[1:].sum() == 0
    assert cell_overlap((0, 0, 8, 8), (4, 4), 8).tolist() == [1.0] * 16


def test_attention_correctness_on_a_hand_example():
    grid, size = (2, 2), 8
    boxes = [[(0, 0, 4, 4), (4, 4, 8, 8)]]  # top-left and bottom-right cells
    words = [["a", "small", "red", "circle", "and", "a", "big", "blue", "square"]]
    weights = np.full((9, 4), 0.25)
    weights[3] = [1.0, 0.0, 0.0, 0.0]  # "circle": all on the first object
    weights[8] = [0.0, 0.5, 0.0, 0.5]  # "square": half on the second object
    score = attention_correctness(words, [weights], boxes, grid, size)
    assert score == pytest.approx((1.0 + 0.5) / 2)


def test_uniform_attention_scores_the_box_share_of_the_image():
    boxes = [[(0, 0, 16, 16)]]
    score = attention_correctness([["a", "cross"]], [np.full((2, 64), 1 / 64)], boxes, (8, 8), 64)
    assert score == pytest.approx(16 * 16 / 64**2)


def test_words_past_the_last_object_and_captions_without_nouns():
    boxes = [[(0, 0, 4, 4)]]
    one_hot = np.eye(4)[[0, 3]]
    # the second noun names no object: only the first counts
    assert attention_correctness([["circle", "square"]], [one_hot], boxes, (2, 2), 8) == 1.0
    assert math.isnan(attention_correctness([["a", "b"]], [one_hot], boxes, (2, 2), 8))


def test_attention_panels_light_up_the_attended_cell():
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    weights = np.zeros((2, 4))
    weights[0, 0] = weights[1, 3] = 1.0
    picture = attention_panels(image, ["left", "right"], weights, (2, 2))
    side = 32  # 16 px shown at 2x
    assert picture.shape == (side + 12, 3 * side, 3)
    first = picture[:side, side : 2 * side].astype(int).sum(-1)
    assert first[: side // 4, : side // 4].mean() > first[-side // 4 :, -side // 4 :].mean() + 50
