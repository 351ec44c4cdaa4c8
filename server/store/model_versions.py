"""Global model versions and the promotion history (tables `models`, `promotions`).

A version's lineage row is written by the round that made it (`insert_model`,
called by the run tables); the registry (server/registry.py) adds its
evaluation and decides promotions through the methods here. `current` is the
newest promotion not rolled back: the history is a stack, so repeated
rollbacks walk back through earlier currents. Promotions and rollbacks commit
with `synchronous=FULL`, so `current` survives a crash or a power cut.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable, Mapping

from fedge.server.store.columns import json_object, to_i64, to_json, to_u64_or_none
from fedge.server.store.records import ModelStatus, ModelVersion, Promotion, StoreError
from fedge.server.store.sqlite import RowMapper, SqliteTables, existing, require

_CURRENT = "SELECT version FROM promotions WHERE rolled_back IS NULL ORDER BY id DESC LIMIT 1"


def _stored_status(value: str) -> ModelStatus:
    """`models.status` holds candidate | promoted | rejected; promoted, not current: retired."""
    return ModelStatus.RETIRED if value == "promoted" else ModelStatus(value)


_model = RowMapper(
    ModelVersion, run_id=to_u64_or_none, status=_stored_status, evaluation=json_object
)
_promotion = RowMapper(Promotion)


class ModelTables(SqliteTables):
    """Model versions (lineage, evaluation, status) and which one is current."""

    def get_model(self, version: str) -> ModelVersion | None:
        with self._lock:
            row = self._row("SELECT * FROM models WHERE version=?", version)
            return self._as_shown(row, self.current_model()) if row else None

    def list_models(self, run_id: int | None = None) -> list[ModelVersion]:
        """Every version (of one run if given), oldest first."""
        with self._lock:
            if run_id is None:
                rows = self._rows("SELECT * FROM models ORDER BY created, rowid")
            else:
                rows = self._rows(
                    "SELECT * FROM models WHERE run_id=? ORDER BY round, rowid", to_i64(run_id)
                )
            current = self.current_model()
        return [self._as_shown(r, current) for r in rows]

    def model_versions_starting(self, prefix: str, *, limit: int = 2) -> list[str]:
        """Versions that start with `prefix` (lowercase hex), in order, at most `limit`."""
        rows = self._rows(
            "SELECT version FROM models WHERE version >= ? AND version < ?"
            " ORDER BY version LIMIT ?",
            prefix,
            prefix + "g",  # every hex string starting with `prefix` sorts below prefix + "g"
            limit,
        )
        return [r["version"] for r in rows]

    def current_model(self) -> str | None:
        """The version devices and the endpoint serve, or None before any promotion."""
        row = self._row(_CURRENT)
        return row["version"] if row else None

    def list_promotions(self) -> list[Promotion]:
        """Every promotion, oldest first, with its rollback if any."""
        return [_promotion(r) for r in self._rows("SELECT * FROM promotions ORDER BY id")]

    def set_model_evaluation(self, version: str, evaluation: Mapping[str, float]) -> None:
        """Merge figures into a version's evaluation (new figures win)."""
        with self._tx() as c:
            row = existing(c, "SELECT evaluation FROM models WHERE version=?", version)
            merged = {**json_object(row["evaluation"]), **evaluation}
            c.execute(
                "UPDATE models SET evaluation=? WHERE version=?", (to_json(merged), version)
            )

    def promote_model(self, version: str, *, reason: str) -> None:
        """Make a version current (durably); promoting the current version changes nothing."""
        with self._tx(durable=True) as c:
            top = c.execute(_CURRENT).fetchone()
            if top is not None and top["version"] == version:
                return
            c.execute(
                "INSERT INTO promotions (version, at, reason) VALUES (?,?,?)",
                (version, self._clock(), reason),
            )
            c.execute(
                "UPDATE models SET status='promoted', status_reason=? WHERE version=?",
                (reason or None, version),
            )

    def roll_back_promotion(self, *, reason: str, check_target: Callable[[str], None]) -> str:
        """Undo the latest promotion and return the version current again (durably).

        `check_target(version)` runs inside the transaction before anything
        changes; if it raises, nothing is rolled back. Refuses with
        `no_current` (nothing promoted) or `no_previous` (only one current so far).
        """
        with self._tx(durable=True) as c:
            rows = c.execute(
                "SELECT id, version FROM promotions WHERE rolled_back IS NULL"
                " ORDER BY id DESC LIMIT 2"
            ).fetchall()
            if not rows:
                raise StoreError("no_current", "nothing has been promoted")
            if len(rows) < 2:
                raise StoreError("no_previous", f"{rows[0]['version']} is the only current so far")
            target: str = rows[1]["version"]
            check_target(target)
            c.execute(
                "UPDATE promotions SET rolled_back=?, rollback_reason=? WHERE id=?",
                (self._clock(), reason, rows[0]["id"]),
            )
        return target

    def reject_model(self, version: str, reason: str) -> None:
        """Mark a version rejected (never served unless promoted by hand), with why."""
        with self._tx() as c:
            require(
                c.execute(
                    "UPDATE models SET status='rejected', status_reason=? WHERE version=?",
                    (reason, version),
                ),
                "model",
                version,
            )

    @staticmethod
    def _as_shown(row: sqlite3.Row, current: str | None) -> ModelVersion:
        model = _model(row)
        if model.version == current:
            return dataclasses.replace(model, status=ModelStatus.CURRENT)
        return model


def insert_model(
    c: sqlite3.Connection, version: str, rid: int, round: int, parent: str | None, now: float
) -> None:
    """Record a model version's lineage; the first record of a version wins."""
    c.execute(
        "INSERT INTO models (version, run_id, round, parent_version, created)"
        " VALUES (?,?,?,?,?) ON CONFLICT (version) DO NOTHING",
        (version, rid, round, parent, now),
    )
