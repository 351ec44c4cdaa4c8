"""Runs and their rounds (tables `runs`, `rounds`): what a restart resumes from.

A round's completion, its model's lineage row and the run's progress commit
in one durable transaction, so after a crash a run is before or after a
round, never between.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from fedge.server.round_metrics import RoundMetrics
from fedge.server.store.columns import json_object, to_i64, to_json, to_u64
from fedge.server.store.model_versions import insert_model
from fedge.server.store.records import Round, RoundStatus, Run, RunStatus, StoreError
from fedge.server.store.sqlite import RowMapper, SqliteTables, existing, one, require
from fedge.server.store.tasks import expire_tasks

_run = RowMapper(Run, id=to_u64, config=json_object, status=RunStatus)
_ROUND = "SELECT * FROM rounds WHERE run_id=? AND round=?"


class RunTables(SqliteTables):
    """Runs, their rounds and each round's outcome."""

    def create_run(
        self, run_id: int, config: Mapping[str, Any], *, model_version: str | None = None
    ) -> Run:
        """Start a run; `model_version` is its initial global model (round 0)."""
        now = self._clock()
        rid = to_i64(run_id)
        with self._tx(durable=True) as c:
            if one(c, "SELECT 1 FROM runs WHERE id=?", rid):
                raise StoreError("exists", f"run {run_id}")
            c.execute(
                "INSERT INTO runs (id, config, status, created, current_round, model_version)"
                " VALUES (?,?,?,?,0,?)",
                (
                    rid,
                    to_json(dict(config)),
                    RunStatus.RUNNING,
                    now,
                    model_version,
                ),
            )
            if model_version is not None:
                insert_model(c, model_version, rid, 0, None, now)
            return _run(existing(c, "SELECT * FROM runs WHERE id=?", rid))

    def get_run(self, run_id: int) -> Run | None:
        return _run.or_none(self._select_one("runs", id=to_i64(run_id)))

    def list_runs(self, status: RunStatus | None = None) -> list[Run]:
        return [_run(r) for r in self._select("runs", status=status, order="created, rowid")]

    def latest_run(self, status: RunStatus | None = RunStatus.RUNNING) -> Run | None:
        """The most recently created run (with `status`): what a restart resumes."""
        runs = self.list_runs(status)
        return runs[-1] if runs else None

    def set_run_status(self, run_id: int, status: RunStatus) -> None:
        with self._tx(durable=True) as c:
            require(
                c.execute("UPDATE runs SET status=? WHERE id=?", (status, to_i64(run_id))),
                "run",
                run_id,
            )

    # -- rounds --------------------------------------------------------------

    def open_round(self, run_id: int, round: int) -> Round:
        """Open `round` of a run; reopening an unfinished round starts it afresh.

        After a restart the coordinator re-runs the first round that did not
        complete: its old row is reset and its leftover tasks expire, so late
        results from before the crash are refused. A completed round cannot be
        reopened.
        """
        now = self._clock()
        rid = to_i64(run_id)
        with self._tx() as c:
            if not one(c, "SELECT 1 FROM runs WHERE id=?", rid):
                raise StoreError("not_found", f"run {run_id}")
            row = one(c, "SELECT status FROM rounds WHERE run_id=? AND round=?", rid, round)
            if row and row["status"] == RoundStatus.COMPLETED:
                raise StoreError("completed", f"run {run_id} round {round}")
            c.execute(
                "INSERT INTO rounds (run_id, round, status, started, metrics)"
                " VALUES (?,?,?,?,'{}') ON CONFLICT (run_id, round) DO UPDATE SET"
                " status=excluded.status, started=excluded.started, ended=NULL,"
                " metrics='{}', model_version=NULL",
                (rid, round, RoundStatus.OPEN, now),
            )
            expire_tasks(c, rid, round, now)
            return _round(existing(c, _ROUND, rid, round))

    def close_round(self, run_id: int, round: int) -> bool:
        """Stop accepting results for an open round; True if this call closed it.

        Tasks still without a result expire in the same transaction.
        """
        now = self._clock()
        rid = to_i64(run_id)
        with self._tx() as c:
            cur = c.execute(
                "UPDATE rounds SET status=? WHERE run_id=? AND round=? AND status=?",
                (RoundStatus.CLOSED, rid, round, RoundStatus.OPEN),
            )
            if cur.rowcount:
                expire_tasks(c, rid, round, now)
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
        rid = to_i64(run_id)
        with self._tx(durable=True) as c:
            row = one(c, "SELECT status FROM rounds WHERE run_id=? AND round=?", rid, round)
            if row is None:
                raise StoreError("not_found", f"run {run_id} round {round}")
            if row["status"] == RoundStatus.COMPLETED:
                raise StoreError("completed", f"run {run_id} round {round}")
            run = existing(c, "SELECT model_version FROM runs WHERE id=?", rid)
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
            expire_tasks(c, rid, round, now)
            insert_model(c, model_version, rid, round, parent_version, now)
            c.execute(
                "UPDATE runs SET current_round=MAX(current_round, ?), model_version=? WHERE id=?",
                (round, model_version, rid),
            )
            return _round(existing(c, _ROUND, rid, round))

    def get_round(self, run_id: int, round: int) -> Round | None:
        row = self._row(_ROUND, to_i64(run_id), round)
        return _round(row) if row else None

    def list_rounds(self, run_id: int) -> list[Round]:
        rows = self._rows("SELECT * FROM rounds WHERE run_id=? ORDER BY round", to_i64(run_id))
        return [_round(r) for r in rows]


def _round_json(metrics: RoundMetrics, contributors: Sequence[str], dropped: Sequence[str]) -> str:
    """The rounds.metrics column: Flower-side metrics plus the fleet's audit lists."""
    return to_json(
        {
            "metrics": metrics.to_dict(),
            "contributors": list(contributors),
            "dropped": list(dropped),
        }
    )


def _round(r: sqlite3.Row) -> Round:
    raw = json_object(r["metrics"])
    metrics = {"round": r["round"], **raw.get("metrics", {})}
    return Round(
        run_id=to_u64(r["run_id"]),
        round=r["round"],
        status=RoundStatus(r["status"]),
        started=r["started"],
        ended=r["ended"],
        metrics=RoundMetrics.from_dict(metrics),
        model_version=r["model_version"],
        contributors=list(raw.get("contributors", [])),
        dropped=list(raw.get("dropped", [])),
    )
