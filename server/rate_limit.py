"""A sliding-window cap on attempts, per source address and in total, in bounded memory.

Enrollment is the one RPC a stranger can call, so it gets a budget: at most
`per_source` attempts per source and `total` attempts overall in any
`window_s` seconds. The window slides (a log of attempt times, not fixed
buckets), so a burst cannot straddle a bucket boundary to get twice the cap.

Memory is bounded: each source keeps at most `per_source` timestamps
(a `deque(maxlen=...)`), and at most `max_sources` sources are tracked; the
least recently seen is dropped first. Dropping a source forgets its history,
which the global cap still bounds: a flood from many addresses hits `total`.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable


class RateLimiter:
    """`allow(source)` answers whether one more attempt fits; a refused attempt is not counted."""

    def __init__(
        self,
        *,
        per_source: int = 10,
        total: int = 100,
        window_s: float = 60.0,
        max_sources: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_source < 1 or total < 1 or window_s <= 0 or max_sources < 1:
            raise ValueError("rate limits must be positive")
        self.per_source = per_source
        self.total = total
        self.window_s = window_s
        self.max_sources = max_sources
        self._clock = clock
        self._all: deque[float] = deque(maxlen=total)
        self._by_source: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, source: str) -> bool:
        """Record an attempt from `source` and return True, or return False if over a cap."""
        with self._lock:
            now = self._clock()
            since = now - self.window_s
            if _full(self._all, since):
                return False
            log = self._by_source.get(source)
            if log is not None:
                if _full(log, since):
                    return False
                self._by_source.move_to_end(source)
            else:
                if len(self._by_source) >= self.max_sources:
                    self._by_source.popitem(last=False)
                log = self._by_source[source] = deque(maxlen=self.per_source)
            log.append(now)
            self._all.append(now)
            return True

    @property
    def tracked_sources(self) -> int:
        return len(self._by_source)


def _full(log: deque[float], since: float) -> bool:
    """A log at its length whose oldest entry is still inside the window is full."""
    return len(log) == log.maxlen and log[0] > since


def source_of(peer: str) -> str:
    """The rate-limit key of a gRPC peer string: its IP, IPv6 narrowed to the /64.

    `ipv4:10.0.0.5:4321` -> `10.0.0.5`; `ipv6:[2001:db8::1]:4321` ->
    `2001:db8::/64` (one host usually owns a whole /64, so counting single
    IPv6 addresses would give it billions of budgets). Anything else is
    kept as given.
    """
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return source_of_address(rest.rsplit(":", 1)[0])
    return peer


def source_of_address(host: str) -> str:
    """The rate-limit key of a bare address (an HTTP client's): IPv6 narrowed to the /64."""
    host = host.strip("[]").split("%", 1)[0]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv4Address):
        return str(addr)
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.IPv6Network((addr, 64), strict=False))
