"""``benchmarks/attention_offset.py``: where attention lands around the named object, and the
encoder's receptive-field offset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, benchmark_module, run_benchmark

from rl_attn.evaluation import attention_correctness

bench = benchmark_module("attention_offset")


class ShiftedPool(torch.nn.Module):
    """An 'encoder' whose cell ``j`` averages the pixels ``shift`` to the left of its square."""

    def __init__(self, shift: int):
        super().__init__()
        self.shift = shift

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(torch.roll(x, shifts=self.shift, dims=-1), 8)


@pytest.mark.parametrize("shift", [0, 3, -5])
def test_receptive_field_offset_finds_a_known_shift(shift):
    dx, dy = bench.receptive_field_offset(ShiftedPool(shift), torch.rand(4, 3, 64, 64))
    assert dx == pytest.approx(-shift, abs=1e-4)
    assert dy == pytest.approx(0.0, abs=1e-4)


def one_hot(cell: int) -> np.ndarray:
    alpha = np.zeros(64)
    alpha[cell] = 1.0
    return alpha


def test_word_rows_place_a_glimpse_beside_the_box():
    """A box on one cell (row 2, column 2): the glimpse on it is in the box, the one a cell to
    its left only near it, 8 pixels left of the centre; moving the cells one cell right (a
    field offset of +8) puts that one in the box and the other out."""
    box = (16, 16, 24, 24)
    caption = "a small red circle"
    inside, beside = one_hot(2 * 8 + 2), one_hot(2 * 8 + 1)
    maps = [np.stack([inside, inside, inside, inside]), np.stack([beside] * 4)]
    rows = bench.word_rows([caption] * 2, maps, [[box]] * 2, (8, 8), 64, (8.0, 0.0))
    assert [len(rows[k]) for k in ("size", "colour", "shape")] == [2, 2, 2]
    in_box, near, dx, dy, moved = zip(*rows["shape"])
    assert in_box == (1.0, 0.0)
    assert near == (1.0, 1.0)
    assert dx == (0.0, -8.0) and dy == (0.0, 0.0)
    assert moved == (0.0, 1.0)
    # the shape words' "in box" is the project's attention correctness
    words = [caption.split()] * 2
    assert np.mean(in_box) == attention_correctness(words, maps, [[box]] * 2, (8, 8), 64)


def test_word_rows_count_objects_at_the_shape_words():
    """The second object's words are scored against the second box, and a word past the last
    object against none."""
    boxes = [(0, 0, 8, 8), (56, 56, 64, 64)]
    caption = "a small red circle and a large blue square and a small red cross"
    alpha = np.stack([one_hot(63)] * len(caption.split()))
    rows = bench.word_rows([caption], [alpha], [boxes], (8, 8), 64, (0.0, 0.0))
    assert [r[0] for r in rows["shape"]] == [0.0, 1.0]
    assert [r[0] for r in rows["size"]] == [0.0, 1.0]


def test_offsets_of_a_trained_run(trained_run):
    field, means = bench.offsets(str(trained_run), scenes=8, beam=1)
    assert all(np.isfinite(field))
    for values in means.values():
        if np.isfinite(values[0]):
            assert 0.0 <= values[0] <= values[1] <= 1.0 + 1e-6


def test_attention_offset_names_a_missing_run_in_one_line(tmp_path):
    proc = run_benchmark("attention_offset", str(tmp_path / "missing"))
    assert_one_line_error(proc, "error: checkpoint")


def test_offsets_refuse_a_patch_run_in_one_line(tmp_path):
    """Over patches a map's cells are not squares of one grid: refused, not mis-measured."""
    from conftest import compose_config

    from rl_attn.errors import UserError
    from rl_attn.trainer import train

    cfg = compose_config("agent=soft", "sensor=patch", "encoder=glimpse", "trainer.max_steps=2")
    train(cfg, tmp_path)
    with pytest.raises(UserError, match="need a grid sensor"):
        bench.offsets(str(tmp_path), scenes=4, beam=1)
