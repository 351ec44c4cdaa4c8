"""The edge device against the REAL coordinator service: resume, closed rounds, OUT_OF_RANGE.

The coordinator is `CoordinatorService` with its SQLite store, fleet and
`GrpcGrid` (`coordinator_harness.ServiceHarness`, on 127.0.0.1). Where a test
needs the link to fail at a chosen byte, `coordinator_proxy.LinkProxy` sits in
between: it forwards every call and passes on the real service's answers, so
the device only ever hears what the real coordinator says. Devices are
`EdgeDevice`s on the test's event loop, or real device processes
(`python -m fedge.client.cli run`) where the claim is about a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import edge_test_apps
import pytest
from coordinator_harness import ServiceHarness
from coordinator_proxy import LinkProxy

from fedge.client.device_state import DeviceFolder
from fedge.client.edge_runtime import EdgeDevice
from fedge.server.store import ResultStatus, TaskState

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
CHUNK = 4096
TASK_BYTES = 40_000  # ten download chunks


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[ServiceHarness]:
    """The real service; heartbeats every 60 s, so none interferes unless a test asks."""
    harness = ServiceHarness(tmp_path / "coord", heartbeat_interval_s=60.0)
    harness.grid.default_timeout = 600.0  # task deadlines far beyond any test
    await harness.start()
    yield harness
    await harness.stop()


@pytest.fixture
async def link(coordinator: ServiceHarness) -> AsyncIterator[LinkProxy]:
    proxy = LinkProxy(coordinator.target)
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture(autouse=True)
def _apps_reset() -> None:
    edge_test_apps.ENTERED.clear()
    edge_test_apps.RELEASE.clear()


def make_device(target: str, folder: Path, app: str = "echo_app", **kwargs) -> EdgeDevice:
    kwargs.setdefault("chunk_size", CHUNK)
    return EdgeDevice(
        target, folder, insecure=True, name="real-test", poll_wait_s=1.0,
        base_backoff=0.05, max_backoff=0.2, client_app_ref=f"edge_test_apps:{app}", **kwargs,
    )


GUARD_S = 60.0
"""Only stops a hung test: on a machine whose cores are all busy, a join or a stop has taken
over 20 s (the device's stopped task waited that long for the event loop to run it)."""


@contextlib.asynccontextmanager
async def running(device: EdgeDevice) -> AsyncIterator[EdgeDevice]:
    task = asyncio.create_task(device.run())
    try:
        await asyncio.wait_for(device.wait_joined(), GUARD_S)
        yield device
    finally:
        edge_test_apps.RELEASE.set()
        device.stop()
        assert await asyncio.wait_for(task, GUARD_S) == 0


async def until(predicate: Callable[[], bool], what: str, guard_s: float = 60.0) -> None:
    """Wait for a condition (checked every 20 ms); `guard_s` only stops a hung test."""
    async def check() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(check(), guard_s)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


def push(coordinator: ServiceHarness, node_id: int, server_round: int = 1) -> str:
    """Queue one train task for `node_id` through the Grid (as the ServerApp does)."""
    payload = bytes(range(256)) * (TASK_BYTES // 256)
    (task_id,) = coordinator.grid.push_messages(
        [coordinator.train_message(node_id, server_round=server_round, payload=payload)]
    )
    return task_id


def result_status(coordinator: ServiceHarness, task_id: str) -> ResultStatus | None:
    row = coordinator.store.get_result(task_id)
    return None if row is None else row.status


def task_size(coordinator: ServiceHarness, task_id: str) -> int:
    return coordinator.fleet.task(task_id).total_size


def refusals_of(link: LinkProxy, task_id: str) -> list[tuple[str, str]]:
    """(rpc, status) of the real service's refusals for `task_id`, in order.

    INTERNAL is left out: a PushResult write that races the service ending the stream
    early loses its status in gRPC (docs/edge.md); the header-only probe that follows
    gets the real verdict, which is kept.
    """
    return [(rpc, code) for rpc, t, code in link.seen.refusals
            if t == task_id and code != "INTERNAL"]


def stats_of(device: EdgeDevice, task_id: str):
    return [s for s in device.completed if s.task_id == task_id]


def accepted_reply(coordinator: ServiceHarness, task_id: str) -> None:
    """The Grid hands the ServerApp one reply to `task_id`, with the app's content."""
    (reply,) = coordinator.grid.pull_messages([task_id])
    assert not reply.has_error()
    values = reply.content["arrays"]["w"].numpy()
    assert values.size == edge_test_apps.REPLY_BYTES
    assert reply.content["metrics"]["num-examples"] == 10


# ------------------------------------------------------------------ download


async def test_download_resumes_at_the_byte_the_link_broke(coordinator, link, tmp_path) -> None:
    device = make_device(link.target, tmp_path / "dev")
    async with running(device) as dev:
        tid = push(coordinator, dev.session.node_id)
        link.cut_download_after[tid] = 3 * CHUNK
        size = task_size(coordinator, tid)
        await until(lambda: stats_of(dev, tid), "the task answered")
    assert [h for h in link.seen.headers if h[0] == tid] == [(tid, 0), (tid, 3 * CHUNK)]
    assert (tid, 3 * CHUNK) in link.seen.pulls  # asked for the rest, by task id and offset
    assert link.seen.refusals == []
    (stats,) = stats_of(device, tid)
    assert stats.outcome == "accepted"
    assert stats.bytes_down == size  # every byte downloaded once
    assert result_status(coordinator, tid) == ResultStatus.COMPLETE
    accepted_reply(coordinator, tid)


async def test_download_refused_out_of_range_starts_again_from_zero(
    coordinator, link, tmp_path
) -> None:
    """The real service answers a resume past the task's end OUT_OF_RANGE; the device
    then downloads the task again from byte 0. A device that follows the protocol never
    asks past the end of a task the real service holds, so the link corrupts the resume
    offset in transit; the refusal itself is the real service's."""
    device = make_device(link.target, tmp_path / "dev")
    async with running(device) as dev:
        tid = push(coordinator, dev.session.node_id)
        size = task_size(coordinator, tid)
        link.cut_download_after[tid] = 2 * CHUNK
        link.resume_offset_shift[tid] = size  # asks for 2 * CHUNK + size: past the end
        await until(lambda: stats_of(dev, tid), "the task answered")
    assert refusals_of(link, tid) == [("PullTask", "OUT_OF_RANGE")]
    assert [p for p in link.seen.pulls if p[0] == tid] == [(tid, 2 * CHUNK + size), (tid, 0)]
    assert [h for h in link.seen.headers if h[0] == tid] == [(tid, 0), (tid, 0)]
    (stats,) = stats_of(device, tid)
    assert stats.outcome == "accepted"
    assert stats.bytes_down == 2 * CHUNK + size  # the broken start, then the whole task
    assert result_status(coordinator, tid) == ResultStatus.COMPLETE
    accepted_reply(coordinator, tid)


async def test_download_of_a_closed_round_is_given_up(
    coordinator, link, tmp_path, caplog
) -> None:
    """The round closes while the device's download is broken: its resume is refused
    (FAILED_PRECONDITION), the device drops the task and takes the next round's."""
    caplog.set_level(logging.WARNING, logger="fedge.client")
    device = make_device(link.target, tmp_path / "dev")
    async with running(device) as dev:
        tid = push(coordinator, dev.session.node_id)
        link.cut_download_after[tid] = 2 * CHUNK
        link.on_download_cut[tid] = lambda: coordinator.grid.end_round(1)
        await until(lambda: ("PullTask", tid, "FAILED_PRECONDITION") in link.seen.refusals,
                    "the resume refused")
        nxt = push(coordinator, dev.session.node_id, server_round=2)
        await until(lambda: stats_of(dev, nxt), "the next round's task answered")
    assert [p for p in link.seen.pulls if p[0] == tid] == [(tid, 2 * CHUNK)]
    assert stats_of(device, tid) == [] and result_status(coordinator, tid) is None
    assert coordinator.store.get_task(tid).state == TaskState.EXPIRED
    assert f"task {tid}: download cannot resume (FAILED_PRECONDITION); dropped" in caplog.text
    assert stats_of(device, nxt)[0].outcome == "accepted"
    assert result_status(coordinator, nxt) == ResultStatus.COMPLETE


async def test_a_silent_download_is_resumed_after_the_progress_timeout(
    coordinator, link, tmp_path, caplog
) -> None:
    """docs/edge.md: each download chunk must arrive within the stall timeout (60 s; 1 s
    here). The link goes silent mid-task without closing; the device gives up on that
    stream and asks for the rest from the bytes it holds."""
    caplog.set_level(logging.INFO, logger="fedge.client")
    device = make_device(link.target, tmp_path / "dev", stall_timeout_s=1.0)
    async with running(device) as dev:
        tid = push(coordinator, dev.session.node_id)
        link.stall_download_after[tid] = 2 * CHUNK
        size = task_size(coordinator, tid)
        await until(lambda: stats_of(dev, tid), "the task answered")
    assert tid in link.stalled
    assert "task stream stalled for 1 s" in caplog.text
    assert [p for p in link.seen.pulls if p[0] == tid] == [(tid, 2 * CHUNK)]
    assert stats_of(device, tid)[0].bytes_down == size
    assert result_status(coordinator, tid) == ResultStatus.COMPLETE


# ------------------------------------------------------------------ closed rounds


async def test_result_for_a_closed_round_is_dropped(coordinator, link, tmp_path) -> None:
    """The round closes while the device trains; its upload is refused FAILED_PRECONDITION
    by the real service, and the device drops the result (nothing stored, outbox empty)."""
    device = make_device(link.target, tmp_path / "dev", app="held_app")
    async with running(device) as dev:
        tid = push(coordinator, dev.session.node_id)
        await until(edge_test_apps.ENTERED.is_set, "training started")
        coordinator.grid.end_round(1)
        edge_test_apps.RELEASE.set()
        await until(lambda: stats_of(dev, tid), "the task finished")
        nxt = push(coordinator, dev.session.node_id, server_round=2)
        await until(lambda: stats_of(dev, nxt), "the next round's task answered")
    # refused at the push, or (after a write race lost the push's status) at the
    # GetUploadOffset that follows: the real service says FAILED_PRECONDITION either way;
    # or, when a heartbeat's task_cancelled arrives first, never sent at all
    refused = refusals_of(link, tid)
    (stats,) = stats_of(device, tid)
    if stats.outcome == "dropped: round closed":  # the heartbeat told it while it trained
        assert refused == []
    else:
        assert stats.outcome == "dropped"
        assert refused[0] == ("PushResult", "FAILED_PRECONDITION") or refused == [
            ("GetUploadOffset", "FAILED_PRECONDITION")]
        assert {code for _, code in refused} == {"FAILED_PRECONDITION"}
    assert result_status(coordinator, tid) is None
    assert coordinator.store.get_task(tid).state == TaskState.EXPIRED
    assert not (coordinator.tmp / "uploads" / f"{tid}.part").exists()
    assert device.folder.outbox() == []
    assert stats_of(device, nxt)[0].outcome == "accepted"


async def test_heartbeat_cancels_a_closed_rounds_task(tmp_path) -> None:
    """The real service's heartbeat says `task_cancelled` once the round closed: the
    device drops the result without uploading a byte."""
    coordinator = ServiceHarness(tmp_path / "coord", heartbeat_interval_s=0.1)
    coordinator.grid.default_timeout = 600.0
    await coordinator.start()
    link = LinkProxy(coordinator.target)
    await link.start()
    try:
        device = make_device(link.target, tmp_path / "dev", app="held_app")
        async with running(device) as dev:
            tid = push(coordinator, dev.session.node_id)
            await until(edge_test_apps.ENTERED.is_set, "training started")
            coordinator.grid.end_round(1)
            await until(lambda: any(h.task_cancelled for h in link.seen.heartbeats),
                        "a heartbeat answered task_cancelled")
            edge_test_apps.RELEASE.set()
            await until(lambda: stats_of(dev, tid), "the task finished")
        (stats,) = stats_of(device, tid)
        assert stats.outcome == "dropped: round closed" and stats.bytes_up == 0
        assert [p for p in link.seen.pushes if p[0] == tid] == []
        assert device.folder.outbox() == []
    finally:
        await link.stop()
        await coordinator.stop()


async def test_a_stop_whose_cancellation_is_lost_still_stops_the_device(
    coordinator, link, tmp_path
) -> None:
    """Python 3.11's `asyncio.wait_for` can swallow a cancellation that arrives with a
    result (CI saw a stopped device keep pulling). Here the cancel is lost outright: the
    device still ends within one poll, with exit code 0."""
    device = make_device(link.target, tmp_path / "dev")
    task = asyncio.create_task(device.run())
    await asyncio.wait_for(device.wait_joined(), GUARD_S)
    assert device._serve_task is not None
    device._serve_task.cancel = lambda *args, **kwargs: False  # the cancel never arrives
    device.stop()
    assert await asyncio.wait_for(task, 3 * device.poll_wait_s + 5) == 0
    assert not device._serve_task.cancelled()  # it ended by itself, not by the cancel


async def test_outbox_result_of_a_closed_round_is_dropped_on_restart(
    coordinator, link, tmp_path
) -> None:
    """A result left in the outbox while the device was down, whose round closed meanwhile:
    the real service's GetUploadOffset answers FAILED_PRECONDITION and the device drops it."""
    folder = tmp_path / "dev"
    device = make_device(link.target, folder)
    async with running(device) as dev:
        node_id, run_id = dev.session.node_id, coordinator.run_id
    tid = push(coordinator, node_id)  # queued for the device while it is down
    DeviceFolder(folder).write_result(tid, run_id, 1, "train", b"a reply never uploaded")
    coordinator.grid.end_round(1)
    device = make_device(link.target, folder)
    async with running(device) as dev:
        await until(lambda: stats_of(dev, tid), "the outbox entry handled")
    assert refusals_of(link, tid) == [("GetUploadOffset", "FAILED_PRECONDITION")]
    assert [p for p in link.seen.pushes if p[0] == tid] == []
    assert stats_of(device, tid)[0].outcome == "dropped"
    assert DeviceFolder(folder).outbox() == []
    assert (tid, 0) not in link.seen.headers  # an expired task is not offered
    assert result_status(coordinator, tid) is None


# ------------------------------------------------------------------ upload


async def test_upload_answered_out_of_range_resumes_at_the_held_offset(
    coordinator, link, tmp_path
) -> None:
    """The link breaks mid-upload while the coordinator's end of the stream stays open.
    The device asks GetUploadOffset (0: the bytes are not durable yet), then the
    coordinator notices the dead stream and keeps its bytes; the device's header at 0
    is answered OUT_OF_RANGE, it asks again and resumes where the coordinator is."""
    device = make_device(link.target, tmp_path / "dev")
    cut = 3 * CHUNK
    async with running(device) as dev:
        tid = push(coordinator, dev.session.node_id)
        link.cut_upload_after[tid] = cut
        await until(lambda: stats_of(dev, tid), "the result accepted")
    # the cut, then OUT_OF_RANGE for the header at 0. On a loaded machine the device may
    # come back while the coordinator still holds the dead stream (ABORTED again) and then
    # learn the held offset from GetUploadOffset without an OUT_OF_RANGE: a race between
    # the device's retry and the coordinator noticing the dead stream, and either way the
    # device must resume at the held offset, never resend from 0 once bytes are held.
    refused = refusals_of(link, tid)
    assert refused[0] == ("PushResult", "ABORTED")
    assert set(refused) <= {("PushResult", "ABORTED"), ("PushResult", "OUT_OF_RANGE")}
    offsets = [p[1] for p in link.seen.pushes if p[0] == tid]
    assert offsets[0] == 0 and offsets[-1] == cut and set(offsets) == {0, cut}
    (stats,) = stats_of(device, tid)
    assert stats.outcome == "accepted"
    row = coordinator.store.get_result(tid)
    assert row.status == ResultStatus.COMPLETE
    assert stats.bytes_up >= row.total_size  # resends included
    accepted_reply(coordinator, tid)


async def test_a_stalled_upload_is_resumed_after_the_progress_timeout(
    coordinator, link, tmp_path, caplog
) -> None:
    """docs/edge.md: each upload write must progress within the stall timeout (60 s; 1 s
    here). The link stops taking bytes mid-upload without closing; the device gives up on
    that stream and finishes the upload on a new one."""
    caplog.set_level(logging.INFO, logger="fedge.client")
    device = make_device(link.target, tmp_path / "dev", app="big_app", stall_timeout_s=1.0,
                         chunk_size=256 << 10)
    async with running(device) as dev:
        tid = push(coordinator, dev.session.node_id)
        link.stall_upload_after[tid] = 1 << 20
        await until(lambda: stats_of(dev, tid), "the result handled", guard_s=120)
    assert tid in link.stalled
    assert "upload stalled for 1 s" in caplog.text
    assert len([p for p in link.seen.pushes if p[0] == tid]) >= 2
    assert stats_of(device, tid)[0].outcome == "accepted"
    row = coordinator.store.get_result(tid)
    assert row.status == ResultStatus.COMPLETE
    assert row.total_size > edge_test_apps.BIG_REPLY_BYTES


async def test_data_loss_is_sent_again_from_zero_at_most_twice(
    coordinator, link, tmp_path
) -> None:
    """docs/edge.md: DATA_LOSS (the real service found the SHA-256 wrong once all bytes
    were in) sends the result again from 0, at most twice; a third one drops it."""
    device = make_device(link.target, tmp_path / "dev")
    async with running(device) as dev:
        healed = push(coordinator, dev.session.node_id)
        link.corrupt_uploads[healed] = 2  # a bit flipped in transit, twice
        await until(lambda: stats_of(dev, healed), "the first result handled")
        accepted_reply(coordinator, healed)  # (before round 2 opens and ends round 1)
        hopeless = push(coordinator, dev.session.node_id, server_round=2)
        link.corrupt_uploads[hopeless] = 10  # every send is damaged
        await until(lambda: stats_of(dev, hopeless), "the second result handled")
    assert refusals_of(link, healed) == [("PushResult", "DATA_LOSS")] * 2
    assert [p for p in link.seen.pushes if p[0] == healed] == [(healed, 0)] * 3
    assert stats_of(device, healed)[0].outcome == "accepted"
    assert result_status(coordinator, healed) == ResultStatus.COMPLETE

    # each attempt sends at most 3 times, then drops the result; the coordinator still has
    # no result, so it may offer the task again before the device stops (then it is computed
    # and dropped again: the same three sends)
    refused = refusals_of(link, hopeless)
    assert refused and refused == [("PushResult", "DATA_LOSS")] * len(refused)
    attempts = stats_of(device, hopeless)
    # + an attempt the stop cut short: fewer than 3 more refusals, one send maybe in flight
    assert 3 * len(attempts) <= len(refused) < 3 * len(attempts) + 3
    pushes = [p for p in link.seen.pushes if p[0] == hopeless]
    assert set(pushes) == {(hopeless, 0)} and len(refused) <= len(pushes) <= len(refused) + 1
    assert {s.outcome for s in attempts} == {"dropped"}
    assert result_status(coordinator, hopeless) != ResultStatus.COMPLETE
    assert device.folder.outbox() == []


# ------------------------------------------------------------------ processes


async def spawn(target: str, folder: Path, *extra: str, env: dict | None = None):
    log = open(folder.with_suffix(".log"), "ab")  # noqa: SIM115 - the child holds it
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedge.client.cli", "run", "--coordinator", target,
        "--data", str(folder), "--insecure", "--max-backoff", "1", "--chunk-size", str(CHUNK),
        *extra, stdout=log, stderr=log, env=env or ENV, cwd=TESTS,
    )
    log.close()
    return proc


async def test_a_task_lost_with_its_device_is_offered_again(coordinator, link, tmp_path) -> None:
    """A device process killed while training: the restarted process is offered the same
    task by the real service (it has no accepted result yet) and answers it in the round."""
    folder = tmp_path / "dev"
    held = {**ENV, "FEDGE_TEST_HOLD": "1"}
    proc = await spawn(link.target, folder, "--app", "edge_test_apps:held_app", env=held)
    try:
        await until(lambda: coordinator.fleet.live_node_ids(), "the device joined")
        (node_id,) = coordinator.fleet.live_node_ids()
        tid = push(coordinator, node_id)
        await until((folder / "entered").exists, "the device trains")
    finally:
        proc.kill()
        await proc.wait()
    proc = await spawn(link.target, folder, "--app", "edge_test_apps:held_app")
    try:
        await until(lambda: result_status(coordinator, tid) == ResultStatus.COMPLETE,
                    "the restarted device's result accepted")
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), GUARD_S) == 0
    assert [h for h in link.seen.headers if h[0] == tid] == [(tid, 0), (tid, 0)]
    accepted_reply(coordinator, tid)


