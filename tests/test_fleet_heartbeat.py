"""The heartbeat interval a coordinator announces grows with its fleet; liveness follows it."""

from __future__ import annotations

from fedge.server.fleet import Fleet


def test_interval_stretches_with_the_fleet_and_liveness_follows() -> None:
    now = [0.0]
    fleet = Fleet(heartbeat_interval_s=2.0, max_heartbeats_per_s=1.0, clock=lambda: now[0])
    fleet.join("first", 1, "first")
    assert fleet.heartbeat_interval_s == 2.0  # a small fleet: the configured interval
    for i in range(5):
        fleet.join(f"d{i}", 10 + i, "d")
    assert fleet.heartbeat_interval_s == 6.0  # 6 sessions at one heartbeat a second at most
    assert fleet.liveness_s == 18.0  # three of the longest intervals told
    now[0] = 17.0
    assert 1 in fleet.live_node_ids()  # told 6 s: not gone after 3 x 2 s of silence
    now[0] = 18.5
    assert fleet.live_node_ids() == []


def test_a_stretched_interval_is_whole_seconds_and_never_below_the_floor() -> None:
    fleet = Fleet(heartbeat_interval_s=0.5, max_heartbeats_per_s=3.0)
    fleet.join("a", 1, "a")
    assert fleet.heartbeat_interval_s == 0.5  # 1/3 s is below the floor: no rounding up
    for i in range(4):
        fleet.join(f"d{i}", 10 + i, "d")
    assert fleet.heartbeat_interval_s == 2.0  # 5 / 3 = 1.67 s, rounded up


def test_zero_budget_never_stretches() -> None:
    fleet = Fleet(heartbeat_interval_s=1.0, max_heartbeats_per_s=0)
    for i in range(100):
        fleet.join(f"d{i}", i, "d")
    assert fleet.heartbeat_interval_s == 1.0 and fleet.liveness_s == 3.0
