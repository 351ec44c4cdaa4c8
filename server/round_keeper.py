"""The durable end of a round, and the gate a new version passes before devices get it.

`RoundKeeper.persist` is the ServerApp's `on_round_end` hook on the
coordinator (docs/coordinator.md, "State on disk"):

1. the round is closed on the grid (tasks left expire; a late result is
   refused, never counted);
2. the new global model is written atomically to the model store;
3. the round, its metrics, contributors and dropped devices are committed
   in one durable SQLite transaction, so a crash leaves the run before or
   after a round, never between;
4. the registry: the version's central evaluation is recorded, then a run
   with an end promotes it, while continuous mode (docs/models.md,
   "Continuous mode") gates it: promoted only if it is at most
   `promote_margin` worse than `current` on `metric`, else kept as
   `rejected` with the reason, and the next round trains from `current`.

`model_version` is the base of the next round; it changes only here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fedge.server.continuous import ContinuousSettings
from fedge.server.metrics import Metrics
from fedge.server.model_store import ModelStore
from fedge.server.registry import Registry
from fedge.server.round_metrics import RoundMetrics
from fedge.server.store import Store

if TYPE_CHECKING:
    from fedge.server.server_app import RoundEnd

log = logging.getLogger(__name__)


class RoundGrid(Protocol):
    """What the keeper needs of the Grid (`GrpcGrid`): close a round, say who took part."""

    def end_round(self, server_round: int) -> None: ...

    def device_of_node(self, node_id: int) -> str | None: ...

    def tasked_devices(
        self, server_round: int, message_type: str | None = "train"
    ) -> list[str]: ...


@dataclass(frozen=True)
class RoundAudit:
    """Who took part in a committed round."""

    contributors: list[str]  # devices whose results were aggregated
    dropped: list[str]  # devices that had a task but sent no usable result in time


class RoundKeeper:
    """Commits rounds of one run and decides what becomes `current`.

    `gate` is continuous mode's settings (None: a run with an end, every
    round's version is promoted). `out` prints the gate's decisions.
    """

    def __init__(
        self,
        store: Store,
        models: ModelStore,
        registry: Registry,
        grid: RoundGrid,
        metrics: Metrics,
        *,
        run_id: int,
        task_ref: str,
        model_version: str,
        gate: ContinuousSettings | None = None,
        out: Callable[[str], None] = print,
    ) -> None:
        self.store = store
        self.models = models
        self.registry = registry
        self.grid = grid
        self.metrics = metrics
        self.run_id = run_id
        self.task_ref = task_ref
        self.model_version = model_version
        self.gate = gate
        self.out = out
        self._audit: dict[int, RoundAudit] = {}

    def audit(self, server_round: int) -> RoundAudit:
        """Who contributed to and who dropped out of `server_round` (empty if not committed)."""
        return self._audit.get(server_round, RoundAudit([], []))

    def persist(self, end: RoundEnd) -> None:
        """Close the round, write the new model, commit the round, then promote or gate it."""
        record: RoundMetrics = end.metrics
        server_round = record.round
        self.grid.end_round(server_round)
        arrays = {k: a.numpy() for k, a in end.arrays.items()}
        version = self.models.put(snapshot_bytes(arrays, self.task_ref))
        contributors = [d for d in map(self.grid.device_of_node, end.accepted_nodes) if d]
        dropped = [d for d in self.grid.tasked_devices(server_round) if d not in contributors]
        self.store.complete_round(
            self.run_id,
            server_round,
            model_version=version,
            metrics=record,
            contributors=contributors,
            dropped=dropped,
            # continuous: the round trained from `current`, not from the last candidate
            parent_version=self.model_version if self.gate is not None else None,
        )
        self.model_version = version
        self._audit[server_round] = RoundAudit(contributors, dropped)
        self._register(version, record)

    def _register(self, version: str, record: RoundMetrics) -> None:
        """The registry and metrics after a committed round: evaluation, then promote or gate."""
        registry, gate = self.registry, self.gate
        evaluation = {k: v for k, v in (("accuracy", record.accuracy), ("loss", record.loss),
                                        # DP: what the version cost, so it states its epsilon
                                        ("dp-epsilon", record.epsilon),
                                        ("dp-delta", record.delta)) if v is not None}
        if evaluation:
            registry.set_evaluation(version, evaluation)
        self.metrics.add_bytes_in(record.uplink_bytes)
        self.metrics.add_bytes_out(record.downlink_bytes)
        if gate is None:
            registry.promote(version, reason=f"round {record.round}")
        elif gate.metric not in registry.get(version).evaluation:
            registry.reject(version, f"round {record.round}: no {gate.metric} to gate on")
            self.out(f"round {record.round}: {version[:12]} not promoted (not evaluated)")
        else:
            decision = registry.gate(version, margin=gate.promote_margin, metric=gate.metric)
            if decision.promoted:
                self.out(f"round {record.round}: {version[:12]} promoted: {decision.reason}")
            else:
                log.warning("round %d: candidate %s rejected: %s", record.round, version[:12],
                            decision.reason)
                self.out(f"round {record.round}: {version[:12]} NOT promoted: {decision.reason}")
        current = registry.current()
        if gate is not None and current:
            self.model_version = current  # the next round trains from `current`
        self.metrics.observe_round(record)


def snapshot_bytes(arrays: Mapping[str, Any], task: str) -> bytes:
    """The snapshot of a global model. Run and round stay out (SQLite keeps the lineage),
    so unchanged weights keep their version: a round that aggregated nothing shows as such."""
    from fedge.common.snapshot import arrays_to_snapshot

    return arrays_to_snapshot(arrays, {"task": task}).SerializeToString(deterministic=True)
