"""`ResultIntake` on its own (real SQLite, Fleet and Grid; no gRPC): each check refuses with
its reason, in order, and what it refuses is never counted.

The same refusals as seen through the servicer (status codes, resumption) are in
tests/test_coordinator_service.py and tests/test_trust_e2e.py.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from coordinator_harness import ServiceHarness, reply_bytes

from fedge.common import flower_compat as fc
from fedge.common.chunking import sha256_hex
from fedge.server.coordinator_service import STATUS_BY_REFUSAL
from fedge.server.fleet import DeviceEntry, TaskPayload
from fedge.server.result_intake import RefusalReason, ResultIntake, ResultRefused
from fedge.server.store import ResultStatus
from fedge.server.uploads import Upload, open_upload


class Bench:
    """One device with one live train task, and an intake over the harness's state."""

    def __init__(self, tmp: Path) -> None:
        self.h = ServiceHarness(tmp)
        device = self.h.store.register_device("dev", device_id="dev")
        self.entry: DeviceEntry = self.h.fleet.join(device.id, device.node_id, "dev")
        (self.task_id,) = self.h.grid.push_messages([self.h.train_message(device.node_id)])
        task = self.h.fleet.task(self.task_id)
        assert task is not None
        self.task: TaskPayload = task
        self.task_bytes = b"".join(task.parts)
        self.intake = ResultIntake(self.h.store, self.h.fleet)
        (tmp / "uploads").mkdir(exist_ok=True)
        self.path = tmp / "uploads" / f"{self.task_id}.part"

    def upload(self, payload: bytes, *, announced: str | None = None) -> Upload:
        sha = announced or sha256_hex(payload)
        self.h.store.begin_result(self.task_id, total_size=len(payload), sha256=sha,
                                  path=str(self.path))
        upload = open_upload(self.path, len(payload), sha, max_total=1 << 20, held=0,
                             in_memory=True)
        upload.add(0, payload)
        return upload

    def take(self, payload: bytes, *, announced: str | None = None) -> str:
        return self.intake.take(self.upload(payload, announced=announced), self.entry,
                                self.task, signature=b"", payload_sha256=sha256_hex(payload))


@pytest.fixture
def bench(tmp_path: Path):
    b = Bench(tmp_path)
    yield b
    b.h.grid.stop()
    b.h.store.close()


def test_every_refusal_has_a_status() -> None:
    assert set(STATUS_BY_REFUSAL) == set(typing.get_args(RefusalReason))


def test_admit_refuses_a_foreign_or_mismatched_header(bench: Bench) -> None:
    task = bench.task
    other = bench.h.fleet.join("intruder", 999, "intruder")
    for entry, task_id, run_id, rnd, known, reason in (
        (other, task.task_id, task.run_id, task.round, True, "unknown_task"),
        (bench.entry, "f" * 32, task.run_id, task.round, True, "unknown_task"),
        (bench.entry, task.task_id, task.run_id, task.round + 1, True, "wrong_task"),
        (bench.entry, task.task_id, task.run_id, task.round, False, "wrong_task"),
    ):
        with pytest.raises(ResultRefused) as refused:
            bench.intake.admit(entry, task_id, run_id=run_id, round=rnd, known_format=known)
        assert refused.value.reason == reason
    assert bench.intake.admit(bench.entry, task.task_id, run_id=task.run_id, round=task.round,
                              known_format=True) is task


def test_a_hash_mismatch_is_resent_from_zero_and_not_final(bench: Bench) -> None:
    payload = reply_bytes(bench.task_bytes)
    with pytest.raises(ResultRefused) as refused:
        bench.take(payload, announced=sha256_hex(b"other bytes"))
    assert refused.value.reason == "hash_mismatch" and "offset 0" in refused.value.detail
    result = bench.h.store.get_result(bench.task_id)
    assert result.status != ResultStatus.REJECTED and result.bytes_received == 0
    assert bench.h.fleet.task(bench.task_id) is not None  # the device may send it again
    assert bench.intake.first_device_error is None


def test_a_reply_to_another_node_is_refused_for_good_and_noted(bench: Bench) -> None:
    payload = reply_bytes(bench.task_bytes, src_node_id=bench.entry.node_id + 1)
    with pytest.raises(ResultRefused) as refused:
        bench.take(payload)
    assert refused.value.reason == "invalid_reply" and "wrong_node" in refused.value.detail
    result = bench.h.store.get_result(bench.task_id)
    assert result.status == ResultStatus.REJECTED and result.reason.startswith("wrong_node")
    assert bench.h.fleet.task(bench.task_id) is None  # the round goes on without it
    assert bench.intake.first_device_error == (
        "device dev (dev): result rejected: wrong_node: src_node_id is not this device's node id"
    )


def test_an_error_reply_is_counted_and_its_error_noted_once(bench: Bench) -> None:
    reply = fc.error_reply(fc.message_from_bytes(bench.task_bytes), "KeyError:\n 'x'")
    assert bench.take(fc.message_to_bytes(reply)) == "accepted"
    assert bench.h.store.get_result(bench.task_id).status == ResultStatus.COMPLETE
    assert bench.intake.first_device_error == "device dev (dev): KeyError: 'x'"
