"""Build the task, encoder, decoder and agent that a config names."""

from __future__ import annotations

import inspect
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from rl_attn.agents.base import Agent, CaptionAgent
from rl_attn.decoder import Decoder
from rl_attn.encoder import Encoder
from rl_attn.envs.sensors import GridSensor, PatchSensor, Sensor
from rl_attn.errors import UserError


def target_of(node: DictConfig, what: str) -> str:
    """The ``_target_`` of a config node, or a :class:`UserError` saying how to set it."""
    if isinstance(node, DictConfig) and OmegaConf.is_missing(node, "_target_"):
        raise UserError(f"{what}._target_ is not set; name your class: {what}._target_=pkg.Class")
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        raise UserError(f"the {what} config has no _target_ naming the class to build")
    return str(target)


def locate(target: str, what: str) -> Any:
    """Import the class or function ``target`` names; say which module or name failed and why."""
    try:
        return hydra.utils.get_object(target)
    except Exception as exc:  # ImportError, AttributeError, or whatever the module raises
        module, _, name = target.rpartition(".")
        reason = str(exc.__cause__ or exc).splitlines()[0]
        raise UserError(
            f"cannot import {what} class {name!r} from module {module!r} "
            f"(_target_={target}): {reason}"
        ) from None


def instantiate(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` whose failures become one-line :class:`UserError` messages."""
    target = target_of(node, what)
    locate(target, what)
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, UserError):
            raise cause from None
        raise UserError(f"cannot build {what} {target}: {str(cause).splitlines()[0]}") from None


def check_targets(cfg: DictConfig) -> None:
    """Import every ``_target_`` now, so a typo is reported before minutes of data work."""
    for what in ("agent", "encoder", "task", "sensor"):
        if what in cfg:
            locate(target_of(cfg[what], what), what)


def settle_agent(cfg: DictConfig, classification: bool) -> None:
    """Write into ``cfg.agent`` what its ``auto`` settings mean for this task and sensor, so
    the run's config and checkpoints hold what ran: the agent class's
    ``resolve_auto(settings, patch=..., classification=...)``, for a class that has one (see
    :meth:`~rl_attn.agents.ReinforceAgent.resolve_auto`)."""
    resolve = getattr(locate(target_of(cfg.agent, "agent"), "agent"), "resolve_auto", None)
    if resolve is None:
        return
    node = cfg.get("sensor")
    sensor = locate(target_of(node, "sensor"), "sensor") if node is not None else GridSensor
    patch = isinstance(sensor, type) and issubclass(sensor, PatchSensor)
    settings = OmegaConf.to_container(cfg.agent, resolve=True)
    for key, value in resolve(settings, patch=patch, classification=classification).items():
        if key in cfg.agent:
            cfg.agent[key] = value


def build_task(cfg: DictConfig) -> dict[str, Any]:
    """The task's splits: ``{"train": ..., "val": ..., "test": ...}``."""
    return instantiate(cfg.task, "task", _convert_="all")


def build_sensor(cfg: DictConfig, encoder: Encoder) -> Sensor:
    """The sensor ``cfg.sensor`` names (a grid sensor when the config has none, as in
    checkpoints written before sensors existed)."""
    node = cfg.get("sensor")
    if node is None:
        return GridSensor()
    target = target_of(node, "sensor")
    extra = {"dim": encoder.out_dim} if "dim" in _parameters(locate(target, "sensor")) else {}
    sensor = instantiate(node, "sensor", _convert_="all", **extra)
    if not isinstance(sensor, Sensor):
        raise UserError(f"sensor {target} is a {type(sensor).__name__}, not a Sensor subclass")
    return sensor


def _parameters(cls: Any) -> set[str]:
    try:
        return set(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return set()


def build_agent(cfg: DictConfig, vocab_size: int) -> Agent:
    """Encoder + sensor + shared decoder + the agent named by ``cfg.agent``. An
    :class:`Agent` that is no :class:`CaptionAgent` (the plain CNN: it chooses no location)
    gets ``vocab_size`` instead of a decoder."""
    encoder: Encoder = instantiate(cfg.encoder, "encoder", _convert_="all")
    sensor = build_sensor(cfg, encoder)
    target = target_of(cfg.agent, "agent")
    cls = locate(target, "agent")
    looks = not (isinstance(cls, type) and issubclass(cls, Agent)) or issubclass(cls, CaptionAgent)
    extra: dict[str, Any] = (
        {"decoder": _decoder(cfg, vocab_size, encoder, sensor)}
        if looks
        else {"vocab_size": vocab_size}
    )
    agent = instantiate(cfg.agent, "agent", encoder=encoder, **extra)
    if not isinstance(agent, Agent):
        raise UserError(
            f"agent {target} is a {type(agent).__name__}, not a "
            "rl_attn.agents.CaptionAgent subclass"
        )
    agent.use_sensor(sensor)
    return agent


def _decoder(cfg: DictConfig, vocab_size: int, encoder: Encoder, sensor: Sensor) -> Decoder:
    try:
        return Decoder(
            vocab_size,
            encoder.out_dim,
            key_dim=sensor.key_dim(encoder),
            **OmegaConf.to_container(cfg.decoder),
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot build the decoder from the decoder config: {exc}") from None


def fit_to_images(agent: Agent, image_size: int) -> tuple[tuple[int, int], int]:
    """The cell grid ``(h, w)`` of ``agent`` on square images of ``image_size`` pixels, and
    its cells per step (``agent.cells_per_step``) when they exceed the ``h * w`` cells (else
    0). The sensor raises a :class:`UserError` itself when it cannot work on such images."""
    agent.sensor.check_image_size(agent.encoder, image_size)
    h, w = agent.grid_shape(image_size)
    cells = getattr(agent, "cells_per_step", 1)
    return (h, w), cells if cells > h * w else 0
