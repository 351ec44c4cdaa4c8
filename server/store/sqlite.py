"""What every table group of the store shares: the connection, its lock, transactions and
the mapping of rows to records. Internal to the package.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from fedge.server.store.records import StoreError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

R = TypeVar("R", bound="DataclassInstance")


class SqliteTables:
    """One SQLite connection behind a re-entrant lock; the table groups add their methods."""

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Callable[[], float]) -> None:
        self._conn = conn
        self._lock = threading.RLock()
        self.path = path
        self._clock = clock

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

    def _select(self, table: str, *, order: str = "rowid", **equal: Any) -> list[sqlite3.Row]:
        """Rows of `table` whose columns equal the values given (a None value: any)."""
        filters = {column: value for column, value in equal.items() if value is not None}
        where = " AND ".join(f"{column}=?" for column in filters) or "1"
        return self._rows(
            f"SELECT * FROM {table} WHERE {where} ORDER BY {order}", *filters.values()
        )

    def _select_one(self, table: str, **key: Any) -> sqlite3.Row | None:
        """The row of `table` with these key values, or None (a None value matches nothing)."""
        where = " AND ".join(f"{column}=?" for column in key)
        return self._row(f"SELECT * FROM {table} WHERE {where}", *key.values())

    def _scalar(self, sql: str, *args: Any) -> Any:
        row = self._row(sql, *args)
        return row[0] if row else None


class RowMapper(Generic[R]):
    """Builds a record from a row whose columns carry the record's field names.

    `convert` names the columns that need more than a copy (JSON text, enums,
    unsigned ids), so a column added to a record is one field, not a new line
    in every mapper.
    """

    def __init__(self, record: type[R], **convert: Callable[[Any], Any]) -> None:
        self._record = record
        self._names = tuple(f.name for f in fields(record))
        unknown = set(convert) - set(self._names)
        if unknown:
            raise TypeError(f"{record.__name__} has no field {', '.join(sorted(unknown))}")
        self._convert = convert

    def __call__(self, row: sqlite3.Row) -> R:
        values = {name: row[name] for name in self._names}
        for name, convert in self._convert.items():
            values[name] = convert(values[name])
        return self._record(**values)

    def or_none(self, row: sqlite3.Row | None) -> R | None:
        return None if row is None else self(row)


def one(c: sqlite3.Connection, sql: str, *args: Any) -> sqlite3.Row | None:
    return c.execute(sql, args).fetchone()


def existing(c: sqlite3.Connection, sql: str, *args: Any) -> sqlite3.Row:
    """A row the transaction knows is there (it just wrote or checked it)."""
    row = c.execute(sql, args).fetchone()
    if row is None:
        raise StoreError("not_found", f"{sql} {args}")
    return row


def require(cur: sqlite3.Cursor, what: str, key: object) -> None:
    """Raise `not_found` when an UPDATE matched no row."""
    if cur.rowcount == 0:
        raise StoreError("not_found", f"{what} {key}")
