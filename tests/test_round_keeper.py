"""`RoundKeeper`: a round's durable end and the promotion gate, on real SQLite and a real Grid.

- a run with an end: the round is closed (its leftover task expires), its model written,
  the round committed with contributors and dropped devices, the version promoted;
- continuous mode: a version worse than `current` by more than the margin is rejected
  with its reason and the next round trains from `current`; an unevaluated one is
  rejected too; lineage records the base each round trained from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedge.common.snapshot import snapshot_to_arrays
from fedge.server.continuous import ContinuousSettings
from fedge.server.fleet import Fleet
from fedge.server.grpc_grid import GrpcGrid
from fedge.server.metrics import Metrics
from fedge.server.model_store import ModelStore
from fedge.server.registry import Registry
from fedge.server.round_keeper import RoundKeeper, snapshot_bytes
from fedge.server.round_metrics import RoundMetrics
from fedge.server.server_app import RoundEnd
from fedge.server.store import RoundStatus, Store, TaskState

RUN_ID = 4242


class Parts:
    """A run's state, a Grid with joined devices, and a keeper over them."""

    def __init__(self, tmp: Path, gate: ContinuousSettings | None) -> None:
        self.store = Store.open(tmp / "fedge.db")
        self.models = ModelStore(tmp / "models")
        self.registry = Registry(self.store, self.models)
        self.initial = self.models.put(snapshot_bytes({"w": np.zeros(3, np.float32)}, "t"))
        self.store.create_run(RUN_ID, {"task": "t"}, model_version=self.initial)
        if gate is not None:
            self.registry.promote(self.initial, reason="start")
        self.fleet = Fleet()
        self.grid = GrpcGrid(self.store, self.fleet, run_id=RUN_ID, device_run_config={})
        self.lines: list[str] = []
        self.keeper = RoundKeeper(
            self.store, self.models, self.registry, self.grid, Metrics(),
            run_id=RUN_ID, task_ref="t", model_version=self.initial, gate=gate,
            out=self.lines.append,
        )
        self.nodes: dict[str, int] = {}

    def join(self, *names: str) -> None:
        for name in names:
            device = self.store.register_device(name, device_id=name)
            self.fleet.join(device.id, device.node_id, name)
            self.nodes[name] = device.node_id

    def task_round(self, server_round: int) -> list[str]:
        """Give every joined device a train task of `server_round`; returns the task ids."""
        config = ConfigRecord({"server-round": server_round})
        return list(self.grid.push_messages(
            Message(RecordDict({"config": config}), node, "train") for node in self.nodes.values()
        ))

    def end(self, server_round: int, value: float, accuracy: float | None,
            *contributors: str) -> RoundEnd:
        metrics = RoundMetrics(round=server_round, accuracy=accuracy, accepted=len(contributors),
                               uplink_bytes=100, downlink_bytes=200)
        arrays = ArrayRecord({"w": Array(np.full(3, value, np.float32))})
        return RoundEnd(metrics, arrays, [self.nodes[c] for c in contributors])

    def close(self) -> None:
        self.grid.stop()
        self.store.close()


@pytest.fixture
def plain(tmp_path: Path):
    parts = Parts(tmp_path, None)
    yield parts
    parts.close()


@pytest.fixture
def gated(tmp_path: Path):
    parts = Parts(tmp_path, ContinuousSettings(promote_margin=0.05))
    yield parts
    parts.close()


def test_persist_closes_writes_commits_and_promotes(plain: Parts) -> None:
    plain.join("a", "b")
    _, task_b = plain.task_round(1)
    plain.keeper.persist(plain.end(1, 1.0, 0.8, "a"))  # b never answered
    (rnd,) = plain.store.list_rounds(RUN_ID)
    assert rnd.status == RoundStatus.COMPLETED and rnd.metrics.accuracy == 0.8
    assert rnd.contributors == ["a"] and rnd.dropped == ["b"]
    version = rnd.model_version
    assert version is not None and version != plain.initial
    arrays, _ = snapshot_to_arrays(plain.models.get(version))
    np.testing.assert_array_equal(arrays["w"], np.ones(3, np.float32))
    assert plain.store.get_run(RUN_ID).current_round == 1
    assert plain.store.get_run(RUN_ID).model_version == version
    assert plain.registry.current() == version and plain.keeper.model_version == version
    assert plain.keeper.audit(1).contributors == ["a"] and plain.keeper.audit(1).dropped == ["b"]
    # closed: b's task expired, so a late result finds no live task and is never counted
    assert plain.fleet.task(task_b) is None
    assert plain.store.get_task(task_b).state == TaskState.EXPIRED
    assert plain.store.get_model(version).parent_version == plain.initial


def test_gate_rejects_a_worse_version_and_the_next_round_trains_from_current(
    gated: Parts,
) -> None:
    gated.join("a")
    gated.task_round(1)
    gated.keeper.persist(gated.end(1, 1.0, 0.80, "a"))
    good = gated.keeper.model_version
    assert gated.registry.current() == good and "promoted" in gated.lines[-1]

    gated.task_round(2)
    gated.keeper.persist(gated.end(2, -5.0, 0.50, "a"))  # 0.30 worse, margin 0.05
    bad = gated.store.get_round(RUN_ID, 2).model_version
    assert bad is not None and bad != good
    assert gated.registry.get(bad).status == "rejected"
    assert "worse than current" in gated.registry.get(bad).status_reason
    assert gated.registry.current() == good and gated.keeper.model_version == good
    assert gated.lines[-1].startswith(f"round 2: {bad[:12]} NOT promoted: accuracy 0.5000")

    gated.task_round(3)
    gated.keeper.persist(gated.end(3, 2.0, None, "a"))  # no evaluation: nothing to gate on
    unevaluated = gated.store.get_round(RUN_ID, 3).model_version
    assert gated.registry.get(unevaluated).status == "rejected"
    assert gated.lines[-1] == f"round 3: {unevaluated[:12]} not promoted (not evaluated)"
    assert gated.keeper.model_version == good
    # lineage: round 3 trained from current (round 1's model), not the rejected candidate
    assert gated.store.get_model(unevaluated).parent_version == good
