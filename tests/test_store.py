"""The coordinator's SQLite store: WAL, migrations, idempotent results, atomic rounds."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from fedge.server.round_metrics import RoundMetrics
from fedge.server.store import (
    SCHEMA_VERSION,
    DeviceStatus,
    ResultStatus,
    RoundStatus,
    RunStatus,
    Store,
    StoreError,
    TaskState,
)
from fedge.server.store import schema as store_schema

V0 = "0" * 64
V1 = "1" * 64
V2 = "2" * 64
SHA = "a" * 64
BIG_RUN = (1 << 64) - 5  # Flower run ids are unsigned 64-bit


@pytest.fixture
def db(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "state" / "fedge.db")
    yield s
    s.close()


def _run_with_task(db: Store, task_id: str = "t1", run_id: int = 7) -> str:
    dev = db.register_device("pi-1")
    if db.get_run(run_id) is None:
        db.create_run(run_id, {"rounds": 3}, model_version=V0)
        db.open_round(run_id, 1)
    db.add_task(task_id, run_id=run_id, round=1, device_id=dev.id, message_type="train")
    return dev.id


def test_wal_mode_and_sync_level(db: Store, tmp_path: Path) -> None:
    assert db.pragma("journal_mode") == "wal"
    assert db.pragma("synchronous") == 1  # NORMAL
    assert db.pragma("foreign_keys") == 1
    # WAL is a property of the file: a fresh connection sees it too
    raw = sqlite3.connect(db.path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()


def test_migrates_from_version_zero(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    sqlite3.connect(path).close()  # an empty file at user_version 0
    with Store.open(path) as s:
        assert s.schema_version == SCHEMA_VERSION >= 1
    raw = sqlite3.connect(path)
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    raw.close()
    assert {"devices", "runs", "rounds", "models", "tasks", "results"} <= tables
    with Store.open(path) as s:  # reopening applies nothing and keeps the version
        assert s.schema_version == SCHEMA_VERSION


def test_later_migration_applies_and_keeps_data(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "s.db"
    with Store.open(path) as s:
        s.register_device("keep-me")
    monkeypatch.setattr(
        store_schema,
        "MIGRATIONS",
        [*store_schema.MIGRATIONS, ("ALTER TABLE devices ADD COLUMN label TEXT",)],
    )
    with Store.open(path) as s:
        assert s.schema_version == SCHEMA_VERSION + 1
        assert [d.name for d in s.list_devices()] == ["keep-me"]


def test_failed_migration_changes_nothing(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "s.db"
    Store.open(path).close()
    monkeypatch.setattr(
        store_schema,
        "MIGRATIONS",
        [*store_schema.MIGRATIONS, ("CREATE TABLE half_done (x)", "THIS IS NOT SQL")],
    )
    with pytest.raises(sqlite3.OperationalError):
        Store.open(path)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert (
        raw.execute("SELECT count(*) FROM sqlite_master WHERE name='half_done'").fetchone()[0] == 0
    )
    raw.close()


def test_refuses_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version={SCHEMA_VERSION + 5}")
    raw.close()
    with pytest.raises(StoreError) as e:
        Store.open(path)
    assert e.value.reason == "schema_too_new"


def test_devices_register_refresh_and_revoke(db: Store) -> None:
    a = db.register_device("pi-a", capabilities={"torch_threads": 2}, num_examples=120)
    b = db.register_device("pi-b")
    assert a.id != b.id and a.node_id != b.node_id and a.node_id > 1
    assert a.status == DeviceStatus.ACTIVE and a.cert_fingerprint is None
    db.set_device_status(a.id, DeviceStatus.REVOKED)
    again = db.register_device("pi-a2", device_id=a.id, num_examples=99)
    assert (again.node_id, again.status, again.name) == (a.node_id, DeviceStatus.REVOKED, "pi-a2")
    assert db.get_device_by_node(a.node_id).id == a.id
    db.touch_devices([a.id, b.id], when=12345.0)
    assert db.get_device(b.id).last_seen == 12345.0
    assert db.get_device_by_fingerprint("ff" * 32) is None  # no certificate bound yet
    assert [d.id for d in db.list_devices(DeviceStatus.ACTIVE)] == [b.id]
    with pytest.raises(StoreError):
        db.set_device_status("nobody", DeviceStatus.REVOKED)


def test_big_unsigned_run_ids_roundtrip(db: Store) -> None:
    run = db.create_run(BIG_RUN, {"lr": 0.1}, model_version=V0)
    assert run.id == BIG_RUN and run.config == {"lr": 0.1}
    assert db.get_run(BIG_RUN).status == RunStatus.RUNNING
    assert db.latest_run().id == BIG_RUN
    with pytest.raises(StoreError):
        db.create_run(BIG_RUN, {})
    with pytest.raises(StoreError):
        db.get_run(1 << 64)


def test_result_pushed_twice_counts_once(db: Store) -> None:
    _run_with_task(db)
    r = db.begin_result("t1", total_size=100, sha256=SHA, path="/x/t1.part")
    assert (r.status, r.bytes_received, r.run_id, r.round) == (ResultStatus.PARTIAL, 0, 7, 1)
    db.record_progress("t1", 100)
    assert db.complete_result("t1") is True
    # the device did not see the reply and pushes again
    again = db.begin_result("t1", total_size=100, sha256=SHA, path="/x/t1.part")
    assert again.status == ResultStatus.COMPLETE
    assert db.complete_result("t1") is False
    assert len(db.list_results(7, 1, ResultStatus.COMPLETE)) == 1
    assert db.get_task("t1").state == TaskState.DONE


def test_partial_upload_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "fedge.db"
    with Store.open(path) as s:
        _run_with_task(s)
        s.begin_result("t1", total_size=3000, sha256=SHA, path="/up/t1.part")
        s.record_progress("t1", 2048)
    with Store.open(path) as s:
        r = s.begin_result("t1", total_size=3000, sha256=SHA, path="/up/t1.part")
        assert (r.bytes_received, r.path, r.status) == (2048, "/up/t1.part", ResultStatus.PARTIAL)
        # a different payload for the same task starts over at 0
        r = s.begin_result("t1", total_size=3001, sha256="b" * 64, path="/up/t1.part")
        assert (r.bytes_received, r.total_size) == (0, 3001)
        s.record_progress("t1", 9999)  # beyond the total: ignored
        assert s.get_result("t1").bytes_received == 0


def test_result_for_unknown_task_and_rejection(db: Store) -> None:
    with pytest.raises(StoreError) as e:
        db.begin_result("nope", total_size=1, sha256=SHA, path="p")
    assert e.value.reason == "not_found"
    _run_with_task(db)
    db.begin_result("t1", total_size=10, sha256=SHA, path="p")
    db.reject_result("t1", "hash_mismatch")
    assert db.complete_result("t1") is False
    r = db.get_result("t1")
    assert (r.status, r.reason) == (ResultStatus.REJECTED, "hash_mismatch")
    assert db.get_task("t1").state == TaskState.FAILED


def test_closing_a_round_expires_pending_tasks(db: Store) -> None:
    dev = _run_with_task(db, "t1")
    db.add_task("t2", run_id=7, round=1, device_id=dev, message_type="train")
    db.begin_result("t1", total_size=1, sha256=SHA, path="p")
    db.complete_result("t1")
    assert db.set_task_state("t2", TaskState.DELIVERED, only_from=[TaskState.QUEUED])
    assert not db.set_task_state("t2", TaskState.DELIVERED, only_from=[TaskState.QUEUED])
    assert db.close_round(7, 1) is True
    assert db.close_round(7, 1) is False
    assert db.get_round(7, 1).status == RoundStatus.CLOSED
    assert db.get_task("t1").state == TaskState.DONE
    assert db.get_task("t2").state == TaskState.EXPIRED


def test_complete_round_commits_model_and_run_together(db: Store) -> None:
    _run_with_task(db)
    metrics = RoundMetrics(
        round=1,
        accuracy=0.9,
        loss=0.3,
        uplink_bytes=1000,
        downlink_bytes=4000,
        rejected=1,
        rejected_reasons={"non_finite": 1},
        seconds=2.5,
        accepted=2,
    )
    db.close_round(7, 1)
    assert db.get_round(7, 1).metrics == RoundMetrics(round=1)  # nothing yet
    rnd = db.complete_round(
        7, 1, model_version=V1, metrics=metrics, contributors=["d1", "d2"], dropped=["d4"]
    )
    assert rnd.status == RoundStatus.COMPLETED and rnd.ended is not None
    stored = db.get_round(7, 1)
    assert stored.metrics == metrics
    assert (stored.contributors, stored.dropped) == (["d1", "d2"], ["d4"])
    run = db.get_run(7)
    assert (run.current_round, run.model_version) == (1, V1)
    model = db.get_model(V1)
    assert (model.run_id, model.round, model.parent_version) == (7, 1, V0)
    with pytest.raises(StoreError) as e:
        db.complete_round(7, 1, model_version=V2, metrics=metrics)
    assert e.value.reason == "completed"
    with pytest.raises(StoreError):
        db.open_round(7, 1)
    assert db.get_run(7).model_version == V1
    # durable commits restore the connection's normal sync level afterwards
    assert db.pragma("synchronous") == 1


def test_failed_round_commit_leaves_no_trace(db: Store) -> None:
    _run_with_task(db)

    class Boom(RoundMetrics):
        def to_dict(self) -> dict:
            raise RuntimeError("metrics could not be serialised")

    with pytest.raises(RuntimeError):
        db.complete_round(7, 1, model_version=V1, metrics=Boom(round=1))
    assert db.get_round(7, 1).status == RoundStatus.OPEN
    assert db.get_run(7).model_version == V0 and db.get_model(V1) is None


def test_restarted_round_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "fedge.db"
    with Store.open(path) as s:
        _run_with_task(s)
        s.complete_round(7, 1, model_version=V1, metrics=RoundMetrics(round=1, accuracy=0.5))
        s.open_round(7, 2)
        dev = s.list_devices()[0].id
        s.add_task("t2", run_id=7, round=2, device_id=dev, message_type="train")
    # the coordinator died in round 2; it resumes from the last completed round
    with Store.open(path) as s:
        run = s.latest_run()
        assert (run.current_round, run.model_version) == (1, V1)
        rnd = s.open_round(7, run.current_round + 1)
        assert rnd.status == RoundStatus.OPEN
        assert s.get_task("t2").state == TaskState.EXPIRED
        assert [r.round for r in s.list_rounds(7)] == [1, 2]
        assert s.get_round(7, 1).metrics.accuracy == 0.5


def test_threads_share_the_store(db: Store) -> None:
    ids: list[str] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        for i in range(25):
            d = db.register_device(f"dev-{n}-{i}")
            db.touch_devices([d.id])
            with lock:
                ids.append(d.id)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(db.list_devices()) == 200 == len(set(ids))


KILL_CHILD = r"""
import os, signal, sys
from fedge.server.round_metrics import RoundMetrics
from fedge.server.store import Store
s = Store.open(sys.argv[1])
dev = s.register_device("pi")
s.create_run(7, {}, model_version="0" * 64)
s.open_round(7, 1)
s.complete_round(7, 1, model_version="1" * 64, metrics=RoundMetrics(round=1, accuracy=0.75))
s.open_round(7, 2)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_committed_round_survives_kill_9(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "fedge.db"
    proc = subprocess.run([sys.executable, "-c", KILL_CHILD, str(path)], timeout=60)
    assert proc.returncode == -9
    with Store.open(path) as s:
        run = s.get_run(7)
        assert (run.current_round, run.model_version) == (1, V1)
        assert s.get_round(7, 1).metrics.accuracy == 0.75
        assert s.get_round(7, 2).status == RoundStatus.OPEN
