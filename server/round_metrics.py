"""Per-round records of a run, and the ways a caller receives them as rounds end.

The ServerApp may run in the caller's process (fedge's in-process Grid,
Flower's `run_simulation` Python API, the coordinator) or in a process Flower
starts (`flwr run`: the `flwr-simulation` / `flwr-serverapp` process). So the
records reach callers two ways: in-process listeners (`RoundListener`), and a
JSON-lines file (`report-path` in the run config), one line per round,
appended and flushed as the round ends; `read_round_metrics` reads it back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RoundMetrics:
    """What one round cost and achieved.

    `accuracy`/`loss` come from centralized evaluation of the new global model
    (None when the task has no central test set). `uplink_bytes` counts what
    the replies carried (the serialized updates, or the plain arrays of stock
    clients); `downlink_bytes` the model bytes sent (global model bytes times
    messages, train and evaluate). `rejected_reasons` counts dropped replies by
    reason ("client_error", "malformed", "non_finite", "shape_mismatch", ...).
    `seconds` is wall time from sending the round's train messages to the end
    of its central evaluation. `downlink_messages` (compressed downlink only)
    counts the train messages by what they carried: `full` (plain model),
    `first` (the model quantized), `delta` (against the device's anchor), and
    `returning` (to devices that had replied before). `codec` names what the
    accepted replies carried, read from each reply (the codec its `ModelUpdate`
    names, `none` for plain arrays; several joined by " | " in a mixed fleet),
    not the codec the run asked for: a fleet without the compression mod reads
    `none` even in an `int8` run. Under differential
    privacy `epsilon` (at `delta`) is what the run has spent after this round,
    `dp_clip` the clipping norm C used and `dp_noise_std` the noise's standard
    deviation on the mean, z x C / n (docs/privacy.md). Under secure aggregation
    `codec` is `secagg-int8` (or `-int4`) because masked ring words crossed, and
    `secagg` holds what the round's secure exchange did: `bits`, `ring_bits` (the
    masked words' width), `survivors`, `dropped`, `degree`, `threshold`, and
    `up_bytes`/`down_bytes` per stage (advertise, share-keys, masked-input, unmask),
    whose sums are `uplink_bytes` and the non-model part of `downlink_bytes`
    (docs/secure-aggregation.md).
    """

    round: int
    accuracy: float | None = None
    loss: float | None = None
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    rejected: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    accepted: int = 0
    train_loss: float | None = None
    codec: str = ""
    downlink_messages: dict[str, int] = field(default_factory=dict)
    # differential privacy (server/dp.py; None without): epsilon spent up to and including
    # this round at `delta`, the clipping norm used and the noise std on the mean
    epsilon: float | None = None
    delta: float | None = None
    dp_clip: float | None = None
    dp_noise_std: float | None = None
    # secure aggregation (server/secagg_server.py SecAggResult.summary; None without)
    secagg: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the shape `report.json` rounds use, plus extras)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundMetrics:
        """Inverse of `to_dict`; unknown keys are ignored (newer writers)."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


RoundListener = Callable[[RoundMetrics], None]


class JsonlRoundWriter:
    """A `RoundListener` that appends each round as one JSON line and flushes it.

    Each line is written with a single `write` on a file opened for appending,
    then flushed and fsynced, so a reader polling the file sees whole rounds.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, record: RoundMetrics) -> None:
        line = json.dumps(record.to_dict(), sort_keys=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def read_round_metrics(path: str | os.PathLike[str]) -> list[RoundMetrics]:
    """The rounds written so far to a JSON-lines file (a torn last line is skipped)."""
    p = Path(path)
    if not p.exists():
        return []
    out: list[RoundMetrics] = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(RoundMetrics.from_dict(json.loads(line)))
        except json.JSONDecodeError:
            continue
    return out


def notify(listeners: Iterable[RoundListener], record: RoundMetrics) -> None:
    """Call every listener with `record`."""
    for listener in listeners:
        listener(record)
