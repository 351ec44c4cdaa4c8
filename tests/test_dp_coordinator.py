"""DP-FedAvg on the coordinator, real processes on 127.0.0.1 (docs/privacy.md).

Two devices, one of them a stock Flower ClientApp, both sampled every round
(q = 1): the coordinator's round lines state epsilon, the store and registry
keep it per round and version, and `dp-max-epsilon` between rounds 2 and 3
stops the run before round 3 with one line, keeping round 2's model.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_coordinator_e2e import fleet_of

from fedge.demo import wait_for_line
from fedge.server.dp import epsilon_for
from fedge.server.store import RoundStatus, RunStatus, Store

pytestmark = pytest.mark.timeout(240)


def test_coordinator_states_epsilon_and_stops_at_the_budget(tmp_path: Path) -> None:
    eps = [epsilon_for(1.0, 2, 2, r, 1e-3) for r in (1, 2, 3)]
    budget = (eps[1] + eps[2]) / 2
    with fleet_of(tmp_path) as fleet:
        coordinator = fleet.start_coordinator(
            "--rounds", "3", "--min-devices", "2", "--min-train-nodes", "2", "--codec", "int8",
            "--round-timeout", "90", "--run-config",
            f"dp-noise=1.0 dp-clip=1.0 dp-delta=0.001 dp-max-epsilon={budget}")
        for i, app in enumerate(["fedge.client.client_app:app", "e2e_apps:stock_app"]):
            fleet.start_device(f"dev{i}", "--partition-id", str(i), "--num-partitions", "2",
                               "--app", app)
        first = wait_for_line(coordinator, re.compile(r"^round 1/3: .*DP epsilon ([\d.]+) "
                                                      r"\(delta 0\.001\)$"), 150)
        assert float(first.group(1)) == pytest.approx(eps[0], abs=1e-3)
        stop = wait_for_line(coordinator, re.compile(r"^run \d+: DP budget: stopping before "
                                                     r"round 3.*keeping the model of round 2"),
                             150)
        assert str(budget)[:4] in stop.group(0)
        assert fleet.wait_coordinator(60) == 0
        rounds, status = fleet.rounds()
        with Store.open(tmp_path / "state" / "fedge.db") as store:
            evaluations = [store.get_model(r.model_version).evaluation for r in rounds]
    assert status == RunStatus.COMPLETED
    assert [r.round for r in rounds if r.status == RoundStatus.COMPLETED] == [1, 2]
    assert [r.metrics.epsilon for r in rounds] == pytest.approx(eps[:2], rel=1e-9)
    assert all(r.metrics.accepted == 2 for r in rounds)  # the stock device's reply too
    assert [e["dp-epsilon"] for e in evaluations] == pytest.approx(eps[:2], rel=1e-9)
    assert not any(line.startswith("round 3/3") for line in coordinator.lines)
