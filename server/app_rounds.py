"""What the coordinator records of a round of a ServerApp that is not fedge's own.

fedge's own ServerApp hands each round's new global model and central
evaluation to `RoundKeeper.persist`. A user's own ServerApp
(`--server-app module:app`) owns its model and its evaluation, and the
coordinator sees only what crosses the Grid. So a foreign app's round is
what the Grid saw, committed the same durable way (`Store.complete_round`):

- a round is Flower's `server-round` of the messages (the Grid's rule), and
  it ends when the app sends its first message of a later round, or returns;
- its metrics are the wire's: `uplink_bytes` the accepted results' bytes
  (whole Flower replies, train and evaluate, as uploaded and verified),
  `downlink_bytes` the tasks' bytes, `accepted` the accepted train results,
  `rejected` and their reasons, `seconds` from the round's first task to its
  end; `accuracy`, `loss` and `codec` stay empty (the app's own business);
- the audit is the same as for fedge's app: contributors (devices whose train
  result was accepted) and dropped devices (a train task, no accepted result);
- no model version is written per round: the round keeps the run's round-0
  version, an empty snapshot that names the app (`run_plan.app_snapshot`),
  and the registry's `current` is not moved.

Enrollment, mutual TLS, signed results, resumable uploads and the device
audit are the runtime's (the service and the result intake), so they apply
to any app unchanged.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from fedge.server.grpc_grid import GrpcGrid
from fedge.server.metrics import Metrics
from fedge.server.round_keeper import RoundAudit
from fedge.server.round_metrics import RoundMetrics
from fedge.server.store import ResultStatus, RoundStatus, Store

RoundPrinter = Callable[[RoundMetrics, RoundAudit], None]


class AppRounds:
    """Commits the rounds of a foreign ServerApp as the Grid closes them."""

    def __init__(
        self,
        store: Store,
        grid: GrpcGrid,
        metrics: Metrics,
        *,
        run_id: int,
        model_version: str,
        listeners: tuple[RoundPrinter, ...] = (),
    ) -> None:
        self.store = store
        self.grid = grid
        self.metrics = metrics
        self.run_id = run_id
        self.model_version = model_version
        self.listeners = listeners
        self._audit: dict[int, RoundAudit] = {}

    def audit(self, server_round: int) -> RoundAudit:
        return self._audit.get(server_round, RoundAudit([], []))

    def attach(self) -> None:
        """Record each round as the Grid moves past it."""
        self.grid.round_closed = self.close

    def close_all(self) -> None:
        """The app returned: record every round still open or closed but not committed."""
        for r in self.store.list_rounds(self.run_id):
            if r.status != RoundStatus.COMPLETED:
                self.close(r.round)

    def close(self, server_round: int) -> None:
        """End `server_round` on the Grid and commit what the wire saw of it."""
        row = self.store.get_round(self.run_id, server_round)
        if row is None or row.status == RoundStatus.COMPLETED:
            return
        self.grid.end_round(server_round)
        uplink = accepted = 0
        reasons: Counter[str] = Counter()
        contributors: dict[str, None] = {}
        tasked: dict[str, None] = {}
        for task in self.store.list_tasks(self.run_id, server_round):
            train = task.message_type == "train"
            if train:
                tasked[task.device_id] = None
            result = self.store.get_result(task.id)
            if result is None:
                continue
            if result.status == ResultStatus.COMPLETE:
                uplink += result.total_size
                if train:
                    accepted += 1
                    contributors[task.device_id] = None
            elif result.status == ResultStatus.REJECTED:
                reasons[result.reason or "rejected"] += 1
        dropped = [d for d in tasked if d not in contributors]
        record = RoundMetrics(
            round=server_round,
            uplink_bytes=uplink,
            downlink_bytes=self.grid.sent_bytes.get(server_round, 0),
            rejected=sum(reasons.values()),
            rejected_reasons=dict(reasons),
            seconds=max(0.0, time.time() - row.started),
            accepted=accepted,
        )
        self.store.complete_round(
            self.run_id, server_round, model_version=self.model_version, metrics=record,
            contributors=list(contributors), dropped=dropped,
        )
        audit = RoundAudit(list(contributors), dropped)
        self._audit[server_round] = audit
        self.metrics.add_bytes_in(record.uplink_bytes)
        self.metrics.add_bytes_out(record.downlink_bytes)
        self.metrics.observe_round(record)
        for listener in self.listeners:
            listener(record, audit)
