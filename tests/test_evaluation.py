import json
import math

import numpy as np
import pytest
from conftest import benchmark_module

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


def test_word_accuracy_benchmark_places_each_word_on_its_objects_box_centre(trained_run):
    wa = benchmark_module("word_accuracy")
    # 64-pixel image, 8x8 cells of 8 pixels: boxes centred at (12, 20) and (44, 52)
    caption = "a small red circle and a large blue square"
    cells = wa.box_centre_cells(caption, [(8, 16, 16, 24), (40, 48, 48, 56)], 11, 8, 8.0)
    assert cells == [2 * 8 + 1] * 5 + [6 * 8 + 5] * 4 + [0, 0]
    result = wa.word_accuracy(str(trained_run), images=8)
    assert set(result) == set(wa.MODES)
    assert all(0.0 <= v <= 1.0 for acc in result.values() for v in acc.values())
    assert "other" in result["policy"]
    # the policy's own cell is one of the cells tried, so the best cell is never worse
    assert all(result["best cell"][k] >= result["policy"][k] for k in result["policy"])


def test_caption_errors_tell_the_wrong_object_from_a_misread_one(tmp_path):
    errors = benchmark_module("caption_errors")
    ref = "a small red circle , a large blue square and a medium green cross"
    assert errors.classify(ref, ref) == []
    # the second object skipped, the third named twice
    skipped = "a small red circle , a medium green cross and a medium green cross"
    assert errors.classify(skipped, ref) == [(1, "other object")]
    misread = "a small red circle , a large cyan square and a small green diamond"
    assert errors.classify(misread, ref) == [(1, "1 attribute"), (2, "2 attributes")]
    assert errors.classify("a small red circle and a large blue square", ref) == [(-1, "count")]
    entries = [{"generated": g, "references": [ref]} for g in (ref, skipped, misread)]
    (tmp_path / "test_captions.json").write_text(json.dumps(entries))
    counts = errors.caption_errors(tmp_path)
    assert counts["wrong captions"] == 2 and counts["other object"] == 1
    assert counts["1 attribute"] == counts["2 attributes"] == 1 and counts["count"] == 0


def test_caption_errors_reads_decode_the_runs_checkpoint(trained_run):
    errors = benchmark_module("caption_errors")
    result = errors.where_read(trained_run, beam_size=1)
    shares = [v for k, v in result.items() if k.startswith("share")]
    assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in shares)
    assert all(v >= 0 for k, v in result.items() if k.startswith("reads"))


def test_a_checkpoint_from_before_out_coords_loads_with_its_128_d_grid(trained_run, tmp_path):
    """A config saved before ``encoder.out_coords`` existed has no such key: the encoder it
    was trained with appended no coordinates, so its weights must load as they were."""
    import torch
    from omegaconf import OmegaConf

    from rl_attn.build import build_agent
    from rl_attn.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
    from rl_attn.evaluate import load_trained

    payload = load_checkpoint(checkpoint_path(trained_run))
    assert payload["config"]["encoder"]["out_coords"] is True  # today's runs record it
    cfg = OmegaConf.create(payload["config"])
    cfg.encoder.out_coords = False
    old = build_agent(cfg, len(payload["vocab"]))
    del payload["config"]["encoder"]["out_coords"]
    payload["model"] = old.state_dict()
    save_checkpoint(tmp_path / "old.pt", payload)
    agent, *_ = load_trained(tmp_path / "old.pt", torch.device("cpu"))
    assert agent.encoder.out_dim == old.encoder.out_dim == cfg.encoder.channels[-1]
