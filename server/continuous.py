"""Continuous learning: rounds without end, each version gated before it becomes `current`.

Design (docs/models.md, "Continuous mode"): the coordinator runs a loop of
one-round ServerApp runs on the same `GrpcGrid`. Round `r` is the ServerApp
with `first-round` = `num-rounds` = r and `initial-model` = the file of the
registry's `current` version, so devices always train from `current` and a
rejected candidate never becomes the base of the next round. The round ends
in `RoundKeeper.persist` (`round_keeper.py`) as in a normal run (model
written, round committed durably), then the keeper's gate
(`Registry.gate(margin)`) decides whether the new version becomes `current`;
a refusal is logged with its reason and the version stays in the registry as
`rejected`.

A round starts when at least `min_ready` training devices are live, or,
with `every_minutes`, when that long has passed since the last round ended
and at least `min_train_nodes` devices are live. Stopping (SIGTERM) makes
the Grid raise `GridStopped` at the next call; a round cut short is not
committed, and a restart resumes at the round after the last committed one
from `current`.

Test hook: run-config key `lr-round-<r>` (e.g. `lr-round-3=-2.0`) sets the
learning rate of round `r` alone, to force a bad version.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

RoundTrigger = Literal["ready", "timer", "stopped"]
"""Why `wait_for_round` returned: enough devices, the timer, or the coordinator stopping."""


@dataclass(frozen=True)
class ContinuousSettings:
    """`fedge coordinator run --continuous` options."""

    min_ready: int = 2
    every_minutes: float = 0.0  # 0: only `min_ready` starts a round
    promote_margin: float = 0.01
    metric: str = "accuracy"
    poll_s: float = 0.2

    def __post_init__(self) -> None:
        if self.min_ready < 1:
            raise ValueError("min_ready must be at least 1")
        if self.every_minutes < 0 or self.promote_margin < 0:
            raise ValueError("every_minutes and promote_margin must not be negative")


def round_config(
    run_config: Mapping[str, Any],
    server_round: int,
    initial_model: str,
    *,
    reset_residual: bool = False,
) -> dict:
    """One continuous round's run config: round `server_round` alone, from `initial_model`.

    `reset_residual` (the previous round's candidate was rejected, so this
    round's base is not the model its updates went into): devices drop their
    error-feedback residual, which holds the unsent part of a discarded update.
    """
    config = {
        **run_config,
        "first-round": server_round,
        "num-rounds": server_round,
        "initial-model": initial_model,
    }
    if reset_residual:
        config["reset-residual"] = True
    override = run_config.get(f"lr-round-{server_round}")
    if override is not None:
        config["lr"] = float(override)
    return config


def wait_for_round(
    live_count: Callable[[], int],
    settings: ContinuousSettings,
    *,
    min_train_nodes: int,
    last_round_end: float,
    stopped: Callable[[], bool],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Any] = time.sleep,
) -> RoundTrigger:
    """Block until a round should start; returns why ("ready", "timer") or "stopped"."""
    every_s = settings.every_minutes * 60.0
    while True:
        if stopped():
            return "stopped"
        n = live_count()
        if n >= settings.min_ready:
            return "ready"
        if every_s and clock() - last_round_end >= every_s and n >= max(1, min_train_nodes):
            return "timer"
        sleep(settings.poll_s)
