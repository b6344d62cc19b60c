import json
from pathlib import Path

import pytest
import torch
from conftest import RunsCode, assert_one_line_error
from conftest import run_module as run
from omegaconf import OmegaConf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_attn.trainer import train


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tiny_training_run_lowers_the_loss(trained_run):
    loss = [e.value for e in events(trained_run).Scalars("losses/caption")]
    assert len(loss) >= 5
    assert loss[-1] < 0.8 * loss[0]


def test_run_directory_holds_everything(trained_run):
    for name in ("config.yaml", "metrics.json", "test_captions.json", "checkpoints/last.pt"):
        assert (trained_run / name).is_file(), name
    summary = json.loads((trained_run / "metrics.json").read_text())
    assert summary["steps"] == 30 and summary["decoding"] == "beam2"
    for decoding in ("greedy", "beam2"):
        metrics = summary["test"][decoding]
        for key in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr", "attention_correctness"):
            assert key in metrics
    picture = Image.open(trained_run / "attention" / "test_0.png")
    assert picture.mode == "RGB" and picture.width > 64
    payload = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    assert payload["step"] == 30 and payload["vocab"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]


def test_tensorboard_shows_scalars_images_and_text(trained_run):
    tags = events(trained_run).Tags()
    scalars = set(tags["scalars"])
    expected = {
        "losses/total",
        "losses/caption",
        "losses/doubly_stochastic",
        "charts/learning_rate",
        "charts/grad_norm",
        "charts/samples_per_sec",
        "eval/val_BLEU-4",
        "eval/val_attention_correctness",
        "eval/test_greedy_BLEU-4",
        "eval/test_beam2_CIDEr",
        "eval/test_beam2_attention_correctness",
    }
    assert expected <= scalars, expected - scalars
    assert {"attention/test_0", "attention/test_1"} <= set(tags["images"])
    text = {t.split("/text_summary")[0] for t in tags["tensors"]}
    assert {"hyperparameters", "samples/captions"} <= text


def test_reinforce_run_logs_its_policy_gradient_charts(tiny_config, tmp_path):
    summary = train(tiny_config("agent=reinforce", "agent.soft_warmup_steps=10"), tmp_path)
    assert summary["test"]["greedy"]["cells_read_per_word"] == 1.0  # hard: one cell per word
    scalars = set(events(tmp_path).Tags()["scalars"])
    expected = {
        "losses/policy",
        "losses/value",
        "losses/entropy",
        "charts/reward",
        "charts/return",
        "charts/baseline",
        "charts/advantage_mean",
        "charts/advantage_std",
        "charts/policy_entropy",
        "charts/explained_variance",
        "charts/soft_probability",
        "charts/cells_read",
    }
    assert expected <= scalars, expected - scalars
    images = set(events(tmp_path).Tags()["images"])
    assert {"attention/test_0", "glimpse_path/test_0"} <= images
    assert (tmp_path / "attention" / "path_test_0.png").is_file()


@pytest.mark.parametrize(
    ("overrides", "settled"),
    [
        ((), ("all", "none", 4)),  # captions over the grid: 4 + 1 cells scored per word
        (("sensor=patch", "sensor.gist_kernel=1", "encoder=glimpse"), ("episode", "value", 4)),
        (("agent.gamma=1",), ("episode", "value", 4)),
    ],
)
def test_the_runs_config_and_checkpoint_record_what_auto_became(
    overrides, settled, tiny_config, tmp_path
):
    train(tiny_config("agent=reinforce", "trainer.max_steps=3", *overrides), tmp_path)
    agent = OmegaConf.load(tmp_path / "config.yaml").agent
    assert (agent.branch, agent.baseline, agent.scored_cells) == settled
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert saved["config"]["agent"]["branch"] == settled[0]
    assert any(k.startswith("value_head.") for k in saved["model"]) == (settled[1] == "value")


def test_no_attention_agent_trains_end_to_end(tiny_config, tmp_path):
    summary = train(tiny_config("agent=no_attention", "trainer.max_steps=10"), tmp_path)
    assert summary["agent"] == "rl_attn.agents.NoAttentionAgent"
    assert 0 <= summary["test"]["greedy"]["BLEU-1"] <= 1


