"""Reconnect delays: exponential growth, a cap, and full jitter.

A fleet that loses its coordinator all at once must not come back all at
once: each device waits a random time in `[0, min(cap, base * 2**n))` before
its n-th retry ("full jitter"), which spreads the reconnects over the whole
window while still backing off exponentially. The delays are a pure function
of `base`, `cap` and a random source, so they are tested without sleeping.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Protocol


class UniformSource(Protocol):
    """Anything with `uniform(a, b)`, e.g. `random.Random`; tests pass a fixed one."""

    def uniform(self, a: float, b: float) -> float: ...


def backoff_delays(
    base: float, cap: float, rng: UniformSource | None = None
) -> Iterator[float]:
    """Endless retry delays: the n-th is uniform in [0, min(cap, base * 2**n)].

    The bound stops doubling once it reaches `cap`, so it never overflows.
    """
    if base <= 0 or cap <= 0:
        raise ValueError(f"base and cap must be positive, got {base}, {cap}")
    rng = rng or random.Random()
    bound = min(base, cap)
    while True:
        yield rng.uniform(0.0, bound)
        bound = min(cap, bound * 2)


class Backoff:
    """Stateful wrapper: `next_delay()` after each failure, `reset()` after a success."""

    def __init__(self, base: float, cap: float, rng: UniformSource | None = None) -> None:
        self.base, self.cap = base, cap
        self._rng = rng or random.Random()
        self.failures = 0
        self._delays = backoff_delays(base, cap, self._rng)

    def next_delay(self) -> float:
        """The delay before the next retry; each call widens the window (up to `cap`)."""
        self.failures += 1
        return next(self._delays)

    def reset(self) -> None:
        """Back to the shortest window: the link works again."""
        if self.failures:
            self.failures = 0
            self._delays = backoff_delays(self.base, self.cap, self._rng)
