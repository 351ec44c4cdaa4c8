"""The coordinator's gRPC service on real loopback gRPC: sessions, tasks, uploads, models."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from coordinator_harness import RUN_ID, RawDevice, ServiceHarness, reply_bytes, status_of

from fedge.common.chunking import MAX_CHUNK_SIZE, sha256_hex
from fedge.common.snapshot import arrays_to_snapshot
from fedge.server.coordinator_service import ServiceSettings
from fedge.server.store import ResultStatus, TaskState
from fedge.v1 import coordinator_pb2 as pb

GRPC_DEFAULT_LIMIT = 4 << 20


@pytest.fixture
async def harness(tmp_path: Path):
    h = ServiceHarness(tmp_path)
    await h.start()
    yield h
    await h.stop()


async def _device(h: ServiceHarness, name: str = "dev") -> RawDevice:
    dev = RawDevice(h.target, name)
    await dev.join()
    return dev


async def test_join_keeps_identity_and_replaces_the_session(harness: ServiceHarness) -> None:
    dev = await _device(harness)
    first = (dev.device_id, dev.node_id, dev.token)
    reply = await dev.join()
    assert (reply.device_id, reply.node_id) == first[:2]
    assert reply.session_token != first[2]
    assert reply.model_version == harness.model_version
    assert reply.chunk_size == 1 << 20 and reply.protocol_version == 1
    stale = RawDevice(harness.target)
    stale.token = first[2]
    assert await status_of(stale.heartbeat()) == grpc.StatusCode.UNAUTHENTICATED
    assert (await dev.heartbeat()).heartbeat_interval_s == 5.0
    assert harness.store.get_device(dev.device_id).name == "dev"
    for d in (dev, stale):
        await d.close()


async def test_every_call_needs_a_session(harness: ServiceHarness) -> None:
    dev = RawDevice(harness.target)
    dev.token = "forged"
    env = pb.TaskEnvelope(task_id="0" * 32, run_id=RUN_ID, round=1)
    for call in (
        dev.heartbeat(),
        dev.pull(0.1),
        dev.push(env, b"x"),
        dev.upload_offset("0" * 32),
        dev.fetch_model(),
    ):
        assert await status_of(call) == grpc.StatusCode.UNAUTHENTICATED
    assert await status_of(dev.stub.Join(pb.JoinRequest(device_id="../etc"))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    await dev.close()


async def test_long_poll_answers_empty_then_wakes_for_a_task(harness: ServiceHarness) -> None:
    dev = await _device(harness)
    t0 = time.monotonic()
    assert await dev.pull(0.3) is None
    assert 0.25 < time.monotonic() - t0 < 3
    assert dev.node_id in harness.grid.get_node_ids()
    poll = asyncio.ensure_future(dev.pull(10))
    await asyncio.sleep(0.3)
    ids = list(harness.grid.push_messages([harness.train_message(dev.node_id)]))
    task = await asyncio.wait_for(poll, 5)
    assert task is not None and task.envelope.task_id == ids[0]
    env = task.envelope
    assert (env.run_id, env.round, env.message_type) == (RUN_ID, 1, "train")
    assert env.sha256 == sha256_hex(task.payload) and env.total_size == len(task.payload)
    assert env.base_model_version == harness.model_version
    assert env.run_config_json == '{"seed": 1, "task": "test"}'
    assert 0 < env.timeout_s <= 30
    assert harness.store.get_task(ids[0]).state == TaskState.DELIVERED
    await dev.close()


async def test_round_trip_counts_a_result_once(harness: ServiceHarness) -> None:
    devs = [await _device(harness, f"d{i}") for i in range(2)]
    ids, replies = await harness.send_and_receive(
        [harness.train_message(d.node_id) for d in devs], timeout=10
    )
    for dev in devs:
        task = await dev.pull()
        payload = reply_bytes(task.payload)
        ack = await dev.push(task.envelope, payload)
        assert ack.accepted and not ack.duplicate and ack.offset == len(payload)
        again = await dev.push(task.envelope, payload)
        assert again.accepted and again.duplicate
    got = await asyncio.wait_for(replies, 10)
    assert sorted(m.metadata.reply_to_message_id for m in got) == sorted(ids)
    assert {m.metadata.src_node_id for m in got} == {d.node_id for d in devs}
    assert got[0].content["arrays"]["w"].numpy().tolist() == [1, 2, 3]
    for task_id in ids:
        assert harness.store.get_result(task_id).status == ResultStatus.COMPLETE
        assert harness.store.get_task(task_id).state == TaskState.DONE
    for _ in range(100):  # consumed results leave no file behind (deleted in the background)
        if not list((harness.tmp / "uploads").iterdir()):
            break
        await asyncio.sleep(0.02)
    assert not list((harness.tmp / "uploads").iterdir())
    for d in devs:
        await d.close()


async def test_interrupted_upload_resumes_at_the_held_offset(harness: ServiceHarness) -> None:
    dev = await _device(harness)
    ids, replies = await harness.send_and_receive(
        [harness.train_message(dev.node_id)], timeout=20
    )
    task = await dev.pull()
    payload = reply_bytes(task.payload, values=bytes(range(256)) * 2000)  # ~0.5 MB
    half = len(payload) // 2
    # a stream that ends cleanly before total_size: ABORTED, the bytes are kept
    status = await status_of(dev.push(task.envelope, payload, stop=half, chunk_size=50_000))
    assert status == grpc.StatusCode.ABORTED
    held = await dev.upload_offset(ids[0])
    assert held.offset == half and held.total_size == len(payload) and not held.complete
    # resuming from anywhere else is refused without losing what is held
    status = await status_of(dev.push(task.envelope, payload, start=10))
    assert status == grpc.StatusCode.OUT_OF_RANGE
    assert (await dev.upload_offset(ids[0])).offset == half
    ack = await dev.push(task.envelope, payload, start=half, chunk_size=50_000)
    assert ack.accepted and ack.offset == len(payload)
    assert (await dev.upload_offset(ids[0])).complete
    assert len(await asyncio.wait_for(replies, 10)) == 1
    await dev.close()


async def test_a_dropped_stream_keeps_what_arrived(harness: ServiceHarness) -> None:
    dev = await _device(harness)
    ids, replies = await harness.send_and_receive(
        [harness.train_message(dev.node_id)], timeout=20
    )
    task = await dev.pull()
    payload = reply_bytes(task.payload, values=bytes(300_000))
    sent = asyncio.Event()

    async def stream():
        yield dev.header(task.envelope, payload)
        yield pb.ResultChunk(data=pb.Chunk(offset=0, data=payload[:100_000]))
        sent.set()
        await asyncio.sleep(30)

    call = dev.stub.PushResult(stream())
    await sent.wait()
    for _ in range(100):  # the chunk reaches the coordinator, then the device vanishes
        if harness.service._uploading:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    call.cancel()
    for _ in range(100):
        if not harness.service._uploading:
            break
        await asyncio.sleep(0.02)
    assert (await dev.upload_offset(ids[0])).offset == 100_000
    ack = await dev.push(task.envelope, payload, start=100_000)
    assert ack.accepted
    assert len(await asyncio.wait_for(replies, 10)) == 1
    await dev.close()


async def test_hash_mismatch_discards_the_upload(harness: ServiceHarness) -> None:
    dev = await _device(harness)
    ids, _ = await harness.send_and_receive([harness.train_message(dev.node_id)], timeout=20)
    task = await dev.pull()
    payload = reply_bytes(task.payload)
    header = dev.header(task.envelope, payload, sha256=sha256_hex(b"something else"))
    status = await status_of(dev.push(task.envelope, payload, header=header))
    assert status == grpc.StatusCode.DATA_LOSS
    assert (await dev.upload_offset(ids[0])).offset == 0
    assert (await dev.push(task.envelope, payload)).accepted
    await dev.close()


async def test_a_payload_that_is_not_a_reply_is_rejected_for_good(harness: ServiceHarness) -> None:
    dev = await _device(harness)
    ids, replies = await harness.send_and_receive(
        [harness.train_message(dev.node_id)], timeout=3
    )
    task = await dev.pull()
    status = await status_of(dev.push(task.envelope, b"\xff not protobuf \x00" * 10))
    assert status == grpc.StatusCode.INVALID_ARGUMENT
    result = harness.store.get_result(ids[0])
    assert result.status == ResultStatus.REJECTED and result.reason.startswith("malformed")
    good = reply_bytes(task.payload)
    assert await status_of(dev.push(task.envelope, good)) == grpc.StatusCode.FAILED_PRECONDITION
    assert await status_of(dev.upload_offset(ids[0])) == grpc.StatusCode.FAILED_PRECONDITION
    assert await asyncio.wait_for(replies, 10) == []  # the round never sees it
    await dev.close()


async def test_a_reply_from_another_node_is_rejected(harness: ServiceHarness) -> None:
    dev = await _device(harness)
    await harness.send_and_receive([harness.train_message(dev.node_id)], timeout=3)
    task = await dev.pull()
    forged = reply_bytes(task.payload, src_node_id=dev.node_id + 1)
    assert await status_of(dev.push(task.envelope, forged)) == grpc.StatusCode.INVALID_ARGUMENT
    await dev.close()


async def test_another_devices_task_is_not_found(harness: ServiceHarness) -> None:
    a, b = await _device(harness, "a"), await _device(harness, "b")
    ids, _ = await harness.send_and_receive([harness.train_message(a.node_id)], timeout=5)
    task = await a.pull()
    payload = reply_bytes(task.payload)
    assert await status_of(b.push(task.envelope, payload)) == grpc.StatusCode.NOT_FOUND
    assert await status_of(b.upload_offset(ids[0])) == grpc.StatusCode.NOT_FOUND
    assert await status_of(b.pull(task_id=ids[0])) == grpc.StatusCode.NOT_FOUND
    assert (await a.push(task.envelope, payload)).accepted
    await a.close()
    await b.close()


async def test_download_resumes_from_an_offset_and_lost_tasks_are_offered_again(
    harness: ServiceHarness,
) -> None:
    dev = await _device(harness)
    harness.grid.push_messages([harness.train_message(dev.node_id, payload=bytes(100_000))])
    whole = await dev.pull()
    again = await dev.pull(0.1)  # no result yet: the device lost it, so it comes again
    assert again.envelope.task_id == whole.envelope.task_id and again.payload == whole.payload
    tail = await dev.pull(task_id=whole.envelope.task_id, offset=60_000, max_chunk=16_384)
    assert tail.envelope.offset == 60_000 and tail.payload == whole.payload[60_000:]
    assert tail.chunks == -(-(len(whole.payload) - 60_000) // 16_384)
    status = await status_of(dev.pull(task_id=whole.envelope.task_id, offset=10**9))
    assert status == grpc.StatusCode.OUT_OF_RANGE
    await dev.close()


async def test_heartbeat_tells_of_waiting_and_cancelled_tasks(tmp_path: Path) -> None:
    h = ServiceHarness(tmp_path, heartbeat_interval_s=0.5)
    await h.start()
    dev = await _device(h)
    assert not (await dev.heartbeat()).task_available
    ids, replies = await h.send_and_receive([h.train_message(dev.node_id)], timeout=1.0)
    assert (await dev.heartbeat()).task_available
    task = await dev.pull()
    assert not (await dev.heartbeat(ids[0])).task_cancelled
    assert await asyncio.wait_for(replies, 10) == []  # timed out: left out of the round
    assert (await dev.heartbeat(ids[0])).task_cancelled
    assert h.store.get_task(ids[0]).state == TaskState.EXPIRED
    status = await status_of(dev.push(task.envelope, reply_bytes(task.payload)))
    assert status == grpc.StatusCode.FAILED_PRECONDITION
    await asyncio.sleep(1.6)  # three heartbeat intervals of silence: not live any more
    assert h.grid.get_node_ids() == []
    await dev.heartbeat()
    assert h.grid.get_node_ids() == [dev.node_id]
    await dev.close()
    await h.stop()


async def test_fetch_model_whole_resumed_and_not_modified(harness: ServiceHarness) -> None:
    dev = await _device(harness)
    header, data, _ = await dev.fetch_model()
    assert header.version == harness.model_version == sha256_hex(data)
    assert header.total_size == len(data) and header.payload_format == "fedge.v1.ModelSnapshot"
    header, tail, _ = await dev.fetch_model(offset=10)
    assert header.offset == 10 and tail == data[10:]
    header, rest, _ = await dev.fetch_model(if_none_match=harness.model_version)
    assert header.not_modified and rest == b""
    assert await status_of(dev.fetch_model(version="ab" * 32)) == grpc.StatusCode.NOT_FOUND
    assert await status_of(dev.fetch_model(version="../x")) == grpc.StatusCode.INVALID_ARGUMENT
    await dev.close()


async def test_fifty_megabytes_cross_in_chunks_under_grpcs_default_limit(tmp_path: Path) -> None:
    """Task down, result up and model down: 50 MB each, no message near 4 MiB."""
    big = np.random.default_rng(0).integers(0, 255, 50_000_000, dtype=np.uint8).tobytes()
    h = ServiceHarness(
        tmp_path,
        settings=ServiceSettings(chunk_size=MAX_CHUNK_SIZE, max_result_bytes=64 << 20),
        model_bytes=big,  # FetchModel streams stored bytes as they are
    )
    await h.start()
    dev = await _device(h)  # default channel options: 4 MiB receive limit on both ends
    ids, replies = await h.send_and_receive(
        [h.train_message(dev.node_id, payload=big)], timeout=60
    )
    task = await dev.pull()
    assert task.envelope.total_size > 50_000_000 and task.chunks >= 24
    payload = reply_bytes(task.payload, values=b"echo")  # the 50 MB array goes back up
    ack = await dev.push(task.envelope, payload, chunk_size=MAX_CHUNK_SIZE)
    assert ack.accepted and ack.offset == len(payload) > 50_000_000
    (reply,) = await asyncio.wait_for(replies, 60)
    assert reply.content["arrays"]["w"].numpy().tobytes() == big
    header, model, chunks = await dev.fetch_model()
    assert header.total_size >= 50_000_000 and chunks >= 24 and sha256_hex(model) == header.version
    assert max(MAX_CHUNK_SIZE, h.service.settings.chunk_size) < GRPC_DEFAULT_LIMIT
    del ids
    await dev.close()
    await h.stop()


def test_snapshot_helper_is_deterministic() -> None:
    a = arrays_to_snapshot({"w": np.ones(3, np.float32)}).SerializeToString(deterministic=True)
    b = arrays_to_snapshot({"w": np.ones(3, np.float32)}).SerializeToString(deterministic=True)
    assert a == b
