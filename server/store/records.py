"""What the store hands out: one frozen record per table row, the states a row moves through,
and the one error the store raises. Plain data, no SQL, so any module may import it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from fedge.common.errors import ReasonError
from fedge.server.round_metrics import RoundMetrics


class StoreError(ReasonError):
    """A store call could not be honoured; `reason` is a stable code."""

    what = "store"


class DeviceStatus(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


class RunStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"


class RoundStatus(StrEnum):
    OPEN = "open"  # tasks out, results accepted
    CLOSED = "closed"  # no more results accepted; aggregating
    COMPLETED = "completed"  # new global model committed


class TaskState(StrEnum):
    QUEUED = "queued"  # waiting for the device to pull it
    DELIVERED = "delivered"  # pulled; result expected
    DONE = "done"  # result accepted
    EXPIRED = "expired"  # round closed or restarted before a result came
    FAILED = "failed"  # result rejected or the device reported an error


class ResultStatus(StrEnum):
    PARTIAL = "partial"  # upload in progress or interrupted
    COMPLETE = "complete"  # all bytes held, hash verified; counted once
    REJECTED = "rejected"  # refused (reason kept); never counted


class ModelStatus(StrEnum):
    """A model version as the registry shows it (the promotion stack decides `current`)."""

    CURRENT = "current"  # what devices and the endpoint serve
    CANDIDATE = "candidate"  # never promoted
    REJECTED = "rejected"  # the gate refused it; `status_reason` says why
    RETIRED = "retired"  # was current once


@dataclass(frozen=True)
class Device:
    id: str
    node_id: int
    name: str
    created: float
    last_seen: float
    status: DeviceStatus
    capabilities: dict[str, Any]
    num_examples: int
    cert_fingerprint: str | None
    enrolled_with: str | None = None  # id of the enrollment token used (never its secret)


@dataclass(frozen=True)
class EnrollmentToken:
    """A token's record; the secret itself is never stored, only `secret_hash`."""

    id: str
    secret_hash: str
    label: str
    created: float
    expires: float
    max_uses: int
    uses: int
    revoked: bool
    last_used: float | None


@dataclass(frozen=True)
class Run:
    id: int
    config: dict[str, Any]
    status: RunStatus
    created: float
    current_round: int  # last completed round (0: none yet)
    model_version: str | None  # global model after current_round


@dataclass(frozen=True)
class Round:
    run_id: int
    round: int
    status: RoundStatus
    started: float
    ended: float | None
    metrics: RoundMetrics  # empty (all defaults) until the round completes
    model_version: str | None
    contributors: list[str]  # devices whose results were aggregated (audit trail)
    dropped: list[str]  # devices that got a task but sent no usable result in time


@dataclass(frozen=True)
class ModelVersion:
    """One global model version: its lineage, who made it, its evaluation and its status."""

    version: str
    run_id: int | None
    round: int
    parent_version: str | None
    created: float
    created_by: str  # "round" (written by a round)
    status: ModelStatus
    status_reason: str | None  # the promotion reason, or why it was rejected
    evaluation: dict[str, float]  # central evaluation (accuracy, loss, ...); {} if none

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": str(self.status)}


@dataclass(frozen=True)
class Promotion:
    """One entry of the promotion history (`rolled_back` is when it was undone, if it was)."""

    id: int
    version: str
    at: float
    reason: str
    rolled_back: float | None
    rollback_reason: str | None


@dataclass(frozen=True)
class DeviceTask:
    """A message queued for one device in one round (the `tasks` table), not an FL task."""

    id: str
    run_id: int
    round: int
    device_id: str
    message_type: str
    created: float
    state: TaskState
    updated: float


@dataclass(frozen=True)
class Result:
    task_id: str
    run_id: int
    round: int
    device_id: str
    status: ResultStatus
    total_size: int
    bytes_received: int
    sha256: str
    path: str | None
    reason: str | None
    created: float
    updated: float
