"""The memory-budget path of `fedge bench edge`: a real device process in a real memory cgroup.

A device (`python -m fedge.client.cli run`, the digits model) joins the test
coordinator on 127.0.0.1 from inside a cgroup v1 memory cgroup the bench makes:
with room it finishes its round and nothing is OOM-killed; with a limit below
what torch alone needs the kernel kills it, and the bench says so. Either way
the cgroup is gone afterwards.
"""

from __future__ import annotations

import pytest

from fedge.bench import edge_bench
from fedge.bench.edge_bench import MemoryCgroup, cgroup_v1_unusable, run_in_cgroup

UNUSABLE = cgroup_v1_unusable()
needs_cgroup = pytest.mark.skipif(
    UNUSABLE is not None,
    reason=f"cgroup v1 memory controller not writable here ({UNUSABLE}); "
    "run as root on a cgroup v1 host",
)


def _bench_cgroups() -> set[str]:
    return {p.name for p in edge_bench.CGROUP_V1_MEMORY.glob("fedge-bench-*")}


@needs_cgroup
def test_digits_device_finishes_its_round_within_the_limit(monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    before = _bench_cgroups()
    result = run_in_cgroup(512, task="digits", coordinator="fake", rounds=1,
                           timeout_s=240, idle_s=0.5)
    assert result.get("error") is None, result
    assert result["ok"] is True
    assert result["oom_kills"] == 0
    # the figures come from the limited process and fit under its limit
    assert 0 < result["training_peak_rss_mb"] <= 512
    assert 0 < result["waiting_rss_mb"] < result["training_peak_rss_mb"]
    assert 0 < result["cgroup_peak_mb"] <= 512
    assert _bench_cgroups() == before


@needs_cgroup
def test_a_limit_below_torch_is_an_oom_kill_and_a_failure(monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    before = _bench_cgroups()
    # enough to join and wait (gRPC + protobuf), far too little once torch is imported
    result = run_in_cgroup(100, task="digits", coordinator="fake", rounds=1,
                           timeout_s=240, idle_s=0.5)
    assert result["ok"] is False
    assert result["oom_kills"] >= 1
    assert result["cgroup_peak_mb"] <= 100
    assert _bench_cgroups() == before


@needs_cgroup
def test_the_cgroup_enforces_its_limit_and_is_removed():
    with MemoryCgroup(64) as cg:
        limit = int((cg.path / "memory.limit_in_bytes").read_text())
        assert limit <= 64_000_000
        assert cg.path.is_dir()
        assert cg.pids() == []
    assert not cg.path.exists()


def test_bisection_finds_the_threshold_within_the_resolution():
    threshold = 301
    seen: list[float] = []

    def passes(mb: float) -> bool:
        seen.append(mb)
        return mb >= threshold

    smallest, tried = edge_bench.smallest_passing_limit(
        passes, 512, floor_mb=96, resolution_mb=16, max_trials=10
    )
    assert tried == seen
    assert threshold <= smallest < threshold + 16
    assert len(tried) <= 5


def test_bisection_stops_after_its_trials_with_an_upper_bound():
    smallest, tried = edge_bench.smallest_passing_limit(
        lambda mb: mb >= 100, 512, floor_mb=96, resolution_mb=1, max_trials=2
    )
    assert len(tried) == 2
    assert smallest >= 100  # never below what passed


def test_goals_report_the_gap_where_not_met():
    goals = edge_bench._goals({"training_peak_rss_mb": 349.1, "waiting_rss_mb": 45.6})
    assert goals["training"] is False
    assert goals["training_gap_mb"] == pytest.approx(49.1)
    assert goals["waiting"] is True
    assert "waiting_gap_mb" not in goals
