"""Messages queued for devices and the results they upload (tables `tasks`, `results`).

Results are keyed by task id: the same result pushed twice is counted once,
and a partial upload's progress (bytes held, hash, file path) survives a
restart.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from fedge.server.store.columns import to_i64, to_u64
from fedge.server.store.records import (
    DeviceTask,
    Result,
    ResultStatus,
    StoreError,
    TaskState,
)
from fedge.server.store.sqlite import RowMapper, SqliteTables, existing, one, require

_task = RowMapper(DeviceTask, run_id=to_u64, state=TaskState)
_result = RowMapper(Result, run_id=to_u64, status=ResultStatus)


class TaskTables(SqliteTables):
    """Each device's tasks of a round, and the uploads that answer them."""

    def add_task(
        self, task_id: str, *, run_id: int, round: int, device_id: str, message_type: str
    ) -> DeviceTask:
        """Record a task handed to a device's queue (state queued)."""
        now = self._clock()
        rid = to_i64(run_id)
        with self._tx() as c:
            try:
                c.execute(
                    "INSERT INTO tasks (id, run_id, round, device_id, message_type, created,"
                    " state, updated) VALUES (?,?,?,?,?,?,?,?)",
                    (task_id, rid, round, device_id, message_type, now, TaskState.QUEUED, now),
                )
            except sqlite3.IntegrityError as e:
                raise StoreError("conflict", f"task {task_id}: {e}") from None
            return _task(existing(c, "SELECT * FROM tasks WHERE id=?", task_id))

    def get_task(self, task_id: str) -> DeviceTask | None:
        return _task.or_none(self._select_one("tasks", id=task_id))

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

    def list_tasks(
        self, run_id: int, round: int, state: TaskState | None = None
    ) -> list[DeviceTask]:
        rows = self._of_round("tasks", run_id, round, "created, id", state=state)
        return [_task(r) for r in rows]

    # -- results (uploads answering tasks) ----------------------------------

    def begin_result(self, task_id: str, *, total_size: int, sha256: str, path: str) -> Result:
        """The result row for a push of `task_id`, created at 0 bytes if new.

        An existing row is returned as is when it is complete or rejected (the
        caller answers "duplicate" or refuses) or when it is partial for the
        same payload (the caller resumes at `bytes_received`). A partial row
        for a different payload (another size or hash) restarts at 0 bytes.
        """
        now = self._clock()
        with self._tx() as c:
            task = one(c, "SELECT * FROM tasks WHERE id=?", task_id)
            if task is None:
                raise StoreError("not_found", f"task {task_id}")
            row = one(c, "SELECT * FROM results WHERE task_id=?", task_id)
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
            return _result(existing(c, "SELECT * FROM results WHERE task_id=?", task_id))

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
            require(
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
        return _result.or_none(self._select_one("results", task_id=task_id))

    def list_results(
        self, run_id: int, round: int, status: ResultStatus | None = None
    ) -> list[Result]:
        rows = self._of_round("results", run_id, round, "created, task_id", status=status)
        return [_result(r) for r in rows]

    def _of_round(
        self, table: str, run_id: int, round: int, order: str, **equal: Any
    ) -> list[sqlite3.Row]:
        """A round's rows of `table` (tasks and results both carry run and round)."""
        return self._select(table, order=order, run_id=to_i64(run_id), round=round, **equal)


def expire_tasks(c: sqlite3.Connection, rid: int, round: int, now: float) -> None:
    """Tasks of a round still waiting for a result expire (round closed or restarted)."""
    c.execute(
        "UPDATE tasks SET state=?, updated=? WHERE run_id=? AND round=? AND state IN (?,?)",
        (TaskState.EXPIRED, now, rid, round, TaskState.QUEUED, TaskState.DELIVERED),
    )
