"""Join admission control: a burst is paced, what would wait too long is refused and retries."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from coordinator_harness import RawDevice, ServiceHarness, status_of

from fedge.server.admission import JoinPacer
from fedge.server.coordinator_service import ServiceSettings


def test_pacer_spaces_a_burst_and_refuses_past_the_longest_wait() -> None:
    now = [100.0]
    pacer = JoinPacer(per_s=10.0, max_wait_s=0.25, clock=lambda: now[0])
    waits = [pacer.reserve() for _ in range(5)]
    assert waits[:3] == pytest.approx([0.0, 0.1, 0.2])  # three slots within 0.25 s
    assert waits[3:] == [None, None] and pacer.refused == 2
    now[0] += 1.0  # the burst has drained: the next Join goes at once
    assert pacer.reserve() == 0.0


def test_pacer_at_zero_rate_admits_everything() -> None:
    pacer = JoinPacer(per_s=0, max_wait_s=0)
    assert all(pacer.reserve() == 0.0 for _ in range(1000)) and pacer.refused == 0


async def test_a_join_past_the_pace_is_refused_and_a_later_one_admitted(tmp_path: Path) -> None:
    h = ServiceHarness(tmp_path, settings=ServiceSettings(joins_per_s=1.0, join_wait_s=0.0))
    await h.start()
    now = [0.0]
    assert h.service.joins.spacing_s == 1.0  # the settings reach the pacer
    h.service.joins = JoinPacer(1.0, 0.0, clock=lambda: now[0])  # the same pace, our clock
    try:
        first, second = RawDevice(h.target, "a"), RawDevice(h.target, "b")
        await first.join()  # the first slot is free
        assert await status_of(second.join()) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert h.service.joins.refused == 1
        assert h.fleet.device(first.device_id) is not None
        now[0] += 1.0  # the next slot came round
        reply = await second.join()  # the same connection: no second handshake
        assert reply.session_token and h.fleet.device(reply.device_id) is not None
        await first.close()
        await second.close()
    finally:
        await h.stop()
