"""The model registry: every global model version, its lineage and evaluation, and `current`.

Versions are the model store's content hashes; their lineage rows (run, round,
parent, created) are written by `Store.complete_round`/`create_run`. The
registry adds, in the same SQLite file (migration 3 in server/store.py):

- central evaluation per version (`set_evaluation`, or `evaluate` on the
  task's held-out set), who created it, and a status: `candidate` (never
  promoted), `rejected` (the continuous-mode gate refused it, reason kept),
  `retired` (was current once), `current`;
- a promotion history used as a stack: `promote` pushes, `rollback` marks the
  top as rolled back, so `current` is the newest promotion not rolled back and
  repeated rollbacks walk back through earlier currents. Promotions commit
  with `synchronous=FULL`, so `current` survives a crash or a power cut.

Devices and the HTTP endpoint serve `current()`; exports of any version are
built here (`export`) and cached, bounded by bytes.

The registry's SQL lives here (run through the store's connection and lock),
so server/store.py only carries the migration that creates its columns.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from fedge.common.errors import ReasonError, UpdateRejected
from fedge.common.export import EXPORT_FORMATS, export_model
from fedge.common.snapshot import parse_snapshot, snapshot_to_arrays
from fedge.server.model_store import ModelStore, ModelStoreError
from fedge.server.store import Store

DEFAULT_EXPORT_CACHE_BYTES = 64 << 20
MIN_PREFIX = 4
_HEX = re.compile(r"[0-9a-f]+")


class RegistryError(ReasonError):
    """A registry call cannot be honoured; `reason` is a stable code.

    Reasons: `not_found`, `ambiguous`, `bad_ref`, `no_current`, `no_previous`,
    `not_evaluated`, `bad_format`, `bad_task`, `missing_file`, `corrupt`,
    `export_failed`.
    """

    what = "model registry"


class ModelStatus(StrEnum):
    CURRENT = "current"  # what devices and the endpoint serve
    CANDIDATE = "candidate"  # never promoted
    REJECTED = "rejected"  # the gate refused it; `status_reason` says why
    RETIRED = "retired"  # was current once


@dataclass(frozen=True)
class ModelRecord:
    """One version as the registry shows it."""

    version: str
    run_id: int | None
    round: int
    parent_version: str | None
    created: float
    created_by: str
    status: ModelStatus
    status_reason: str | None
    evaluation: dict[str, float]

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
class GateDecision:
    """What `Registry.gate` decided for a version, and why."""

    version: str
    promoted: bool
    reason: str
    previous: str | None
    metric: str
    value: float | None
    baseline: float | None


class Registry:
    """Model versions over a `Store` (lineage, status, evaluation) and a `ModelStore` (files)."""

    def __init__(
        self,
        store: Store,
        models: ModelStore,
        *,
        clock: Callable[[], float] = time.time,
        export_cache_bytes: int = DEFAULT_EXPORT_CACHE_BYTES,
    ) -> None:
        self.store = store
        self.models = models
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = export_cache_bytes
        self._cache_lock = threading.Lock()
        self._task_names: dict[str, str] = {}  # a version's task never changes

    # ------------------------------------------------------------ reading

    def current(self) -> str | None:
        """The version devices and the endpoint serve, or None before any promotion."""
        row = self.store._row(
            "SELECT version FROM promotions WHERE rolled_back IS NULL ORDER BY id DESC LIMIT 1"
        )
        return row["version"] if row else None

    def resolve(self, ref: str) -> str:
        """A full version from `current`, a full hash, or a unique prefix of 4+ hex digits."""
        text = str(ref).strip().lower()
        if text == "current":
            version = self.current()
            if version is None:
                raise RegistryError("no_current", "no version has been promoted yet")
            return version
        if not (MIN_PREFIX <= len(text) <= 64 and _HEX.fullmatch(text)):
            raise RegistryError(
                "bad_ref", f"{str(ref)[:80]!r}: give 'current' or {MIN_PREFIX}-64 hex digits"
            )
        rows = self.store._rows(
            "SELECT version FROM models WHERE version >= ? AND version < ?"
            " ORDER BY version LIMIT 2",
            text,
            text + "g",  # every hex string starting with `text` sorts below text + "g"
        )
        if not rows:
            raise RegistryError("not_found", f"no model version {text}")
        if len(rows) > 1:
            raise RegistryError("ambiguous", f"{text} matches several versions; give more digits")
        return rows[0]["version"]

    def get(self, ref: str) -> ModelRecord:
        """The record of one version (`current`, full hash or unique prefix)."""
        version = self.resolve(ref)
        row = self.store._row("SELECT * FROM models WHERE version=?", version)
        assert row is not None
        return self._record(row, self.current())

    def list_models(self, run_id: int | None = None) -> list[ModelRecord]:
        """Every version (of one run if given), oldest first."""
        cur = self.current()
        if run_id is None:
            rows = self.store._rows("SELECT * FROM models ORDER BY created, rowid")
        else:
            rows = self.store._rows(
                "SELECT * FROM models WHERE run_id=? ORDER BY round, rowid", _i64(run_id)
            )
        return [self._record(r, cur) for r in rows]

    def lineage(self, ref: str, *, limit: int = 1000) -> list[ModelRecord]:
        """The version, its parent, the parent's parent ... as far as the table knows."""
        out: list[ModelRecord] = []
        seen: set[str] = set()
        version: str | None = self.resolve(ref)
        cur = self.current()
        while version and version not in seen and len(out) < limit:
            seen.add(version)
            row = self.store._row("SELECT * FROM models WHERE version=?", version)
            if row is None:
                break
            out.append(self._record(row, cur))
            version = row["parent_version"]
        return out

    def history(self) -> list[Promotion]:
        """Every promotion, oldest first, with its rollback if any."""
        rows = self.store._rows("SELECT * FROM promotions ORDER BY id")
        return [
            Promotion(
                id=r["id"],
                version=r["version"],
                at=r["at"],
                reason=r["reason"],
                rolled_back=r["rolled_back"],
                rollback_reason=r["rollback_reason"],
            )
            for r in rows
        ]

    # ------------------------------------------------------------ writing

    def register(
        self,
        version: str,
        *,
        run_id: int | None = None,
        round: int = 0,
        parent_version: str | None = None,
        created_by: str = "import",
    ) -> ModelRecord:
        """Add a version that did not come from a round (its file must be in the model store).

        Versions from rounds are already recorded by `Store.complete_round`;
        registering one of those again changes nothing.
        """
        self._verify_file(version)
        with self.store._tx() as c:
            c.execute(
                "INSERT INTO models (version, run_id, round, parent_version, created, created_by)"
                " VALUES (?,?,?,?,?,?) ON CONFLICT (version) DO NOTHING",
                (
                    version,
                    None if run_id is None else _i64(run_id),
                    int(round),
                    parent_version,
                    self._clock(),
                    created_by,
                ),
            )
        return self.get(version)

    def set_evaluation(self, ref: str, evaluation: Mapping[str, float]) -> None:
        """Record a version's central evaluation (finite numbers; merged into what is there)."""
        version = self.resolve(ref)
        clean = _finite(evaluation)
        with self.store._tx() as c:
            row = c.execute("SELECT evaluation FROM models WHERE version=?", (version,)).fetchone()
            merged = {**json.loads(row["evaluation"] or "{}"), **clean}
            c.execute(
                "UPDATE models SET evaluation=? WHERE version=?",
                (json.dumps(merged, sort_keys=True), version),
            )
        self._forget_exports(version)

    def evaluate(
        self, ref: str, *, config: Mapping[str, Any] | None = None, batch_size: int = 256
    ) -> dict[str, float]:
        """Evaluate a version on its task's central test set, record and return the figures."""
        from fedge.common.arrays import arrays_to_model
        from fedge.common.training import evaluate

        version = self.resolve(ref)
        task = self.task(version)
        cfg = dict(config) if config is not None else self._run_config(version)
        test = task.central_test(cfg)
        if test is None:
            raise RegistryError("bad_task", f"task {task.name!r} has no central test set")
        arrays, _ = self.snapshot(version)
        model = arrays_to_model(task.make_model(), arrays)
        loss, acc = evaluate(model, test[0], test[1], batch_size=batch_size)
        figures = {"accuracy": acc, "loss": loss, "num_examples": float(len(test[1]))}
        self.set_evaluation(version, figures)
        return figures

    def promote(self, ref: str, *, reason: str = "") -> ModelRecord:
        """Make a version current (durably); promoting the current version changes nothing."""
        version = self.resolve(ref)
        self._verify_file(version)
        now = self._clock()
        with self.store._tx(durable=True) as c:
            top = c.execute(
                "SELECT version FROM promotions WHERE rolled_back IS NULL ORDER BY id DESC LIMIT 1"
            ).fetchone()
            if top is None or top["version"] != version:
                c.execute(
                    "INSERT INTO promotions (version, at, reason) VALUES (?,?,?)",
                    (version, now, reason),
                )
                c.execute(
                    "UPDATE models SET status='promoted', status_reason=? WHERE version=?",
                    (reason or None, version),
                )
        return self.get(version)

    def rollback(self, *, reason: str = "") -> ModelRecord:
        """Undo the latest promotion: the current before it becomes current again."""
        now = self._clock()
        with self.store._tx(durable=True) as c:
            rows = c.execute(
                "SELECT id, version FROM promotions WHERE rolled_back IS NULL"
                " ORDER BY id DESC LIMIT 2"
            ).fetchall()
            if not rows:
                raise RegistryError("no_current", "nothing has been promoted")
            if len(rows) < 2:
                only = rows[0]["version"]
                raise RegistryError("no_previous", f"{only} is the only current so far")
            target = rows[1]["version"]
            try:
                self.models.verify(target)
            except ModelStoreError as e:
                raise RegistryError("missing_file", f"cannot roll back to {target}: {e}") from None
            c.execute(
                "UPDATE promotions SET rolled_back=?, rollback_reason=? WHERE id=?",
                (now, reason, rows[0]["id"]),
            )
        return self.get(target)

    def reject(self, ref: str, reason: str) -> ModelRecord:
        """Mark a version rejected (it stays a candidate that is never served), with why."""
        version = self.resolve(ref)
        if version == self.current():
            raise RegistryError("bad_ref", f"{version} is current: roll back first")
        with self.store._tx() as c:
            c.execute(
                "UPDATE models SET status='rejected', status_reason=? WHERE version=?",
                (reason, version),
            )
        return self.get(version)

    def gate(
        self,
        ref: str,
        *,
        margin: float,
        metric: str = "accuracy",
        higher_is_better: bool = True,
    ) -> GateDecision:
        """Promote a version unless it is worse than `current` by more than `margin` on `metric`.

        The continuous-mode rule: the version must carry `metric` in its
        evaluation; with no current (or a current never evaluated) it is
        promoted. Otherwise it is rejected with the reason recorded.
        """
        version = self.resolve(ref)
        value = self.get(version).evaluation.get(metric)
        if value is None:
            raise RegistryError("not_evaluated", f"{version[:12]} has no {metric!r} evaluation")
        previous = self.current()
        baseline = None if previous is None else self.get(previous).evaluation.get(metric)
        if previous == version:
            return GateDecision(version, True, "already current", previous, metric, value, value)
        if baseline is None:
            why = "first version" if previous is None else f"current {previous[:12]} unevaluated"
            reason = f"{metric} {value:.4f}; {why}"
            self.promote(version, reason=reason)
            return GateDecision(version, True, reason, previous, metric, value, None)
        worse_by = (baseline - value) if higher_is_better else (value - baseline)
        assert previous is not None
        if worse_by > margin:
            reason = (
                f"{metric} {value:.4f} is {worse_by:.4f} worse than current "
                f"{previous[:12]}'s {baseline:.4f} (margin {margin:g})"
            )
            self.reject(version, reason)
            return GateDecision(version, False, reason, previous, metric, value, baseline)
        reason = f"{metric} {value:.4f} vs current {baseline:.4f} (margin {margin:g})"
        self.promote(version, reason=reason)
        return GateDecision(version, True, reason, previous, metric, value, baseline)

    # ------------------------------------------------------------ files and exports

    def snapshot(self, ref: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """A version's fp32 arrays and snapshot metadata, verified against its hash."""
        version = self.resolve(ref)
        try:
            data = self.models.get(version)
            return snapshot_to_arrays(data)
        except ModelStoreError as e:
            reason = "missing_file" if e.reason == "not_found" else "corrupt"
            raise RegistryError(reason, str(e)) from None
        except UpdateRejected as e:
            raise RegistryError("corrupt", f"{version}: {e}") from None

    def task_name(self, ref: str) -> str:
        """The task a version was trained for: its snapshot's `task`, else its run's config."""
        version = self.resolve(ref)
        name = self._task_names.get(version)
        if name is None:
            try:
                meta = parse_snapshot(self.models.get(version)).metadata
            except ModelStoreError as e:
                reason = "missing_file" if e.reason == "not_found" else "corrupt"
                raise RegistryError(reason, str(e)) from None
            except UpdateRejected as e:
                raise RegistryError("corrupt", f"{version}: {e}") from None
            name = meta.get("task") or str(self._run_config(version).get("task", ""))
            if not name:
                raise RegistryError("bad_task", f"{version[:12]} names no task")
            self._task_names[version] = name
        return name

    def task(self, ref: str) -> Any:
        """The resolved `Task` of a version (the coordinator trusts its own run's task)."""
        from fedge.common.task import TaskError, resolve_task

        name = self.task_name(ref)
        try:
            return resolve_task(name)
        except TaskError as e:
            raise RegistryError("bad_task", str(e)) from None

    def export(self, ref: str, fmt: str = "fp32") -> bytes:
        """The export file of a version in `fmt` (fp32, fp16, int8, int4), cached."""
        if fmt not in EXPORT_FORMATS:
            raise RegistryError("bad_format", f"{fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
        record = self.get(ref)
        # the evaluation is in the file: a new one must not be served from an old entry
        key = (record.version, fmt, json.dumps(record.evaluation, sort_keys=True))
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        arrays, _ = self.snapshot(record.version)
        task = self.task(record.version)
        if not task.input_shape:
            raise RegistryError("bad_task", f"task {task.name!r} declares no input_shape")
        try:
            data = self._export(record, arrays, task, fmt)
        except ValueError as e:
            raise RegistryError("export_failed", f"{record.version[:12]} as {fmt}: {e}") from None
        self._remember(key, data)
        return data

    def _export(self, record: ModelRecord, arrays: Any, task: Any, fmt: str) -> bytes:
        return export_model(
            arrays,
            fmt=fmt,
            task=self.task_name(record.version),
            input_shape=task.input_shape,
            labels=task.labels,
            source_version=record.version,
            lineage={
                "run_id": record.run_id,
                "round": record.round,
                "parent_version": record.parent_version,
                "created": record.created,
            },
            evaluation=record.evaluation,
        )

    # ------------------------------------------------------------ plumbing

    def _record(self, row: Any, current: str | None) -> ModelRecord:
        stored = row["status"]
        if row["version"] == current:
            status = ModelStatus.CURRENT
        elif stored == "rejected":
            status = ModelStatus.REJECTED
        elif stored == "promoted":
            status = ModelStatus.RETIRED
        else:
            status = ModelStatus.CANDIDATE
        return ModelRecord(
            version=row["version"],
            run_id=None if row["run_id"] is None else _u64(row["run_id"]),
            round=row["round"],
            parent_version=row["parent_version"],
            created=row["created"],
            created_by=row["created_by"],
            status=status,
            status_reason=row["status_reason"],
            evaluation=json.loads(row["evaluation"] or "{}"),
        )

    def _run_config(self, version: str) -> dict[str, Any]:
        row = self.store._row("SELECT run_id FROM models WHERE version=?", version)
        if row is None or row["run_id"] is None:
            return {}
        run = self.store._row("SELECT config FROM runs WHERE id=?", row["run_id"])
        return json.loads(run["config"]) if run else {}

    def _verify_file(self, version: str) -> None:
        try:
            self.models.verify(version)
        except ModelStoreError as e:
            reason = "missing_file" if e.reason == "not_found" else "corrupt"
            raise RegistryError(reason, str(e)) from None

    def _remember(self, key: tuple[str, str, str], data: bytes) -> None:
        if len(data) > self._cache_limit:
            return
        with self._cache_lock:
            if key in self._cache:
                return
            self._cache[key] = data
            self._cache_bytes += len(data)
            while self._cache_bytes > self._cache_limit:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= len(old)

    def _forget_exports(self, version: str) -> None:
        with self._cache_lock:
            for key in [k for k in self._cache if k[0] == version]:
                self._cache_bytes -= len(self._cache.pop(key))


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        if v is None or isinstance(v, bool):
            continue
        f = float(v)
        if math.isfinite(f):
            out[str(k)] = f
    return out


def _u64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def _i64(value: int) -> int:
    """Flower's unsigned 64-bit run id as SQLite's signed integer (as the store keeps it)."""
    return value - (1 << 64) if value >= 1 << 63 else value
