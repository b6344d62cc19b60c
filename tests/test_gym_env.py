import warnings

import gymnasium as gym
import numpy as np
import pytest
from conftest import benchmark_module
from gymnasium.utils.env_checker import check_env

import rl_attn.envs  # noqa: F401  (registers the ids)
from rl_attn.envs.gym_env import GlimpseCaptionsEnv

ENV_ID = "rl_attn/GlimpseCaptions-v0"


def test_gymnasium_check_env_passes():
    check_env(gym.make(ENV_ID).unwrapped, skip_render_check=True)


def test_stable_baselines3_check_env_passes():
    sb3_check = pytest.importorskip("stable_baselines3.common.env_checker").check_env
    sb3_check(GlimpseCaptionsEnv(), warn=True)


def test_same_seed_same_episode():
    a, b = GlimpseCaptionsEnv(), GlimpseCaptionsEnv()
    obs_a, info_a = a.reset(seed=7)
    obs_b, info_b = b.reset(seed=7)
    assert info_a == info_b
    for key in obs_a:
        assert np.array_equal(obs_a[key], obs_b[key])


def test_defaults_are_24_pixel_windows_a_grey_gist_and_one_object():
    env = gym.make(ENV_ID).unwrapped
    assert (env.grid, env.window, env.gist_colour, env.scene_cfg.max_objects) == (8, 24, False, 1)
    assert env.observation_space["glimpse"].shape == (24 * 24 * 3,)
    assert GlimpseCaptionsEnv(max_objects=3).scene_cfg.max_objects == 3


def test_reading_the_right_words_scores_every_word_and_reads_one_cell_each():
    env = GlimpseCaptionsEnv(window=None, max_objects=3)
    obs, info = env.reset(seed=1)
    words = env.vocab.encode(info["caption"])[1:]  # targets, <end> included
    obs, reward, terminated, _, step_info = env.step(np.array([27, 0]))
    assert reward == 0.0 and not terminated  # nothing seen yet: the guess is not scored
    r, c = divmod(27, 8)
    patch = env._image[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8].reshape(-1)
    assert np.array_equal(obs["glimpse"], patch)
    total = 0.0
    for t, word in enumerate(words):
        assert obs["word"] == ([1] + words)[t]  # teacher forcing: the previous target word
        obs, reward, terminated, _, step_info = env.step(np.array([t % 64, word]))
        total += reward
        assert terminated == (t == len(words) - 1)
    assert total == len(words)
    assert step_info["cells_read"] == len(words)


def test_wrong_words_earn_nothing():
    env = GlimpseCaptionsEnv()
    _, info = env.reset(seed=2)
    env.step(np.array([0, 0]))
    _, reward, *_ = env.step(np.array([0, env.vocab.pad]))
    assert reward == 0.0


@pytest.mark.parametrize(
    "action, message",
    [
        ([64, 0], r"outside the action space MultiDiscrete\(\[64"),
        ([0, -1], "outside the action space"),
        ([1, 2, 3], "not in the action space"),
        ([0.5, 1], "not in the action space"),
        ([float("nan"), 1], "not in the action space"),
    ],
)
def test_bad_actions_name_the_space(action, message):
    env = GlimpseCaptionsEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        env.step(action)


def test_grey_gist_shows_where_not_which_colour():
    colour = GlimpseCaptionsEnv(gist=4, gist_colour=True)
    grey = GlimpseCaptionsEnv(gist=4, gist_colour=False)
    check_env(grey, skip_render_check=True)
    obs_c, _ = colour.reset(seed=3)
    obs_g, _ = grey.reset(seed=3)
    assert obs_g["gist"].shape == (16,) and obs_c["gist"].shape == (48,)
    assert np.allclose(obs_g["gist"], obs_c["gist"].reshape(16, 3).mean(axis=1), atol=1e-6)


def test_a_window_shows_the_square_around_the_cell_black_beyond_the_edge():
    env = GlimpseCaptionsEnv(grid=8, window=24)
    check_env(env, skip_render_check=True)
    assert env.observation_space["glimpse"].shape == (24 * 24 * 3,)
    env.reset(seed=4)
    image = env._image
    inner, *_ = env.step(np.array([9, 0]))  # row 1, column 1: pixels 0..24 on both axes
    assert np.array_equal(inner["glimpse"], image[0:24, 0:24].reshape(-1))
    corner, *_ = env.step(np.array([0, 0]))  # row 0, column 0: 8 black pixels above and left
    corner = corner["glimpse"].reshape(24, 24, 3)
    assert (corner[:8] == 0).all() and (corner[:, :8] == 0).all()
    assert np.array_equal(corner[8:, 8:], image[0:16, 0:16])


def test_bad_construction():
    with pytest.raises(ValueError, match="grid must divide the image size 64"):
        GlimpseCaptionsEnv(grid=7)
    with pytest.raises(ValueError, match="window must be at least the cell side 8"):
        GlimpseCaptionsEnv(grid=8, window=4)
    with pytest.raises(ValueError, match="differ from it by an even number"):
        GlimpseCaptionsEnv(grid=8, window=13)


def test_stable_baselines3_ppo_runs_a_short_training_on_the_registered_env():
    sb3 = pytest.importorskip("stable_baselines3")
    env = gym.make(ENV_ID)
    model = sb3.PPO("MultiInputPolicy", env, n_steps=64, batch_size=32, n_epochs=1, seed=0)
    model.learn(total_timesteps=128)
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    assert env.action_space.contains(action)


def test_ppo_benchmark_counts_a_glimpse_on_an_object_when_its_window_overlaps_the_box():
    on_object = benchmark_module("ppo_glimpse").on_object
    cell, wide = GlimpseCaptionsEnv(grid=8, window=None), GlimpseCaptionsEnv(grid=8, window=24)
    box = (20, 20, 30, 30)  # x0, y0, x1, y1: cells (2..3, 2..3)
    assert on_object(cell, 18, box) and on_object(cell, 27, box)  # rows/columns 2 and 3
    assert not on_object(cell, 9, box) and not on_object(cell, 36, box)
    assert on_object(wide, 9, box) and on_object(wide, 36, box)  # the window reaches 8 px out
    assert not on_object(wide, 0, box) and not on_object(wide, 45, box)


def test_render_declares_its_fps_and_passes_the_checker_without_warnings():
    assert GlimpseCaptionsEnv.metadata["render_fps"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(gym.make(ENV_ID, render_mode="rgb_array").unwrapped)


def test_render_outlines_the_window_of_each_glimpse_read():
    env = GlimpseCaptionsEnv(grid=8, window=24, render_mode="rgb_array")
    env.reset(seed=4)
    before = env.render()
    assert before.shape == (64, 64, 3) and before.dtype == np.uint8
    assert not (before == 255).all(axis=2).any()  # no white pixel: nothing outlined yet
    env.step(np.array([27, 0]))  # row 3, column 3: the 24-pixel window 16..39 on both axes
    after = env.render()
    outline = np.zeros((64, 64), bool)
    outline[[16, 39], 16:40] = outline[16:40, [16, 39]] = True
    assert (after[outline] == 255).all()
    assert np.array_equal(after[~outline], before[~outline])
    env.step(np.array([0, 0]))  # the window (-8, -8, 16, 16), clipped to the image's edge
    corner = env.render()
    assert (corner[0, 0:16] == 255).all() and (corner[0:16, 15] == 255).all()
    assert (corner[outline] == 255).all()  # the first glimpse stays outlined
    assert GlimpseCaptionsEnv().render() is None  # no render_mode: nothing to draw
