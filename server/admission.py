"""Admission control for Join: a burst of devices is paced, not let in all at once.

After a coordinator restart every device of the fleet reconnects within
seconds. Each one costs a TLS handshake (gRPC's C core, before any Python
runs) and then a Join: a registry write and a session, and from then on a
long poll and heartbeats. Admitting ten thousand Joins in the same second
makes their heartbeats and polls fall due in the same second too, forever
after, and stalls every other call behind the burst.

`JoinPacer` admits Joins at a steady rate (`per_s`): a Join that arrives
while others are ahead waits its turn, on its already open connection (no
second handshake), for up to `max_wait_s`; a Join that would wait longer is
refused at once with RESOURCE_EXHAUSTED, and the device backs off with
jitter (`fedge.client.backoff`: any refusal of Join but identity ones is a
`LinkDown` to the edge runtime) and tries again later on the same
connection. The pacer is virtual scheduling (each admitted Join reserves the
next slot), so it holds one number, whatever the size of the burst.
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_JOINS_PER_S = 200.0
"""Joins admitted a second: 10,000 devices in 50 s (a Join is a registry write and a session)."""
DEFAULT_MAX_WAIT_S = 5.0
"""The longest a Join waits for its turn (a queue of `per_s x max_wait_s` Joins, 1,000)."""


class JoinPacer:
    """`reserve()`: seconds this Join waits before it is served, or None (refuse: too busy)."""

    def __init__(
        self,
        per_s: float = DEFAULT_JOINS_PER_S,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_s < 0 or max_wait_s < 0:
            raise ValueError("join pacing must not be negative")
        self.spacing_s = 1.0 / per_s if per_s > 0 else 0.0  # 0: no pacing
        self.max_wait_s = float(max_wait_s)
        self._clock = clock
        self._next_slot = float("-inf")
        self.refused = 0  # Joins turned away since start (a figure for the operator)

    def reserve(self) -> float | None:
        """Take the next free slot: the wait until it (0.0: now), or None if past `max_wait_s`.

        Called on the event loop's thread only (the servicer), so no lock.
        """
        if self.spacing_s == 0.0:
            return 0.0
        now = self._clock()
        slot = max(now, self._next_slot)
        wait = slot - now
        if wait > self.max_wait_s:
            self.refused += 1
            return None
        self._next_slot = slot + self.spacing_s
        return wait
