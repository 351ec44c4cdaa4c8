"""`Store`: the coordinator's SQLite file opened, migrated and shared, with every table group's
methods on one object (callers hold one store, not one object per table).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedge.server.store import schema
from fedge.server.store.devices import DeviceTables
from fedge.server.store.model_versions import ModelTables
from fedge.server.store.records import StoreError
from fedge.server.store.runs import RunTables
from fedge.server.store.tasks import TaskTables


class Store(DeviceTables, RunTables, ModelTables, TaskTables):
    """Typed access to the coordinator's SQLite file; safe to share between threads."""

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
            schema.migrate(conn)
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

    # -- introspection, for checks and diagnostics ---------------------------

    @property
    def schema_version(self) -> int:
        return int(self._scalar("PRAGMA user_version"))

    def pragma(self, name: str) -> Any:
        """Read a PRAGMA (journal_mode, synchronous, ...)."""
        if not name.isidentifier():
            raise StoreError("bad_pragma", name)
        return self._scalar(f"PRAGMA {name}")
