"""Device and network profiles: what a round would cost on real devices.

A profile is an uplink and a downlink speed and a compute factor (device
seconds per second of the same training on one core of this machine). The
estimate for one round is

    seconds = max over the round's sampled clients of
              (downlink bytes / down + compute + uplink bytes / up)

with, from a run's report: bytes per message (the round's downlink bytes over
its messages) and per reply (uplink over accepted replies); compute = factor x
seconds per training example measured here (`calibrate`) x the expected
largest number of examples among the clients sampled in a round (from the
actual partition sizes: clients differ, the slowest one sets the pace). No
latency, retries or stragglers beyond that: a lower bound a designer can read
codecs against, not a promise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Profile:
    """A device class on a network: Mbit/s each way and compute speed relative to here."""

    name: str
    uplink_mbps: float
    downlink_mbps: float
    compute_factor: float
    about: str


#: rough, stated assumptions (compute factors: PyTorch CPU training vs one EPYC core here)
PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("pi4-lte", 5.0, 20.0, 4.0,
                "Raspberry Pi 4 (Cortex-A72, 1.5 GHz) on LTE: ~4x slower than one core here"),
        Profile("phone-wifi", 20.0, 50.0, 1.5,
                "mid-range phone on home Wi-Fi: ~1.5x slower than one core here"),
        Profile("pi-zero-3g", 0.5, 2.0, 15.0,
                "Raspberry Pi Zero 2 W (Cortex-A53, 1 GHz) on 3G: ~15x slower"),
    )
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose {', '.join(PROFILES)}") from None


def calibrate(task_name: str, config: Mapping[str, Any], clients: int, batch_size: int,
              lr: float, examples: int = 256) -> float:
    """Seconds per training example of the task's model here (one thread, fedge's train),
    timed on client 0's data."""
    from fedge.common.task import resolve_task
    from fedge.common.training import torch_threads, train

    task = resolve_task(task_name)
    data = task.partition_fn(0, clients, dict(config))
    n = min(examples, data.num_train)
    model = task.make_model()
    with torch_threads(1):
        train(model, data.x_train[:8], data.y_train[:8], epochs=1, batch_size=batch_size, lr=lr)
        started = time.perf_counter()
        train(model, data.x_train[:n], data.y_train[:n], epochs=1, batch_size=batch_size,
              lr=lr)
    return (time.perf_counter() - started) / max(1, n)


def expected_max_examples(sizes: Sequence[int], per_round: int, draws: int = 2000,
                          seed: int = 0) -> float:
    """Mean, over random rounds, of the largest training set among `per_round` clients."""
    sizes_a = np.asarray(sizes, dtype=np.float64)
    k = min(per_round, len(sizes_a))
    rng = np.random.default_rng(seed)
    picks = np.argsort(rng.random((draws, len(sizes_a))), axis=1)[:, :k]
    return float(sizes_a[picks].max(axis=1).mean())


def partition_sizes(task_name: str, config: Mapping[str, Any], clients: int) -> list[int]:
    """Training examples of every client (loaded one by one and dropped, not memoised)."""
    from fedge.common.task import resolve_task

    task = resolve_task(task_name)
    return [task.partition_fn(i, clients, dict(config)).num_train for i in range(clients)]


def round_seconds(record: Mapping[str, Any], profile: Profile, compute_here: float,
                  messages: int) -> float:
    """One round's estimated seconds on `profile` (see the module docstring)."""
    replies = max(1, int(record.get("accepted") or messages))
    down = float(record.get("downlink_bytes") or 0) / max(1, messages)
    up = float(record.get("uplink_bytes") or 0) / replies
    return (down * 8 / (profile.downlink_mbps * 1e6) + profile.compute_factor * compute_here
            + up * 8 / (profile.uplink_mbps * 1e6))


def estimate(rounds: Sequence[Mapping[str, Any]], profile: Profile, compute_here: float,
             messages: int, target: float) -> dict[str, Any]:
    """Seconds per round (mean) and time to the target accuracy on `profile`."""
    total = 0.0
    reached: float | None = None
    rounds_to_target: int | None = None
    per_round = []
    for record in rounds:
        seconds = round_seconds(record, profile, compute_here, messages)
        per_round.append(seconds)
        total += seconds
        acc = record.get("accuracy")
        if reached is None and acc is not None and acc >= target:
            reached, rounds_to_target = total, int(record["round"])
    return {
        "profile": asdict(profile),
        "seconds_per_round": round(float(np.mean(per_round)), 3) if per_round else None,
        "rounds_to_target": rounds_to_target,
        "time_to_target_s": None if reached is None else round(reached, 1),
    }
