"""`GrpcGrid`: Flower's Grid contract over per-device queues, rounds, timeouts, late results."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from coordinator_harness import RUN_ID, RawDevice, ServiceHarness, reply_bytes
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedge.client.client_app import make_client_app
from fedge.client.compression_mod import compression_mod
from fedge.common import flower_compat as fc
from fedge.common.chunking import sha256_hex
from fedge.server.fleet import Fleet
from fedge.server.flower_compat import set_task_identity
from fedge.server.grpc_grid import GridStopped, GrpcGrid
from fedge.server.inprocess_grid import InProcessGrid, run_server_app_inprocess
from fedge.server.server_app import make_server_app
from fedge.server.store import RoundStatus, Store, TaskState


@pytest.fixture
def grid(tmp_path: Path):
    store = Store.open(tmp_path / "fedge.db")
    store.create_run(RUN_ID, {})
    fleet = Fleet(heartbeat_interval_s=1.0)
    g = GrpcGrid(store, fleet, run_id=RUN_ID, device_run_config={"task": "t"})
    yield g
    g.stop()
    store.close()


def _join(grid: GrpcGrid, n: int, **kw) -> list[int]:
    nodes = []
    for i in range(n):
        device = grid.store.register_device(f"d{i}")
        grid.fleet.join(device.id, device.node_id, device.name, **kw)
        nodes.append(device.node_id)
    return nodes


def _train(node_id: int, server_round: int = 1, content: RecordDict | None = None) -> Message:
    content = content or RecordDict({"config": ConfigRecord({"server-round": server_round})})
    return Message(content, node_id, "train")


_SENT: dict[str, bytes] = {}


def _push(grid: GrpcGrid, messages: list[Message]) -> list[str]:
    ids = list(grid.push_messages(messages))
    _SENT.update({t: b"".join(grid.fleet.task(t).parts) for t in ids})
    return ids


def _answer(grid: GrpcGrid, task_id: str, tmp: Path) -> str:
    """What the servicer does with a verified upload: store row, file, Fleet.complete."""
    payload = reply_bytes(_SENT[task_id])
    path = tmp / f"{task_id}.part"
    path.write_bytes(payload)
    grid.store.begin_result(task_id, total_size=len(payload), sha256=sha256_hex(payload),
                            path=str(path))
    return grid.fleet.complete(task_id, path, grid.store.complete_result)


def test_push_queues_tasks_and_skips_unknown_nodes(grid: GrpcGrid) -> None:
    (node,) = _join(grid, 1)
    ids = list(grid.push_messages([_train(node), _train(12345)]))
    assert len(ids) == 1
    task = grid.store.get_task(ids[0])
    assert (task.run_id, task.round, task.state, task.message_type) == (
        RUN_ID, 1, TaskState.QUEUED, "train")
    payload = grid.fleet.task(ids[0])
    msg = fc.message_from_bytes(b"".join(payload.parts))
    assert msg.metadata.message_id == ids[0] and msg.metadata.dst_node_id == node
    assert payload.sha256 == sha256_hex(b"".join(payload.parts))
    assert json.loads(payload.run_config_json) == {"task": "t"}
    assert grid.store.get_round(RUN_ID, 1).status == RoundStatus.OPEN
    with pytest.raises(ValueError, match="run"):
        set_task_identity(99)
        try:
            grid.push_messages([_train(node)])
        finally:
            set_task_identity(RUN_ID)


def test_a_new_round_closes_the_previous_one(grid: GrpcGrid) -> None:
    (node,) = _join(grid, 1)
    (first,) = grid.push_messages([_train(node, 1)])
    msg = Message(RecordDict(), node, "query", group_id="2")  # no config: group_id names it
    (second,) = grid.push_messages([msg])
    assert grid.store.get_task(second).round == 2
    assert grid.store.get_round(RUN_ID, 1).status == RoundStatus.CLOSED
    assert grid.store.get_task(first).state == TaskState.EXPIRED
    assert grid.fleet.task(first) is None and grid.fleet.task(second) is not None


def test_many_devices_share_one_copy_of_the_model(grid: GrpcGrid) -> None:
    nodes = _join(grid, 300)
    model = RecordDict({
        "arrays": ArrayRecord({"w": Array(np.ones(100_000, np.float32))}),
        "config": ConfigRecord({"server-round": 1}),
    })
    ids = list(grid.push_messages([_train(n, content=model) for n in nodes]))
    payloads = [grid.fleet.task(t) for t in ids]
    assert len({id(p.parts[0]) for p in payloads}) == 1  # one serialized model for 300 tasks
    assert len({p.sha256 for p in payloads}) == 300
    for p in payloads[:3]:
        msg = fc.message_from_bytes(b"".join(p.parts))
        assert msg.content["arrays"]["w"].numpy().sum() == 100_000
        assert p.sha256 == sha256_hex(b"".join(p.parts))


def test_send_and_receive_leaves_out_silent_devices(grid: GrpcGrid, tmp_path: Path) -> None:
    a, b = _join(grid, 2)
    ids = []
    orig = grid._push

    def push(messages, deadline):
        ids.extend(orig(messages, deadline))
        _SENT.update({t: b"".join(grid.fleet.task(t).parts) for t in ids})
        return ids

    grid._push = push  # type: ignore[method-assign]
    replies = grid.send_and_receive([_train(a), _train(b)], timeout=0.6)
    assert _answer(grid, ids[0], tmp_path) == "accepted"
    got: list[Message] = []
    done = threading.Event()

    def consume() -> None:
        got.extend(replies)
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    # the round ends at its 0.6 s timeout without b (the grid's default would be an hour);
    # the 60 s bound only keeps a broken grid from hanging the suite
    assert done.wait(60), "send_and_receive waited for the silent device"
    assert [m.metadata.src_node_id for m in got] == [a]
    assert grid.store.get_task(ids[1]).state == TaskState.EXPIRED
    assert _answer(grid, ids[1], tmp_path) == "closed"  # a late result is never counted
    assert grid.tasked_devices(1) == [grid.device_of_node(a), grid.device_of_node(b)]


def test_pull_messages_returns_each_reply_once(grid: GrpcGrid, tmp_path: Path) -> None:
    (node,) = _join(grid, 1)
    ids = _push(grid, [_train(node)])
    assert list(grid.pull_messages(ids)) == []
    _answer(grid, ids[0], tmp_path)
    (reply,) = grid.pull_messages(ids)
    assert reply.metadata.reply_to_message_id == ids[0]
    assert list(grid.pull_messages(ids)) == []


def test_end_round_expires_what_is_left(grid: GrpcGrid, tmp_path: Path) -> None:
    (node,) = _join(grid, 1)
    ids = _push(grid, [_train(node, 3)])
    grid.end_round(3)
    assert grid.store.get_round(RUN_ID, 3).status == RoundStatus.CLOSED
    assert grid.store.get_task(ids[0]).state == TaskState.EXPIRED
    assert _answer(grid, ids[0], tmp_path) == "closed"
    grid.end_round(3)  # idempotent


def test_node_ids_are_live_training_devices(grid: GrpcGrid) -> None:
    trainer, viewer = _join(grid, 1) + _join(grid, 1, inference_only=True)
    assert grid.get_node_ids() == [trainer]
    entry = grid.fleet.device_for_node(trainer)
    entry.last_seen -= 10  # silent for ten heartbeat intervals
    assert grid.get_node_ids() == []
    del viewer


def test_stop_ends_waiting_calls(grid: GrpcGrid) -> None:
    (node,) = _join(grid, 1)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            list(grid.send_and_receive([_train(node)], timeout=60))
        except GridStopped as e:
            errors.append(e)

    t = threading.Thread(target=wait)
    t.start()
    while not grid.fleet.live_tasks(RUN_ID, 1):  # until the call has pushed and waits
        time.sleep(0.01)
    assert not grid.stopped
    grid.stop()
    assert grid.stopped
    t.join(60)  # stop wakes it at once (the round's timeout is 60 s); this guards a hang
    assert not t.is_alive() and len(errors) == 1
    with pytest.raises(GridStopped):
        grid.wait_for_nodes(5)


async def _serve_device(dev: RawDevice, app, partition: int, parts: int, stop: asyncio.Event):
    """A minimal in-process edge device: pull, run the ClientApp, push; keeps its Context."""
    context = Context(run_id=RUN_ID, node_id=dev.node_id,
                      node_config={"partition-id": partition, "num-partitions": parts},
                      state=RecordDict(), run_config={})
    while not stop.is_set():
        task = await dev.pull(0.5)
        if task is None:
            continue
        msg = fc.message_from_bytes(task.payload)
        context.run_config = json.loads(task.envelope.run_config_json)
        reply = await asyncio.to_thread(app, msg, context)
        await dev.push(task.envelope, fc.message_to_bytes(reply))


async def test_fedge_server_app_on_the_grpc_grid_matches_the_inprocess_grid(
    tmp_path: Path,
) -> None:
    config = {"task": "digits", "codec": "int8", "num-rounds": 2, "min-train-nodes": 2}
    h = ServiceHarness(tmp_path)
    h.grid = GrpcGrid(h.store, h.fleet, run_id=RUN_ID, device_run_config=config)
    await h.start()
    stop = asyncio.Event()
    devs = [RawDevice(h.target, f"d{i}") for i in range(2)]
    workers = []
    for i, dev in enumerate(devs):
        await dev.join()
        app = make_client_app(mods=[compression_mod])
        workers.append(asyncio.create_task(_serve_device(dev, app, i, 2, stop)))
    rounds: list = []
    ends: list = []
    app = make_server_app(listeners=[rounds.append], on_round_end=[ends.append])
    ctx = Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(),
                  run_config=config)
    await asyncio.to_thread(app, h.grid, ctx)
    stop.set()
    await asyncio.gather(*workers)
    ref: list = []
    grid = InProcessGrid(make_client_app(mods=[compression_mod]), 2, run_config=config,
                         run_id=RUN_ID)
    run_server_app_inprocess(make_server_app(listeners=[ref.append]), grid)
    assert [r.round for r in rounds] == [1, 2]
    for got, want in zip(rounds, ref, strict=True):
        assert got.accepted == 2 and got.rejected == 0
        assert abs(got.accuracy - want.accuracy) < 1e-3
    assert sorted(ends[0].accepted_nodes) == sorted(d.node_id for d in devs)
    for r in (1, 2):
        assert len(h.store.list_tasks(RUN_ID, r, TaskState.DONE)) == 2
    for dev in devs:
        await dev.close()
    await h.stop()


def test_a_resumed_run_continues_its_round_numbers_from_a_snapshot(tmp_path: Path) -> None:
    """What the coordinator does after a restart, on the in-process Grid: `first-round` and
    `initial-model` continue the run exactly where an uninterrupted one would be."""
    from fedge.common.snapshot import arrays_to_snapshot

    config = {"task": "digits", "codec": "none", "num-rounds": 3, "min-train-nodes": 2}
    full: list = []
    ends: list = []
    run_server_app_inprocess(
        make_server_app(listeners=[full.append], on_round_end=[ends.append]),
        InProcessGrid(make_client_app(), 2, run_config=config),
    )
    snap = tmp_path / "round2.pb"
    arrays = {k: a.numpy() for k, a in ends[1].arrays.items()}
    snap.write_bytes(arrays_to_snapshot(arrays).SerializeToString(deterministic=True))
    resumed: list = []
    run_server_app_inprocess(
        make_server_app(listeners=[resumed.append]),
        InProcessGrid(make_client_app(), 2,
                      run_config={**config, "first-round": 3, "initial-model": str(snap)}),
    )
    assert [r.round for r in resumed] == [3]
    assert resumed[0].accuracy == pytest.approx(full[2].accuracy, abs=1e-9)
    assert resumed[0].loss == pytest.approx(full[2].loss, rel=1e-6)


def test_replies_over_the_inbox_budget_wait_in_a_file(grid: GrpcGrid, tmp_path: Path) -> None:
    """A result that arrived in memory is parked on disk when too many wait unconsumed."""
    a, b = _join(grid, 2)
    grid.inbox_memory_bytes = 1_000
    ids = _push(grid, [_train(a), _train(b)])
    for task_id in ids:
        payload = reply_bytes(_SENT[task_id], values=bytes(600))
        grid.store.begin_result(task_id, total_size=len(payload), sha256=sha256_hex(payload),
                                path=str(tmp_path / f"{task_id}.part"))
        parsed = fc.parse_message(payload)
        outcome = grid.fleet.complete(task_id, tmp_path / f"{task_id}.part",
                                      grid.store.complete_result, parsed, len(payload))
        assert outcome == "accepted"
    held = [t for t in ids if grid._inbox[t].parsed is not None]
    parked = [t for t in ids if grid._inbox[t].parsed is None]
    assert len(held) == 1 and len(parked) == 1 and (tmp_path / f"{parked[0]}.part").exists()
    replies = grid.pull_messages(ids)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(ids)
    assert all(r.content["arrays"]["w"].numpy().size == 600 for r in replies)
    assert grid._inbox_parsed_bytes == 0
