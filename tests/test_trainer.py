"""The trainer's pieces: the data order, the agent's update hook, PPO-clip through it, the
run directory's log and the checks a new user ran into."""

import json
import os

import pytest
import torch
from conftest import ROOT, RunsCode, assert_one_line_error, run_module

from rl_attn.agents import SoftAttentionAgent
from rl_attn.agents.ppo import PPOAgent
from rl_attn.checkpoint import load_checkpoint
from rl_attn.decoder import Decoder
from rl_attn.encoder import ConvEncoder
from rl_attn.errors import UserError
from rl_attn.trainer import BatchOrder, build_run, train


def test_batch_order_is_one_seeded_permutation_per_epoch_and_resumes_exactly():
    # what the trainer did by hand before it used torch's samplers: a permutation per epoch from
    # one generator, consecutive batches, the incomplete last batch dropped
    gen = torch.Generator().manual_seed(3)
    expected = []
    for _ in range(3):
        perm = torch.randperm(10, generator=gen)
        expected += [perm[i : i + 4] for i in (0, 4)]
    order = BatchOrder(10, 4, seed=3)
    got = [order.next() for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))

    order = BatchOrder(10, 4, seed=3)
    for _ in range(3):
        order.next()
    saved = order.state()
    resumed = BatchOrder(10, 4, seed=99)
    resumed.load_state(saved)
    assert all(torch.equal(resumed.next(), b) for b in expected[3:])


class TwoStepSoft(SoftAttentionAgent):
    """An algorithm that takes two optimiser steps per batch (the second on a fresh loss)."""

    def update(self, images, tokens, step):
        for _ in range(2):
            loss, logs = self.loss(images, tokens)
            step(loss, logs)
        return logs


def test_an_agent_update_may_step_the_optimizer_several_times_per_batch(tiny_config, tmp_path):
    cfg = tiny_config(
        "agent=custom", f"agent._target_={__name__}.TwoStepSoft", "trainer.max_steps=4"
    )
    summary = train(cfg, tmp_path)
    assert summary["steps"] == 4
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["optimizer"]["state"]
    assert {int(s["step"]) for s in state.values()} == {8}  # Adam saw two steps per batch


def tiny_ppo(**kwargs) -> PPOAgent:
    torch.manual_seed(0)
    encoder = ConvEncoder(channels=(8, 8), strides=(2, 2))
    decoder = Decoder(12, encoder.out_dim, embed_dim=8, hidden_dim=16, attn_dim=8, dropout=0.0)
    return PPOAgent(encoder, decoder, **kwargs).train()


def batch(b=6):
    images = torch.randint(0, 256, (b, 3, 16, 16), dtype=torch.uint8)
    tokens = torch.randint(4, 12, (b, 4))
    tokens[:, 0], tokens[:, -1] = 1, 2
    return images, tokens


def test_ppo_takes_epochs_steps_on_one_rollout_starting_at_ratio_one():
    agent = tiny_ppo(epochs=3, clip_range=0.2)
    opt = torch.optim.Adam(agent.parameters(), lr=0.05)
    seen = []

    def step(loss, logs):
        seen.append(dict(logs))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return True

    images, tokens = batch()
    agent.update(images, tokens, step)
    assert len(seen) == 3
    # the first epoch replays the cells under the policy that drew them: ratio 1 everywhere
    assert seen[0]["losses/approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert seen[0]["losses/clip_fraction"] == 0.0
    assert seen[-1]["losses/approx_kl"] > 0  # later epochs: the policy has moved
    assert int(agent.rollouts) == 1  # one rollout per batch


def test_ppo_replays_the_sampled_cells():
    agent = tiny_ppo(epochs=2)
    torch.manual_seed(5)
    images, tokens = batch()
    drawn, rep = [], []

    def step(loss, logs):
        return True

    original = agent.rollout

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        (rep if kwargs.get("policy") is not agent else drawn).append(
            [loc.action for loc in out.locations]
        )
        return out

    agent.rollout = spy
    agent.update(images, tokens, step)
    assert len(drawn) == 1 and len(rep) == 2
    for replay in rep:
        assert all(torch.equal(a, b) for a, b in zip(drawn[0], replay))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"clip_range": 1.5}, "clip_range must be in (0, 1)"),
        ({"expected_context_prob": 0.5}, "the ppo agent samples every glimpse"),
    ],
)
def test_ppo_bad_settings_are_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_ppo(**kwargs)


def test_ppo_trains_through_the_trainer(tiny_config, tmp_path):
    summary = train(tiny_config("agent=ppo", "agent.epochs=2"), tmp_path)
    assert summary["test"]["greedy"]["cells_read_per_word"] == 1.0
    assert (tmp_path / "metrics.json").is_file()


def test_random_bytes_are_not_a_checkpoint_and_no_message_advises_a_full_load(tmp_path):
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(UserError, match="is not an rl_attn checkpoint") as err:
        load_checkpoint(noise)
    hostile = tmp_path / "hostile.pt"
    torch.save({"step": 1, "config": {}, "vocab": [], "model": RunsCode()}, hostile)
    with pytest.raises(UserError, match="is refused") as refused:
        load_checkpoint(hostile)
    for message in (str(err.value), str(refused.value)):
        assert "weights_only=False" not in message and "weights_only" not in message
        assert "\n" not in message


def test_a_config_error_leaves_no_run_directory(tmp_path):
    proc = run_module("rl_attn.train", "trainer.lr=-1", cwd=tmp_path)
    assert_one_line_error(proc, "error: trainer.lr must be a positive number")
    assert not (tmp_path / "outputs").exists()


def test_train_log_holds_the_runs_lines(tmp_path):
    from conftest import TINY

    run_dir = tmp_path / "run"
    proc = run_module(
        "rl_attn.train", *TINY, "agent=soft", "trainer.max_steps=10", f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = (run_dir / "train.log").read_text().splitlines()
    assert any("step 5: loss" in line for line in lines)
    assert any("step 10: loss" in line for line in lines)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert any(f"{metrics['test']['beam2']['BLEU-4']:.4f}" in line for line in lines)


def test_a_torchvision_encoder_without_weights_says_it_starts_from_random_weights(tmp_path, caplog):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="rl_attn.configs", version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["encoder=resnet18", "task.train_size=64",
                       "task.val_size=4", "task.test_size=4", "trainer.batch_size=8"],
        )  # fmt: skip
    with caplog.at_level("WARNING", logger="rl_attn"):
        build_run(cfg, tmp_path)
    said = [r.getMessage() for r in caplog.records if "random weights" in r.getMessage()]
    assert len(said) == 1 and "encoder.weights_path" in said[0]


def test_a_run_flushes_denormal_floats_to_zero(tiny_config, tmp_path):
    torch.set_flush_denormal(False)
    tiny = torch.tensor([1e-30])
    assert (tiny * 1e-10).item() != 0.0  # a denormal, kept
    build_run(tiny_config(), tmp_path)
    assert (tiny * 1e-10).item() == 0.0  # flushed: no slow denormal arithmetic in training


def test_no_module_imports_the_command_line_or_a_private_name():
    offenders = []
    for folder in ("rl_attn", "agents", "envs"):
        for path in (ROOT / folder).glob("*.py"):
            for line in path.read_text().splitlines():
                text = line.strip()
                names = text.split(" import ", 1)[-1].strip("()").split(",")
                if text.startswith("from rl_attn.train import") or (
                    text.startswith("from rl_attn")
                    and any(n.strip().startswith("_") for n in names)
                ):
                    offenders.append(f"{path.name}: {text}")
    assert not offenders
