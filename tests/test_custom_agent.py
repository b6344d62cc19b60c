"""Runs docs/custom_agent.md exactly: its files, then its commands (with a tiny budget added)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import TINY

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom_agent.md"


def walkthrough():
    blocks = re.findall(r"```(\w+)\n(.*?)```", DOC.read_text(), flags=re.S)
    files = {}
    commands = []
    for lang, body in blocks:
        first = body.splitlines()[0]
        if first.startswith("# file: "):
            files[first.removeprefix("# file: ").strip()] = body
        elif lang == "bash":
            commands += [line for line in body.splitlines() if line.startswith("python -m")]
    return files, commands


def test_the_walkthrough_runs_as_written(tmp_path):
    files, commands = walkthrough()
    assert set(files) == {"my_agents.py", "my_configs/agent/random_glimpse.yaml"}
    assert len(commands) == 3
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    for command in commands:
        argv = shlex.split(command)
        assert argv[:2] == ["python", "-m"]
        extra = [*TINY, "trainer.max_steps=5"] if argv[2] == "rl_attn.train" else ["meteor=false"]
        proc = subprocess.run(
            [sys.executable, *argv[1:], *extra], cwd=tmp_path, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
    summary = (tmp_path / "runs" / "random" / "metrics.json").read_text()
    assert "my_agents.RandomGlimpseAgent" in summary
    assert (tmp_path / "runs" / "random" / "eval_test_beam3.json").is_file()
    assert (tmp_path / "runs" / "random2" / "checkpoints" / "last.pt").is_file()


def test_a_misspelt_class_is_one_clear_line(tmp_path):
    files, _ = walkthrough()
    (tmp_path / "my_agents.py").write_text(files["my_agents.py"])
    proc = subprocess.run(
        [sys.executable, "-m", "rl_attn.train", "agent=custom",
         "agent._target_=my_agents.RandomGlimpseAgnt", "trainer.progress=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(
        "error: cannot import agent class 'RandomGlimpseAgnt' from module 'my_agents'"
    )
    assert len(proc.stderr.strip().splitlines()) == 1


def test_custom_without_a_target_says_what_to_set(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rl_attn.train", "agent=custom"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "agent._target_ is not set" in proc.stderr