async def test_one_device_process_per_data_folder(coordinator, tmp_path) -> None:
    """docs/edge.md: a folder another device process holds is refused, exit 2, one line."""
    folder = tmp_path / "dev"
    first = await spawn(coordinator.target, folder)
    try:
        await until(lambda: coordinator.fleet.live_node_ids(), "the first device joined")
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fedge.client.cli", "run", "--coordinator",
            coordinator.target, "--data", str(folder), "--insecure",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=ENV,
        )
        out, _ = await asyncio.wait_for(second.communicate(), 60)
        assert second.returncode == 2
        text = out.decode()
        lines = [line for line in text.splitlines() if line.strip()]
        assert lines == [f"Error: another device process is using {folder} "
                         "(one process per data folder)"], text
        assert first.returncode is None  # the first one serves on
        assert len(coordinator.fleet.live_node_ids()) == 1
    finally:
        first.terminate()
        assert await asyncio.wait_for(first.wait(), GUARD_S) == 0


async def test_session_tokens_are_never_logged(coordinator, tmp_path, caplog) -> None:
    """docs/coordinator.md: tokens are never logged, by the device (a process at debug
    level) or the coordinator (this process's loggers, at debug level), through a task,
    a session the coordinator forgot and the re-join that follows."""
    caplog.set_level(logging.DEBUG)
    folder = tmp_path / "dev"
    proc = await spawn(coordinator.target, folder, "--app", "edge_test_apps:echo_app",
                       "--log-level", "debug")
    tokens: set[str] = set()
    try:
        await until(lambda: coordinator.fleet.live_node_ids(), "the device joined")
        (node_id,) = coordinator.fleet.live_node_ids()
        entry = coordinator.fleet.device_for_node(node_id)
        tokens.add(entry.token)
        tid = push(coordinator, node_id)
        await until(lambda: result_status(coordinator, tid) == ResultStatus.COMPLETE,
                    "the result accepted")
        coordinator.fleet.join(entry.device_id, node_id, entry.name)  # the old token dies
        tokens.add(entry.token)
        nxt = push(coordinator, node_id, server_round=2)
        await until(lambda: result_status(coordinator, nxt) == ResultStatus.COMPLETE,
                    "the re-joined device's result accepted")
        tokens.add(entry.token)
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), GUARD_S) == 0
    assert len(tokens) == 3
    device_log = folder.with_suffix(".log").read_text()
    assert "session lost" in device_log and entry.device_id in device_log  # it did log
    assert "fedge.server" in {r.name.rsplit(".", 1)[0] for r in caplog.records}
    for token in tokens:
        assert token not in device_log
        assert token not in caplog.text
