"""The coordinator's durable state in one SQLite file: devices, runs, rounds, models, tasks.

Why these choices (docs/coordinator.md has the long form):
- WAL journal with `synchronous=NORMAL`: a committed transaction survives
  `kill -9` of the coordinator (it is in the WAL, which the OS holds); only a
  power cut can lose the last few commits, and never corrupts the file. The
  commits that must survive even that (a round's completion with its model
  version, a run's creation, a promotion) are written with `synchronous=FULL`.
- Schema versioned by `PRAGMA user_version` (`schema.py`).
- One connection guarded by a lock: calls are short (microseconds to a
  millisecond), and the asyncio gRPC server and the ServerApp thread may both
  use the store.
- Flower's run and node ids are unsigned 64-bit; SQLite integers are signed,
  so ids are stored two's-complement and converted back on read.

Layout: `records.py` (the rows as frozen records, their states, `StoreError`),
`schema.py` (migrations), `sqlite.py` (connection, transactions, row
mapping), one module per table group (`devices.py`, `runs.py`,
`model_versions.py`, `tasks.py`) and `database.py`, whose `Store` carries
them all. No SQL lives outside this package.
"""

from fedge.server.store.database import Store
from fedge.server.store.records import (
    Device,
    DeviceStatus,
    DeviceTask,
    EnrollmentToken,
    ModelStatus,
    ModelVersion,
    Promotion,
    Result,
    ResultStatus,
    Round,
    RoundStatus,
    Run,
    RunStatus,
    StoreError,
    TaskState,
)
from fedge.server.store.schema import MIGRATIONS, SCHEMA_VERSION

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Device",
    "DeviceStatus",
    "DeviceTask",
    "EnrollmentToken",
    "ModelStatus",
    "ModelVersion",
    "Promotion",
    "Result",
    "ResultStatus",
    "Round",
    "RoundStatus",
    "Run",
    "RunStatus",
    "Store",
    "StoreError",
    "TaskState",
]