def test_evaluate_command_scores_a_checkpoint(trained_run, tmp_path):
    out = tmp_path / "eval.json"
    proc = run(
        "rl_attn.evaluate",
        f"checkpoint={trained_run / 'checkpoints' / 'last.pt'}",
        "beam_size=2",
        "meteor=false",
        "cost=true",
        f"output={out}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "BLEU-4" in proc.stdout
    result = json.loads(out.read_text())
    train_metrics = json.loads((trained_run / "metrics.json").read_text())["test"]["beam2"]
    assert result["metrics"]["BLEU-4"] == pytest.approx(train_metrics["BLEU-4"])
    cost = result["cost"]  # soft attention over the 8x8 grid of the tiny encoder
    assert cost["flops_encoder"] > 0 and cost["cells_read"] == 64 * cost["words"]
    assert "flops_total" in proc.stdout


def test_evaluate_reads_a_soft_checkpoint_by_argmax(trained_run, tmp_path):
    out = tmp_path / "argmax.json"
    ckpt = trained_run / "checkpoints" / "last.pt"
    args = (f"checkpoint={ckpt}", "beam_size=1", "meteor=false", "cost=true")
    proc = run("rl_attn.evaluate", *args, "test_mode=argmax", f"output={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "greedy, test_mode argmax" in proc.stdout
    result = json.loads(out.read_text())
    assert result["test_mode"] == "argmax" and result["agent"].endswith("SoftAttentionAgent")
    cost = result["cost"]  # the soft-trained map, one cell per word: its top one
    assert cost["cells_read"] == cost["words"] > 0
    proc = run("rl_attn.evaluate", *args, "test_mode=nope", f"output={out}", cwd=tmp_path)
    assert_one_line_error(proc, "error: cannot build agent rl_attn.agents.SoftAttentionAgent")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["agent=nope"],
            "error: unknown agent 'nope'; choose one of: cnn, custom, gumbel, no_attention, ppo, "
            "random, reinforce, reinforce_xu, soft",
        ),
        (
            ["task=imagenet"],
            "error: unknown task 'imagenet'; choose one of: coco, digits, flickr8k, scenes",
        ),
        (["task=coco"], "error: set the dataset's local paths: task.json_path="),
        (
            ["task=flickr8k", "task.json_path=/no/f.json", "task.image_dir=/tmp"],
            "error: caption file '/no/f.json' does not exist",
        ),
        (["encoder=alexnet"], "error: unknown encoder 'alexnet'; choose one of: conv,"),
        (["trainer.batch_size=0"], "error: trainer.batch_size must be a positive integer, got 0"),
        (["trainer.max_steps=-5"], "error: trainer.max_steps must be a positive integer, got -5"),
        (["trainer.weight_decay=-1"], "error: trainer.weight_decay must be a number >= 0"),
        (["decoder.dropout=2"], "error: cannot build the decoder from the decoder config"),
        (["trainer.lr=-1"], "error: trainer.lr must be a positive number, got -1"),
        (["trainer.device=tpu"], "error: trainer.device 'tpu' is not a device"),
        (["eval.split=train"], "error: eval.split must be val or test, got 'train'"),
        (["trainer.nonfinite=maybe"], "error: trainer.nonfinite must be stop or skip"),
        (["trainer.deterministic=yes"], "error: trainer.deterministic must be true or false"),
        (["trainer.resume=/no/such/run"], "error: trainer.resume: no checkpoint at"),
        (["agent.gamma=2"], "error: cannot build agent rl_attn.agents.ReinforceAgent: gamma"),
        (
            ["agent.cells_per_step=65"],
            "error: agent.cells_per_step=65 is more than the 64 cells (8x8)",
        ),
        (
            ["sensor=patch", "sensor.patch_size=100"],
            "error: sensor.patch_size=100 is larger than the 64-pixel images",
        ),
        (["sensor=eyes"], "error: unknown sensor 'eyes'; choose one of: grid, patch"),
        (["encoder=mlp"], "error: encoder=mlp encodes small patches, not whole images: use it"),
        (["sensor=patch", "sensor.gist_kernel=2"], "error: sensor.gist_kernel must be 1 or 3"),
        (["decoder.cell=gru"], "error: cannot build the decoder from the decoder config: decoder"),
        (["trainer.max_time_s=0"], "error: trainer.max_time_s must be a number > 0 or null"),
        (["eval.paths=0"], "error: eval.paths must be a positive integer, got 0"),
        (
            ["agent.branch=word", "agent.samples_per_image=2", "agent.gamma=1"],
            "error: cannot build agent rl_attn.agents.ReinforceAgent: branch=word needs gamma=0",
        ),
        (
            ["agent.baseline=leave_one_out"],
            "error: cannot build agent rl_attn.agents.ReinforceAgent: samples_per_image must be",
        ),
        (
            ["agent._target_=my_pkg.agents.Missing"],
            "error: cannot import agent class 'Missing' from module 'my_pkg.agents'",
        ),
    ],
)
def test_train_cli_bad_input_is_one_clear_line(args, message, tmp_path):
    assert_one_line_error(run("rl_attn.train", *args, cwd=tmp_path), message)


def test_evaluate_cli_bad_checkpoints_are_one_clear_line(tmp_path):
    not_ckpt = tmp_path / "notes.pt"
    not_ckpt.write_text("hello")
    cases = {
        f"checkpoint={tmp_path / 'absent.pt'}": "does not exist",
        f"checkpoint={not_ckpt}": "is not an rl_attn checkpoint",
        "beam_size=0": "checkpoint=PATH is required",
        "nonsense": "unexpected argument 'nonsense'",
    }
    for arg, message in cases.items():
        proc = run("rl_attn.evaluate", arg, cwd=tmp_path)
        assert proc.returncode == 2, arg
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (
            arg,
            proc.stderr,
        )


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"step": 1, "config": {}, "vocab": [], "model": RunsCode()}, bad)
    proc = run("rl_attn.evaluate", f"checkpoint={bad}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "refused" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists()
