"""Bad input against the whole coordinator: each refusal is its documented gRPC status, the
coordinator serves on, and the round ends with the global model it started from.

Each test runs the real `Coordinator` (store, model store, service, GrpcGrid, fedge's
ServerApp on digits) in this process on 127.0.0.1, with one raw-protocol device that
takes the round's task and then misbehaves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from coordinator_harness import PulledTask, RawDevice, reply_bytes, status_of

from fedge.server.coordinator import Coordinator, CoordinatorOptions
from fedge.server.store import RoundStatus, RunStatus
from fedge.v1 import coordinator_pb2 as pb

ROUND_TIMEOUT = 1.5
CAP = 256 << 10


@dataclass
class Running:
    coordinator: Coordinator
    device: RawDevice
    task: PulledTask
    initial_version: str
    lines: list[str]
    runner: asyncio.Task


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    lines: list[str] = []
    opts = CoordinatorOptions(
        state_dir=tmp_path / "state",
        port=0,
        insecure=True,
        run_config={
            "task": "digits",
            "codec": "int8",
            "num-rounds": 1,
            "min-train-nodes": 1,
            "round-timeout": ROUND_TIMEOUT,
        },
        min_devices=1,
        max_result_bytes=CAP,
        heartbeat_interval_s=1.0,
        grace_s=0.5,
        keep_serving=True,  # so a result can still arrive after the run's last round
    )
    coordinator = await Coordinator.start(opts, out=lines.append)
    port = coordinator.port
    initial = coordinator.model_version
    runner = asyncio.create_task(coordinator.run())
    device = RawDevice(f"127.0.0.1:{port}", "mallory")
    await device.join()
    task = await device.pull(30)
    assert task is not None and task.envelope.round == 1
    yield Running(coordinator, device, task, initial, lines, runner)
    coordinator.request_stop()
    await asyncio.wait_for(runner, 30)
    await device.close()


async def _run_finished(r: Running) -> None:
    store = r.coordinator.store
    for _ in range(300):
        if store.get_run(r.coordinator.run_id).status == RunStatus.COMPLETED:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the run did not finish")


async def _serving_on_and_model_unchanged(r: Running) -> None:
    """A normal call still works; the round ends (timeout) with the model it started from."""
    assert (await r.device.heartbeat()).heartbeat_interval_s == 1.0
    header, _, _ = await r.device.fetch_model()
    assert header.version == r.initial_version
    await _run_finished(r)
    assert not r.runner.done()  # serving on
    assert (await r.device.heartbeat()).heartbeat_interval_s == 1.0
    store = r.coordinator.store
    (rnd,) = store.list_rounds(r.coordinator.run_id)
    assert rnd.status == RoundStatus.COMPLETED
    assert rnd.model_version == r.initial_version
    assert rnd.metrics.accepted == 0 and rnd.contributors == []
    assert rnd.dropped == [r.device.device_id]


async def _push_status(r: Running, payload: bytes, **kw) -> grpc.StatusCode:
    return await status_of(r.device.push(r.task.envelope, payload, **kw))


async def test_unknown_task_id_is_not_found(running: Running) -> None:
    payload = reply_bytes(running.task.payload)
    for task_id in ("0" * 32, "not-even-hex", ""):
        env = pb.TaskEnvelope(task_id=task_id, run_id=running.task.envelope.run_id, round=1)
        assert await status_of(running.device.push(env, payload)) == grpc.StatusCode.NOT_FOUND
        code = await status_of(running.device.upload_offset(task_id))
        assert code == grpc.StatusCode.NOT_FOUND
    await _serving_on_and_model_unchanged(running)


async def test_wrong_run_is_invalid_argument(running: Running) -> None:
    payload = reply_bytes(running.task.payload)
    env = running.task.envelope
    for header in (
        running.device.header(env, payload, run_id=env.run_id ^ 1),
        running.device.header(env, payload, round=env.round + 1),
    ):
        code = await _push_status(running, payload, header=header)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    await _serving_on_and_model_unchanged(running)


async def test_result_for_a_closed_round_is_failed_precondition(running: Running) -> None:
    payload = reply_bytes(running.task.payload)
    await _run_finished(running)  # the round timed out, closed and completed
    assert await _push_status(running, payload) == grpc.StatusCode.FAILED_PRECONDITION
    code = await status_of(running.device.upload_offset(running.task.envelope.task_id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    await _serving_on_and_model_unchanged(running)


async def test_truncated_stream_is_aborted_and_keeps_the_bytes(running: Running) -> None:
    payload = reply_bytes(running.task.payload, values=bytes(100_000))
    code = await _push_status(running, payload, stop=len(payload) // 2, chunk_size=10_000)
    assert code == grpc.StatusCode.ABORTED
    held = await running.device.upload_offset(running.task.envelope.task_id)
    assert held.offset == len(payload) // 2 and not held.complete
    await _serving_on_and_model_unchanged(running)


async def test_out_of_order_chunk_is_out_of_range(running: Running) -> None:
    payload = reply_bytes(running.task.payload, values=bytes(50_000))
    chunks = [
        pb.ResultChunk(data=pb.Chunk(offset=0, data=payload[:1000])),
        pb.ResultChunk(data=pb.Chunk(offset=2000, data=payload[2000:3000])),  # a gap
    ]
    code = await _push_status(running, payload, chunks=chunks)
    assert code == grpc.StatusCode.OUT_OF_RANGE
    held = await running.device.upload_offset(running.task.envelope.task_id)
    assert held.offset == 1000  # what came in order is kept
    overlap = [pb.ResultChunk(data=pb.Chunk(offset=500, data=payload[500:1500]))]
    header = running.device.header(running.task.envelope, payload, offset=1000)
    code = await _push_status(running, payload, header=header, chunks=overlap)
    assert code == grpc.StatusCode.OUT_OF_RANGE
    await _serving_on_and_model_unchanged(running)


async def test_total_size_over_the_cap_is_resource_exhausted(running: Running) -> None:
    payload = reply_bytes(running.task.payload, values=bytes(CAP + 1))
    assert await _push_status(running, payload) == grpc.StatusCode.RESOURCE_EXHAUSTED
    held = await running.device.upload_offset(running.task.envelope.task_id)
    assert held.offset == 0
    await _serving_on_and_model_unchanged(running)
