"""The coordinator database's schema: append-only migrations and the code that applies them.

Versioned by `PRAGMA user_version`; each migration runs in one transaction
with its version bump, so a crash mid-migration changes nothing, and a
database newer than this code is refused rather than misread.
"""

from __future__ import annotations

import sqlite3

from fedge.server.store.records import StoreError

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
    # 3: model registry (issue 7; store/model_versions.py). `status` is candidate |
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


def migrate(conn: sqlite3.Connection) -> None:
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
