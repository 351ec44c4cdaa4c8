"""The coordinator's durable state in one SQLite file: devices, runs, rounds, tasks, results.

Why these choices (docs/coordinator.md has the long form):
- WAL journal with `synchronous=NORMAL`: a committed transaction survives
  `kill -9` of the coordinator (it is in the WAL, which the OS holds); only a
  power cut can lose the last few commits, and never corrupts the file. The
  commits that must survive even that (a round's completion with its model
  version, a run's creation) are written with `synchronous=FULL`.
- Schema versioned by `PRAGMA user_version`; each migration runs in one
  transaction with its version bump, so a crash mid-migration changes nothing.
- One connection guarded by a lock: calls are short (microseconds to a
  millisecond), and the asyncio gRPC server and the ServerApp thread may both
  use the store.
- Results are keyed by task id: the same result pushed twice is counted once,
  and a partial upload's progress (bytes held, hash, file path) survives a
  restart.
- Flower's run and node ids are unsigned 64-bit; SQLite integers are signed,
  so ids are stored two's-complement and converted back on read.

No SQL lives outside this module.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from fedge.common.errors import ReasonError
from fedge.server.round_metrics import RoundMetrics

# Each entry is one schema version: its statements run in one transaction and
# set PRAGMA user_version to the entry's 1-based position. Append only; never
# edit a released entry. Issue 5 (enrollment tokens, device certificates) and
# issue 7 (model registry: evaluation, current/candidate) add entries here.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """
        CREATE TABLE devices (
            id TEXT PRIMARY KEY,
            node_id INTEGER NOT NULL UNIQUE,
            name TEXT NOT NULL,
            created REAL NOT NULL,
            last_seen REAL NOT NULL,
            status TEXT NOT NULL,
            capabilities TEXT NOT NULL DEFAULT '{}',
            num_examples INTEGER NOT NULL DEFAULT 0,
            cert_fingerprint TEXT
        )
        """,
        """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            config TEXT NOT NULL,
            status TEXT NOT NULL,
            created REAL NOT NULL,
            current_round INTEGER NOT NULL DEFAULT 0,
            model_version TEXT
        )
        """,
        """
        CREATE TABLE rounds (
            run_id INTEGER NOT NULL REFERENCES runs(id),
            round INTEGER NOT NULL,
            status TEXT NOT NULL,
            started REAL NOT NULL,
            ended REAL,
            metrics TEXT NOT NULL DEFAULT '{}',
            model_version TEXT,
            PRIMARY KEY (run_id, round)
        )
        """,
        """
        CREATE TABLE models (
            version TEXT PRIMARY KEY,
            run_id INTEGER REFERENCES runs(id),
            round INTEGER NOT NULL,
            parent_version TEXT,
            created REAL NOT NULL
        )
        """,
        """
        CREATE TABLE tasks (
            id TEXT PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id),
            round INTEGER NOT NULL,
            device_id TEXT NOT NULL REFERENCES devices(id),
            message_type TEXT NOT NULL,
            created REAL NOT NULL,
            state TEXT NOT NULL,
            updated REAL NOT NULL
        )
        """,
        "CREATE INDEX tasks_by_round ON tasks (run_id, round, state)",
        "CREATE INDEX tasks_by_device ON tasks (device_id, state)",
        """
        CREATE TABLE results (
            task_id TEXT PRIMARY KEY REFERENCES tasks(id),
            run_id INTEGER NOT NULL,
            round INTEGER NOT NULL,
            device_id TEXT NOT NULL,
            status TEXT NOT NULL,
            total_size INTEGER NOT NULL,
            bytes_received INTEGER NOT NULL DEFAULT 0,
            sha256 TEXT NOT NULL,
            path TEXT,
            reason TEXT,
            created REAL NOT NULL,
            updated REAL NOT NULL
        )
        """,
        "CREATE INDEX results_by_round ON results (run_id, round, status)",
    ),
    # 2: enrollment (issue 5). Tokens are stored as a hash of their secret only;
    # a device remembers the token (by id) it enrolled with, for the audit trail.
    (
        """
        CREATE TABLE enrollment_tokens (
            id TEXT PRIMARY KEY,
            secret_hash TEXT NOT NULL,
            label TEXT NOT NULL DEFAULT '',
            created REAL NOT NULL,
            expires REAL NOT NULL,
            max_uses INTEGER NOT NULL,
            uses INTEGER NOT NULL DEFAULT 0,
            revoked INTEGER NOT NULL DEFAULT 0,
            last_used REAL
        )
        """,
        "ALTER TABLE devices ADD COLUMN enrolled_with TEXT",
        "CREATE UNIQUE INDEX devices_by_cert ON devices (cert_fingerprint)",
    ),
    # 3: model registry (issue 7, server/registry.py). `status` is candidate |
    # promoted | rejected; `current` is the newest promotion not rolled back.
    (
        "ALTER TABLE models ADD COLUMN evaluation TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE models ADD COLUMN status TEXT NOT NULL DEFAULT 'candidate'",
        "ALTER TABLE models ADD COLUMN status_reason TEXT",
        "ALTER TABLE models ADD COLUMN created_by TEXT NOT NULL DEFAULT 'round'",
        """
        CREATE TABLE promotions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            version TEXT NOT NULL REFERENCES models(version),
            at REAL NOT NULL,
            reason TEXT NOT NULL DEFAULT '',
            rolled_back REAL,
            rollback_reason TEXT
        )
        """,
    ),
]

SCHEMA_VERSION = len(MIGRATIONS)

_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


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
    version: str
    run_id: int | None
    round: int
    parent_version: str | None
    created: float


@dataclass(frozen=True)
class Task:
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


class Store:
    """Typed access to the coordinator's SQLite file; safe to share between threads."""

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Callable[[], float]) -> None:
        self._conn = conn
        self._lock = threading.RLock()
        self.path = path
        self._clock = clock

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 30.0,
    ) -> Store:
        """Open (creating if needed) the database, switch to WAL, apply pending migrations."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            conn.row_factory = sqlite3.Row
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError("no_wal", f"journal_mode is {mode}")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            _migrate(conn)
        except BaseException:
            conn.close()
            raise
        return cls(conn, path, clock)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- introspection -------------------------------------------------------

    @property
    def schema_version(self) -> int:
        return self._scalar("PRAGMA user_version")

    def pragma(self, name: str) -> Any:
        """Read a PRAGMA (journal_mode, synchronous, ...); for checks and diagnostics."""
        if not name.isidentifier():
            raise StoreError("bad_pragma", name)
        return self._scalar(f"PRAGMA {name}")

    # -- devices -------------------------------------------------------------

    def register_device(
        self,
        name: str,
        *,
        device_id: str | None = None,
        capabilities: Mapping[str, Any] | None = None,
        num_examples: int = 0,
    ) -> Device:
        """Insert a device, or refresh a known one (name, capabilities, last_seen).

        A known device keeps its id, node id and status (a revoked device stays
        revoked). A new device gets a fresh id unless it proposes one.
        """
        now = self._clock()
        caps = json.dumps(dict(capabilities or {}), sort_keys=True)
        with self._tx() as c:
            if device_id is not None and _one(c, "SELECT 1 FROM devices WHERE id=?", device_id):
                c.execute(
                    "UPDATE devices SET name=?, capabilities=?, num_examples=?, last_seen=?"
                    " WHERE id=?",
                    (name, caps, num_examples, now, device_id),
                )
            else:
                device_id = device_id or uuid.uuid4().hex
                c.execute(
                    "INSERT INTO devices (id, node_id, name, created, last_seen, status,"
                    " capabilities, num_examples) VALUES (?,?,?,?,?,?,?,?)",
                    (
                        device_id,
                        _new_node_id(c),
                        name,
                        now,
                        now,
                        DeviceStatus.ACTIVE,
                        caps,
                        num_examples,
                    ),
                )
            return _device(_one(c, "SELECT * FROM devices WHERE id=?", device_id))

    def get_device(self, device_id: str) -> Device | None:
        row = self._row("SELECT * FROM devices WHERE id=?", device_id)
        return _device(row) if row else None

    def get_device_by_node(self, node_id: int) -> Device | None:
        row = self._row("SELECT * FROM devices WHERE node_id=?", _to_i64(node_id))
        return _device(row) if row else None

    def list_devices(self, status: DeviceStatus | None = None) -> list[Device]:
        if status is None:
            rows = self._rows("SELECT * FROM devices ORDER BY created, id")
        else:
            rows = self._rows("SELECT * FROM devices WHERE status=? ORDER BY created, id", status)
        return [_device(r) for r in rows]

    def touch_devices(self, device_ids: Iterable[str], when: float | None = None) -> None:
        """Set last_seen for many devices in one commit (heartbeats are batched)."""
        when = self._clock() if when is None else when
        with self._tx() as c:
            c.executemany(
                "UPDATE devices SET last_seen=? WHERE id=?", [(when, d) for d in device_ids]
            )

    def set_device_status(self, device_id: str, status: DeviceStatus) -> None:
        with self._tx() as c:
            _require(
                c.execute("UPDATE devices SET status=? WHERE id=?", (status, device_id)),
                "device",
                device_id,
            )

    def set_device_cert(self, device_id: str, fingerprint: str | None) -> None:
        """Bind a device to its client certificate (enrollment, issue 5)."""
        with self._tx() as c:
            _require(
                c.execute(
                    "UPDATE devices SET cert_fingerprint=? WHERE id=?", (fingerprint, device_id)
                ),
                "device",
                device_id,
            )

    def get_device_by_fingerprint(self, fingerprint: str) -> Device | None:
        row = self._row("SELECT * FROM devices WHERE cert_fingerprint=?", fingerprint)
        return _device(row) if row else None

    # -- enrollment tokens (issue 5) -----------------------------------------

    def add_enrollment_token(
        self, token_id: str, secret_hash: str, *, label: str, expires: float, max_uses: int
    ) -> EnrollmentToken:
        """Record a new token by its id and the hash of its secret."""
        if max_uses < 1:
            raise StoreError("bad_token", "max_uses must be at least 1")
        with self._tx() as c:
            if _one(c, "SELECT 1 FROM enrollment_tokens WHERE id=?", token_id):
                raise StoreError("exists", f"token {token_id}")
            c.execute(
                "INSERT INTO enrollment_tokens (id, secret_hash, label, created, expires,"
                " max_uses) VALUES (?,?,?,?,?,?)",
                (token_id, secret_hash, label, self._clock(), expires, max_uses),
            )
            return _token(_one(c, "SELECT * FROM enrollment_tokens WHERE id=?", token_id))

    def get_enrollment_token(self, token_id: str) -> EnrollmentToken | None:
        row = self._row("SELECT * FROM enrollment_tokens WHERE id=?", token_id)
        return _token(row) if row else None

    def list_enrollment_tokens(self) -> list[EnrollmentToken]:
        return [_token(r) for r in self._rows("SELECT * FROM enrollment_tokens ORDER BY created")]

    def revoke_enrollment_token(self, token_id: str) -> None:
        with self._tx() as c:
            _require(
                c.execute("UPDATE enrollment_tokens SET revoked=1 WHERE id=?", (token_id,)),
                "token",
                token_id,
            )

    def enroll_device(
        self,
        token_id: str,
        secret_hash: str,
        *,
        device_id: str,
        name: str,
        cert_fingerprint: str,
    ) -> Device:
        """Spend one use of a token and add the device with its certificate, atomically.

        The use is counted by a conditional UPDATE (live, unrevoked, hash
        matching, uses left) in the same transaction as the device insert, so
        two racing enrollments cannot both spend a token's last use, and a
        failure leaves neither a spent use nor a device row.
        """
        now = self._clock()
        with self._tx(durable=True) as c:
            cur = c.execute(
                "UPDATE enrollment_tokens SET uses=uses+1, last_used=? WHERE id=? AND"
                " secret_hash=? AND revoked=0 AND uses<max_uses AND expires>?",
                (now, token_id, secret_hash, now),
            )
            if cur.rowcount != 1:
                raise StoreError("token_refused", f"token {token_id}")
            if _one(c, "SELECT 1 FROM devices WHERE id=?", device_id):
                raise StoreError("exists", f"device {device_id}")
            c.execute(
                "INSERT INTO devices (id, node_id, name, created, last_seen, status,"
                " cert_fingerprint, enrolled_with) VALUES (?,?,?,?,?,?,?,?)",
                (
                    device_id,
                    _new_node_id(c),
                    name,
                    now,
                    now,
                    DeviceStatus.ACTIVE,
                    cert_fingerprint,
                    token_id,
                ),
            )
            return _device(_one(c, "SELECT * FROM devices WHERE id=?", device_id))

    # -- runs and model lineage ----------------------------------------------

    def create_run(
        self, run_id: int, config: Mapping[str, Any], *, model_version: str | None = None
    ) -> Run:
        """Start a run; `model_version` is its initial global model (round 0)."""
        now = self._clock()
        rid = _to_i64(run_id)
        with self._tx(durable=True) as c:
            if _one(c, "SELECT 1 FROM runs WHERE id=?", rid):
                raise StoreError("exists", f"run {run_id}")
            c.execute(
                "INSERT INTO runs (id, config, status, created, current_round, model_version)"
                " VALUES (?,?,?,?,0,?)",
                (
                    rid,
                    json.dumps(dict(config), sort_keys=True),
                    RunStatus.RUNNING,
                    now,
                    model_version,
                ),
            )
            if model_version is not None:
                _add_model(c, model_version, rid, 0, None, now)
            return _run(_one(c, "SELECT * FROM runs WHERE id=?", rid))

    def get_run(self, run_id: int) -> Run | None:
        row = self._row("SELECT * FROM runs WHERE id=?", _to_i64(run_id))
        return _run(row) if row else None

    def list_runs(self, status: RunStatus | None = None) -> list[Run]:
        if status is None:
            rows = self._rows("SELECT * FROM runs ORDER BY created, rowid")
        else:
            rows = self._rows("SELECT * FROM runs WHERE status=? ORDER BY created, rowid", status)
        return [_run(r) for r in rows]

    def latest_run(self, status: RunStatus | None = RunStatus.RUNNING) -> Run | None:
        """The most recently created run (with `status`): what a restart resumes."""
        runs = self.list_runs(status)
        return runs[-1] if runs else None

    def set_run_status(self, run_id: int, status: RunStatus) -> None:
        with self._tx(durable=True) as c:
            _require(
                c.execute("UPDATE runs SET status=? WHERE id=?", (status, _to_i64(run_id))),
                "run",
                run_id,
            )

    def get_model(self, version: str) -> ModelVersion | None:
        row = self._row("SELECT * FROM models WHERE version=?", version)
        return _model(row) if row else None

    def list_models(self, run_id: int | None = None) -> list[ModelVersion]:
        if run_id is None:
            rows = self._rows("SELECT * FROM models ORDER BY created, rowid")
        else:
            rows = self._rows(
                "SELECT * FROM models WHERE run_id=? ORDER BY round, rowid", _to_i64(run_id)
            )
        return [_model(r) for r in rows]

    # -- rounds --------------------------------------------------------------

    def open_round(self, run_id: int, round: int) -> Round:
        """Open `round` of a run; reopening an unfinished round starts it afresh.

        After a restart the coordinator re-runs the first round that did not
        complete: its old row is reset and its leftover tasks expire, so late
        results from before the crash are refused. A completed round cannot be
        reopened.
        """
        now = self._clock()
        rid = _to_i64(run_id)
        with self._tx() as c:
            if not _one(c, "SELECT 1 FROM runs WHERE id=?", rid):
                raise StoreError("not_found", f"run {run_id}")
            row = _one(c, "SELECT status FROM rounds WHERE run_id=? AND round=?", rid, round)
            if row and row["status"] == RoundStatus.COMPLETED:
                raise StoreError("completed", f"run {run_id} round {round}")
            c.execute(
                "INSERT INTO rounds (run_id, round, status, started, metrics)"
                " VALUES (?,?,?,?,'{}') ON CONFLICT (run_id, round) DO UPDATE SET"
                " status=excluded.status, started=excluded.started, ended=NULL,"
                " metrics='{}', model_version=NULL",
                (rid, round, RoundStatus.OPEN, now),
            )
            _expire_tasks(c, rid, round, now)
            return _round(_one(c, "SELECT * FROM rounds WHERE run_id=? AND round=?", rid, round))

    def close_round(self, run_id: int, round: int) -> bool:
        """Stop accepting results for an open round; True if this call closed it.

        Tasks still without a result expire in the same transaction.
        """
        now = self._clock()
        rid = _to_i64(run_id)
        with self._tx() as c:
            cur = c.execute(
                "UPDATE rounds SET status=? WHERE run_id=? AND round=? AND status=?",
                (RoundStatus.CLOSED, rid, round, RoundStatus.OPEN),
            )
            if cur.rowcount:
                _expire_tasks(c, rid, round, now)
            return cur.rowcount == 1

    def complete_round(
        self,
        run_id: int,
        round: int,
        *,
        model_version: str,
        metrics: RoundMetrics,
        contributors: Sequence[str] = (),
        dropped: Sequence[str] = (),
        parent_version: str | None = None,
    ) -> Round:
        """Commit a round's result in one durable transaction.

        The round becomes completed with its metrics and new global model,
        the model's lineage is recorded, and the run's current round and model
        advance, all or nothing: after a crash the run resumes either before
        or after this round, never between. `parent_version` defaults to the
        run's model before this round.
        """
        now = self._clock()
        rid = _to_i64(run_id)
        with self._tx(durable=True) as c:
            row = _one(c, "SELECT status FROM rounds WHERE run_id=? AND round=?", rid, round)
            if row is None:
                raise StoreError("not_found", f"run {run_id} round {round}")
            if row["status"] == RoundStatus.COMPLETED:
                raise StoreError("completed", f"run {run_id} round {round}")
            run = _one(c, "SELECT current_round, model_version FROM runs WHERE id=?", rid)
            if parent_version is None:
                parent_version = run["model_version"]
            c.execute(
                "UPDATE rounds SET status=?, ended=?, metrics=?, model_version=?"
                " WHERE run_id=? AND round=?",
                (
                    RoundStatus.COMPLETED,
                    now,
                    _round_json(metrics, contributors, dropped),
                    model_version,
                    rid,
                    round,
                ),
            )
            _expire_tasks(c, rid, round, now)
            _add_model(c, model_version, rid, round, parent_version, now)
            c.execute(
                "UPDATE runs SET current_round=MAX(current_round, ?), model_version=? WHERE id=?",
                (round, model_version, rid),
            )
            return _round(_one(c, "SELECT * FROM rounds WHERE run_id=? AND round=?", rid, round))

    def get_round(self, run_id: int, round: int) -> Round | None:
        row = self._row("SELECT * FROM rounds WHERE run_id=? AND round=?", _to_i64(run_id), round)
        return _round(row) if row else None

    def list_rounds(self, run_id: int) -> list[Round]:
        rows = self._rows("SELECT * FROM rounds WHERE run_id=? ORDER BY round", _to_i64(run_id))
        return [_round(r) for r in rows]

    # -- tasks ---------------------------------------------------------------

    def add_task(
        self, task_id: str, *, run_id: int, round: int, device_id: str, message_type: str
    ) -> Task:
        """Record a task handed to a device's queue (state queued)."""
        now = self._clock()
        rid = _to_i64(run_id)
        with self._tx() as c:
            try:
                c.execute(
                    "INSERT INTO tasks (id, run_id, round, device_id, message_type, created,"
                    " state, updated) VALUES (?,?,?,?,?,?,?,?)",
                    (task_id, rid, round, device_id, message_type, now, TaskState.QUEUED, now),
                )
            except sqlite3.IntegrityError as e:
                raise StoreError("conflict", f"task {task_id}: {e}") from None
            return _task(_one(c, "SELECT * FROM tasks WHERE id=?", task_id))

    def get_task(self, task_id: str) -> Task | None:
        row = self._row("SELECT * FROM tasks WHERE id=?", task_id)
        return _task(row) if row else None

    def list_tasks(self, run_id: int, round: int, state: TaskState | None = None) -> list[Task]:
        sql = "SELECT * FROM tasks WHERE run_id=? AND round=?"
        args: list[Any] = [_to_i64(run_id), round]
        if state is not None:
            sql += " AND state=?"
            args.append(state)
        return [_task(r) for r in self._rows(sql + " ORDER BY created, id", *args)]

    def set_task_state(
        self, task_id: str, state: TaskState, *, only_from: Sequence[TaskState] | None = None
    ) -> bool:
        """Move a task to `state` (only from one of `only_from` if given); True if it moved."""
        now = self._clock()
        sql = "UPDATE tasks SET state=?, updated=? WHERE id=?"
        args: list[Any] = [state, now, task_id]
        if only_from:
            sql += f" AND state IN ({','.join('?' * len(only_from))})"
            args.extend(only_from)
        with self._tx() as c:
            return c.execute(sql, args).rowcount == 1

    # -- results -------------------------------------------------------------

    def begin_result(self, task_id: str, *, total_size: int, sha256: str, path: str) -> Result:
        """The result row for a push of `task_id`, created at 0 bytes if new.

        An existing row is returned as is when it is complete or rejected (the
        caller answers "duplicate" or refuses) or when it is partial for the
        same payload (the caller resumes at `bytes_received`). A partial row
        for a different payload (another size or hash) restarts at 0 bytes.
        """
        now = self._clock()
        with self._tx() as c:
            task = _one(c, "SELECT * FROM tasks WHERE id=?", task_id)
            if task is None:
                raise StoreError("not_found", f"task {task_id}")
            row = _one(c, "SELECT * FROM results WHERE task_id=?", task_id)
            if row is None:
                c.execute(
                    "INSERT INTO results (task_id, run_id, round, device_id, status, total_size,"
                    " bytes_received, sha256, path, created, updated)"
                    " VALUES (?,?,?,?,?,?,0,?,?,?,?)",
                    (
                        task_id,
                        task["run_id"],
                        task["round"],
                        task["device_id"],
                        ResultStatus.PARTIAL,
                        total_size,
                        sha256,
                        path,
                        now,
                        now,
                    ),
                )
            elif row["status"] == ResultStatus.PARTIAL and (
                row["total_size"] != total_size or row["sha256"] != sha256
            ):
                c.execute(
                    "UPDATE results SET total_size=?, sha256=?, bytes_received=0, path=?,"
                    " updated=? WHERE task_id=?",
                    (total_size, sha256, path, now, task_id),
                )
            return _result(_one(c, "SELECT * FROM results WHERE task_id=?", task_id))

    def record_progress(self, task_id: str, bytes_received: int) -> None:
        """Remember how many bytes of a partial upload are durably held."""
        now = self._clock()
        with self._tx() as c:
            c.execute(
                "UPDATE results SET bytes_received=?, updated=? WHERE task_id=? AND status=?"
                " AND ? <= total_size",
                (bytes_received, now, task_id, ResultStatus.PARTIAL, bytes_received),
            )

    def complete_result(self, task_id: str) -> bool:
        """Mark a fully received, verified result complete and its task done.

        Returns True only for the call that completed it, so a result pushed
        twice is counted once.
        """
        now = self._clock()
        with self._tx() as c:
            cur = c.execute(
                "UPDATE results SET status=?, bytes_received=total_size, updated=?"
                " WHERE task_id=? AND status=?",
                (ResultStatus.COMPLETE, now, task_id, ResultStatus.PARTIAL),
            )
            if cur.rowcount != 1:
                return False
            c.execute(
                "UPDATE tasks SET state=?, updated=? WHERE id=?", (TaskState.DONE, now, task_id)
            )
            return True

    def reject_result(self, task_id: str, reason: str) -> None:
        """Refuse a result for good (reason kept for metrics and audit); its task fails."""
        now = self._clock()
        with self._tx() as c:
            _require(
                c.execute(
                    "UPDATE results SET status=?, reason=?, updated=? WHERE task_id=?",
                    (ResultStatus.REJECTED, reason, now, task_id),
                ),
                "result",
                task_id,
            )
            c.execute(
                "UPDATE tasks SET state=?, updated=? WHERE id=?", (TaskState.FAILED, now, task_id)
            )

    def get_result(self, task_id: str) -> Result | None:
        row = self._row("SELECT * FROM results WHERE task_id=?", task_id)
        return _result(row) if row else None

    def list_results(
        self, run_id: int, round: int, status: ResultStatus | None = None
    ) -> list[Result]:
        sql = "SELECT * FROM results WHERE run_id=? AND round=?"
        args: list[Any] = [_to_i64(run_id), round]
        if status is not None:
            sql += " AND status=?"
            args.append(status)
        return [_result(r) for r in self._rows(sql + " ORDER BY created, task_id", *args)]

    # -- plumbing ------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock; `durable` fsyncs the WAL at commit."""
        with self._lock:
            if durable:
                self._conn.execute("PRAGMA synchronous=FULL")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            finally:
                if durable:
                    self._conn.execute("PRAGMA synchronous=NORMAL")

    def _row(self, sql: str, *args: Any) -> sqlite3.Row | None:
        with self._lock:
            return self._conn.execute(sql, args).fetchone()

    def _rows(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def _scalar(self, sql: str, *args: Any) -> Any:
        row = self._row(sql, *args)
        return row[0] if row else None


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION, one transaction per version."""
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > len(MIGRATIONS):
        raise StoreError(
            "schema_too_new",
            f"database is at version {current}, this fedge knows {len(MIGRATIONS)}",
        )
    for version in range(current + 1, len(MIGRATIONS) + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in MIGRATIONS[version - 1]:
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version={version:d}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def _one(c: sqlite3.Connection, sql: str, *args: Any) -> sqlite3.Row | None:
    return c.execute(sql, args).fetchone()


def _require(cur: sqlite3.Cursor, what: str, key: object) -> None:
    if cur.rowcount == 0:
        raise StoreError("not_found", f"{what} {key}")


def _expire_tasks(c: sqlite3.Connection, rid: int, round: int, now: float) -> None:
    c.execute(
        "UPDATE tasks SET state=?, updated=? WHERE run_id=? AND round=? AND state IN (?,?)",
        (TaskState.EXPIRED, now, rid, round, TaskState.QUEUED, TaskState.DELIVERED),
    )


def _add_model(
    c: sqlite3.Connection, version: str, rid: int, round: int, parent: str | None, now: float
) -> None:
    """Record a model version's lineage; the first record of a version wins."""
    c.execute(
        "INSERT INTO models (version, run_id, round, parent_version, created)"
        " VALUES (?,?,?,?,?) ON CONFLICT (version) DO NOTHING",
        (version, rid, round, parent, now),
    )


def _new_node_id(c: sqlite3.Connection) -> int:
    """A random Flower node id, unused, never 0 or Flower's SuperLink id (1)."""
    while True:
        node_id = secrets.randbits(63)
        if node_id > 1 and not _one(c, "SELECT 1 FROM devices WHERE node_id=?", node_id):
            return node_id


def _to_i64(value: int) -> int:
    """Flower's unsigned 64-bit id as SQLite's signed integer."""
    if not 0 <= value < _U64:
        raise StoreError("bad_id", f"{value} is not an unsigned 64-bit id")
    return value - _U64 if value > _I64_MAX else value


def _to_u64(value: int) -> int:
    return value + _U64 if value < 0 else value


def _device(r: sqlite3.Row) -> Device:
    return Device(
        id=r["id"],
        node_id=_to_u64(r["node_id"]),
        name=r["name"],
        created=r["created"],
        last_seen=r["last_seen"],
        status=DeviceStatus(r["status"]),
        capabilities=json.loads(r["capabilities"]),
        num_examples=r["num_examples"],
        cert_fingerprint=r["cert_fingerprint"],
        enrolled_with=r["enrolled_with"],
    )


def _token(r: sqlite3.Row) -> EnrollmentToken:
    return EnrollmentToken(
        id=r["id"],
        secret_hash=r["secret_hash"],
        label=r["label"],
        created=r["created"],
        expires=r["expires"],
        max_uses=r["max_uses"],
        uses=r["uses"],
        revoked=bool(r["revoked"]),
        last_used=r["last_used"],
    )


def _run(r: sqlite3.Row) -> Run:
    return Run(
        id=_to_u64(r["id"]),
        config=json.loads(r["config"]),
        status=RunStatus(r["status"]),
        created=r["created"],
        current_round=r["current_round"],
        model_version=r["model_version"],
    )


def _round_json(metrics: RoundMetrics, contributors: Sequence[str], dropped: Sequence[str]) -> str:
    """The rounds.metrics column: Flower-side metrics plus the fleet's audit lists."""
    return json.dumps(
        {
            "metrics": metrics.to_dict(),
            "contributors": list(contributors),
            "dropped": list(dropped),
        },
        sort_keys=True,
    )


def _round(r: sqlite3.Row) -> Round:
    raw = json.loads(r["metrics"] or "{}")
    metrics = {"round": r["round"], **raw.get("metrics", {})}
    return Round(
        run_id=_to_u64(r["run_id"]),
        round=r["round"],
        status=RoundStatus(r["status"]),
        started=r["started"],
        ended=r["ended"],
        metrics=RoundMetrics.from_dict(metrics),
        model_version=r["model_version"],
        contributors=list(raw.get("contributors", [])),
        dropped=list(raw.get("dropped", [])),
    )


def _model(r: sqlite3.Row) -> ModelVersion:
    return ModelVersion(
        version=r["version"],
        run_id=None if r["run_id"] is None else _to_u64(r["run_id"]),
        round=r["round"],
        parent_version=r["parent_version"],
        created=r["created"],
    )


def _task(r: sqlite3.Row) -> Task:
    return Task(
        id=r["id"],
        run_id=_to_u64(r["run_id"]),
        round=r["round"],
        device_id=r["device_id"],
        message_type=r["message_type"],
        created=r["created"],
        state=TaskState(r["state"]),
        updated=r["updated"],
    )


def _result(r: sqlite3.Row) -> Result:
    return Result(
        task_id=r["task_id"],
        run_id=_to_u64(r["run_id"]),
        round=r["round"],
        device_id=r["device_id"],
        status=ResultStatus(r["status"]),
        total_size=r["total_size"],
        bytes_received=r["bytes_received"],
        sha256=r["sha256"],
        path=r["path"],
        reason=r["reason"],
        created=r["created"],
        updated=r["updated"],
    )
