"""Reconnect delays: exponential windows, capped, with full jitter."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from fedge.client.backoff import Backoff, backoff_delays


class Top:
    """A 'random' source that always answers the top of the window: shows the bounds."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_windows_double_then_stay_at_the_cap() -> None:
    bounds = list(itertools.islice(backoff_delays(0.5, 10.0, Top()), 8))
    assert bounds == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_never_overflows_after_many_failures() -> None:
    delays = backoff_delays(0.1, 60.0, Top())
    last = list(itertools.islice(delays, 5000))[-1]
    assert last == 60.0


def test_delays_are_jittered_over_the_whole_window() -> None:
    rng = random.Random(1)
    n, cap = 2000, 8.0
    # the 10th delay onwards: window is the cap
    samples = [list(itertools.islice(backoff_delays(0.5, cap, rng), 12))[-1] for _ in range(n)]
    assert all(0.0 <= d <= cap for d in samples)
    assert len(set(samples)) == n  # no two devices wait the same time
    assert statistics.mean(samples) == pytest.approx(cap / 2, rel=0.08)  # full jitter: U(0, cap)
    assert min(samples) < 0.1 * cap and max(samples) > 0.9 * cap


def test_each_delay_stays_in_its_window_and_windows_grow() -> None:
    rng = random.Random(7)
    runs = [list(itertools.islice(backoff_delays(1.0, 30.0, rng), 6)) for _ in range(500)]
    for i in range(6):
        column = [r[i] for r in runs]
        assert max(column) <= min(30.0, 2**i)
    means = [statistics.mean(r[i] for r in runs) for i in range(6)]
    assert means == sorted(means)  # exponential growth on average
    assert means[4] > 6 * means[0]


def test_backoff_resets_after_success() -> None:
    b = Backoff(1.0, 100.0, Top())
    assert [b.next_delay() for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert b.failures == 4
    b.reset()
    assert b.failures == 0 and b.next_delay() == 1.0


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        next(backoff_delays(0.0, 1.0))
    with pytest.raises(ValueError):
        next(backoff_delays(1.0, -1.0))
