"""Command-line plumbing: user mistakes end as one line ``error: ...`` and exit status 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TypeVar

from rl_attn.errors import UserError

GROUPS = ("agent", "task", "encoder", "sensor")
T = TypeVar("T")


def fail(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one copy of the message
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_cli(fn: Callable[..., T], *args: object) -> T:
    """Call ``fn``; a :class:`UserError` becomes ``error: <message>`` on stderr and exit 2."""
    try:
        return fn(*args)
    except UserError as exc:
        fail(str(exc))
        raise AssertionError("unreachable") from exc


def search_dirs(argv: Sequence[str]) -> list[Path]:
    """Config folders the user added with ``--config-dir`` / ``-cd`` or ``hydra.searchpath``."""
    dirs: list[Path] = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
        elif arg.lstrip("+").startswith("hydra.searchpath="):
            items = arg.split("=", 1)[1].strip("[]").split(",")
            for item in items:
                item = item.strip().strip("'\"")
                if item.startswith("pkg://"):
                    try:
                        dirs.append(Path(str(resources.files(item[6:].replace("/", ".")))))
                    except ModuleNotFoundError:
                        pass
                elif item:
                    dirs.append(Path(item.removeprefix("file://")))
    return dirs


def group_options(group: str, extra_dirs: Sequence[Path] = ()) -> list[str]:
    """Names of the configs in ``group``: the package's own and those in ``extra_dirs``."""
    found = {
        Path(entry.name).stem
        for entry in resources.files("rl_attn.configs").joinpath(group).iterdir()
        if entry.name.endswith(".yaml")
    }
    for d in extra_dirs:
        if (d / group).is_dir():
            found.update(p.stem for p in (d / group).glob("*.yaml"))
    return sorted(found)


def check_group_choices(argv: Sequence[str]) -> None:
    """Exit with ``error: unknown agent 'x'; choose one of: ...`` before Hydra starts, so a
    typo in a group name costs one line instead of Hydra's multi-line report."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    extra = search_dirs(argv)
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if key not in GROUPS or "(" in value:
            continue  # sweeps like glob(...) are Hydra's to expand
        values = value.split(",") if multirun else [value]
        options = group_options(key, extra)
        for v in values:
            if v.strip() not in options:
                fail(f"unknown {key} {v.strip()!r}; choose one of: {', '.join(options)}")
