"""The edge runtime against the REAL coordinator service on 127.0.0.1.

The coordinator is `CoordinatorService` with its SQLite store, fleet and
`GrpcGrid` (`coordinator_harness.ServiceHarness`), reached through
`coordinator_proxy.LinkProxy` where a test breaks the link at a chosen byte
(the proxy forwards every call and passes on the real service's answers).
In-process devices (`EdgeDevice.run()` on the test's event loop, the ClientApp
in its worker thread) for the protocol paths; real device processes
(`python -m fedge.client.cli run`) where the acceptance needs one: a device
killed with SIGKILL mid-upload, a stock Flower ClientApp named with `--app`,
SIGTERM. Nothing of fedge is mocked. More protocol paths (download resume,
closed rounds, OUT_OF_RANGE, DATA_LOSS, stalls): tests/test_edge_real_coordinator.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch
from coordinator_harness import ServiceHarness
from coordinator_proxy import LinkProxy
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from typer.testing import CliRunner

from fedge.client.compression_mod import RESIDUAL_STATE_KEY, UPDATE_KEY, compression_mod
from fedge.client.device_state import DeviceFolder
from fedge.client.edge_runtime import DEVICE_CODECS, EdgeDevice
from fedge.common.arrays import arrays_to_record, model_to_arrays
from fedge.common.flower_compat import context_from_bytes
from fedge.common.models import DigitsMLP
from fedge.common.update_codec import decode_update
from fedge.server.store import DeviceStatus, ResultStatus

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
RUN_CONFIG = json.dumps({"task": "digits", "seed": 3})
GLOBAL = model_to_arrays(DigitsMLP(seed=0))
EXPECTED = {k: (v.shape, v.dtype) for k, v in GLOBAL.items()}


# ------------------------------------------------------------- apps under test

stock_app = ClientApp()
"""A stock Flower ClientApp: torch training, plain ArrayRecord reply, no fedge mod."""


@stock_app.train()
def _stock_train(msg: Message, context: Context) -> Message:
    from sklearn.datasets import load_digits

    model = DigitsMLP()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    digits = load_digits()
    x = torch.tensor(digits.data[:200] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[:200])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": 200, "train-loss": float(loss.detach())}),
        }
    )
    return Message(content, reply_to=msg)


residual_app = ClientApp(mods=[compression_mod])
"""fedge's compression mod around a handler that reports the residual it finds in state."""


@residual_app.train()
def _spy_train(msg: Message, context: Context) -> Message:
    record = context.state.array_records.get(RESIDUAL_STATE_KEY)
    seen = -1.0 if record is None else float(sum(np.abs(a.numpy()).sum() for a in record.values()))
    rng = np.random.default_rng(int(msg.content["config"]["server-round"]))
    local = {
        k: Array(a.numpy() + rng.normal(scale=0.01, size=a.shape).astype(np.float32))
        for k, a in msg.content["arrays"].items()
    }
    metrics = MetricRecord({"num-examples": 10, "train-loss": 0.1, "seen-residual": seen})
    return Message(RecordDict({"arrays": ArrayRecord(local), "metrics": metrics}), reply_to=msg)


slow_app = ClientApp()
"""Trains until the test sets `SLOW_RELEASE`: a stop must not wait for it."""
SLOW_RELEASE = threading.Event()


@slow_app.train()
def _slow_train(msg: Message, context: Context) -> Message:
    SLOW_RELEASE.wait(120)
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)


# -------------------------------------------------------------------- helpers


def make_device(address: str, folder: Path, **kwargs) -> EdgeDevice:
    kwargs.setdefault("node_config", {"partition-id": 0, "num-partitions": 20})
    return EdgeDevice(
        address, folder, insecure=kwargs.pop("insecure", True), poll_wait_s=1.0,
        base_backoff=0.05, max_backoff=0.5, name="test-device", **kwargs,
    )


@contextlib.asynccontextmanager
async def running(device: EdgeDevice) -> AsyncIterator[EdgeDevice]:
    """Run an in-process device until the block ends; it must stop with exit code 0."""
    task = asyncio.create_task(device.run())
    try:
        await asyncio.wait_for(device.wait_joined(), 10)
        yield device
    finally:
        device.stop()
        assert await asyncio.wait_for(task, 10) == 0


async def stop_process(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), 15)


# ---------------------------------------------------------------------- tests


@pytest.fixture
async def real(tmp_path) -> AsyncIterator[tuple[ServiceHarness, LinkProxy]]:
    """The real coordinator service (SQLite, fleet, Grid) for the digits task, behind a
    link proxy that only forwards (and injects the faults a test asks for)."""
    coordinator = ServiceHarness(tmp_path / "coord", heartbeat_interval_s=0.5,
                                 device_run_config=json.loads(RUN_CONFIG))
    coordinator.grid.default_timeout = 600.0
    await coordinator.start()
    link = LinkProxy(coordinator.target)
    await link.start()
    yield coordinator, link
    await link.stop()
    await coordinator.stop()


def push_train(
    coordinator: ServiceHarness, node_id: int, *, codec: str = "int8", server_round: int = 1
) -> str:
    """One train message as fedge's ServerApp sends it (digits MLP weights + config),
    queued through the real Grid; returns its task id."""
    config = {"server-round": server_round, "fedge.codec": codec,
              "fedge.run-id": str(coordinator.run_id), "fedge.base-version": "v-test",
              "local-epochs": 1, "lr": 0.1}
    content = RecordDict({"arrays": arrays_to_record(GLOBAL), "config": ConfigRecord(config)})
    (task_id,) = coordinator.grid.push_messages([Message(content, node_id, "train")])
    return task_id


async def until(predicate, what: str, guard_s: float = 90.0) -> None:
    async def check() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(check(), guard_s)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


def complete(coordinator: ServiceHarness, task_id: str) -> bool:
    row = coordinator.store.get_result(task_id)
    return row is not None and row.status == ResultStatus.COMPLETE


async def test_device_trains_and_pushes_an_int8_update(real, tmp_path) -> None:
    coordinator, link = real
    device = make_device(link.target, tmp_path / "dev")
    async with running(device):
        node_id = device.session.node_id
        tid = push_train(coordinator, node_id)
        task_bytes = coordinator.fleet.task(tid).total_size
        await until(lambda: len(device.completed) == 1, "the task answered")
        await until(lambda: len(link.seen.heartbeats) >= 1, "a heartbeat")  # every 0.5 s

    known = coordinator.store.get_device(device.identity.device_id)
    assert known.name == "test-device" and known.node_id == node_id
    assert "int8" in known.capabilities["codecs"]
    (reply,) = coordinator.grid.pull_messages([tid])
    assert not reply.has_error()
    assert reply.metadata.src_node_id == node_id
    assert reply.metadata.reply_to_message_id == tid
    record = reply.content["arrays"]
    assert list(record.keys()) == [UPDATE_KEY]
    update = decode_update(record[UPDATE_KEY].data, expected=EXPECTED)
    assert update.is_delta and update.codec.startswith("int8") and update.round == 1
    assert update.base_version == "v-test" and update.num_examples > 0
    assert any(np.abs(v).max() > 0 for v in update.arrays.values())  # it trained
    assert reply.content["metrics"]["num-examples"] == update.num_examples
    stats = device.completed[-1]
    assert stats.outcome == "accepted" and stats.round == 1
    row = coordinator.store.get_result(tid)
    assert row.status == ResultStatus.COMPLETE
    assert stats.bytes_down == task_bytes and stats.bytes_up == row.total_size
    assert device.folder.outbox() == []  # delivered: nothing left to send
    # the residual is kept on disk for the next round
    ctx = context_from_bytes(device.folder.context_path(coordinator.run_id).read_bytes())
    assert RESIDUAL_STATE_KEY in ctx.state.array_records


async def test_upload_resumes_at_the_coordinators_offset(real, tmp_path) -> None:
    """The upload stream ends short at 8 KiB: the real service keeps the bytes and answers
    ABORTED; the device asks GetUploadOffset and sends only the rest."""
    coordinator, link = real
    device = make_device(link.target, tmp_path / "dev", chunk_size=1024)
    async with running(device):
        tid = push_train(coordinator, device.session.node_id, codec="none")  # ~20 kB back
        link.end_upload_after[tid] = 8192
        await until(lambda: len(device.completed) == 1, "the result accepted")

    row = coordinator.store.get_result(tid)
    assert row.status == ResultStatus.COMPLETE and row.total_size > 16384
    # ABORTED: the stream ended short (and again for a header-only probe, if any)
    codes = [code for _, t, code in link.seen.refusals if t == tid]
    assert codes[0] == "ABORTED" and set(codes) <= {"ABORTED", "INTERNAL"}
    offsets = [p[1] for p in link.seen.pushes if p[0] == tid]
    # resumed exactly where the coordinator was (a header-only probe may come first when
    # gRPC lost the abort's status to a racing write)
    assert offsets[0] == 0 and set(offsets[1:]) == {8192}
    assert link.seen.uploaded[tid] == row.total_size  # no byte reached it twice
    (reply,) = coordinator.grid.pull_messages([tid])
    weights = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    assert weights.keys() == GLOBAL.keys()  # codec none: full weights
    assert device.completed[-1].outcome == "accepted"
    assert device.completed[-1].bytes_up >= row.total_size


async def spawn_real(target: str, folder: Path, *extra: str):
    """A device process (`python -m fedge.client.cli run ...`) in tests/ (so `--app` finds
    this module's apps), logging next to its folder."""
    log = open(folder.with_suffix(".log"), "ab")  # noqa: SIM115 - the child holds it
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedge.client.cli", "run", "--coordinator", target,
        "--data", str(folder), "--insecure", "--max-backoff", "1", *extra,
        stdout=log, stderr=log, env=ENV, cwd=TESTS,
    )
    log.close()
    return proc


async def test_killed_device_finishes_its_upload_from_the_outbox(real, tmp_path) -> None:
    """SIGKILL mid-upload; the restarted process resumes at the real service's offset."""
    coordinator, link = real
    folder = tmp_path / "dev"
    proc = await spawn_real(link.target, folder, "--chunk-size", "1024", "--partition-id", "1",
                            "--num-partitions", "20")
    await until(lambda: coordinator.fleet.live_node_ids(), "the device joined")
    (node_id,) = coordinator.fleet.live_node_ids()
    device_id = coordinator.fleet.device_for_node(node_id).device_id
    tid = push_train(coordinator, node_id, codec="none")
    link.stall_upload_after[tid] = 8192
    await until(lambda: tid in link.stalled, "the upload stalled at 8 KiB")
    proc.kill()  # SIGKILL, mid-upload
    await proc.wait()
    assert len(DeviceFolder(folder).outbox()) == 1

    proc = await spawn_real(link.target, folder, "--chunk-size", "1024")
    await until(lambda: complete(coordinator, tid), "the result accepted")
    assert await stop_process(proc) == 0  # SIGTERM: a clean exit

    row = coordinator.store.get_result(tid)
    assert [p[1] for p in link.seen.pushes if p[0] == tid] == [0, 8192]  # resumed at the offset
    assert link.seen.uploaded[tid] == row.total_size  # no byte reached it twice
    assert coordinator.fleet.device_for_node(node_id).device_id == device_id  # same identity
    assert DeviceFolder(folder).outbox() == []
    (reply,) = coordinator.grid.pull_messages([tid])
    assert not reply.has_error()
    log = folder.with_suffix(".log").read_text()
    assert "resuming its upload from the outbox" in log and "Traceback" not in log


async def test_context_state_survives_a_restart(real, tmp_path) -> None:
    coordinator, link = real
    folder = tmp_path / "dev"
    ref = "test_edge_runtime:residual_app"
    seen = []
    for round_ in (1, 2):  # a new EdgeDevice (a restarted runtime) for each round
        device = make_device(link.target, folder, client_app_ref=ref)
        async with running(device):
            tid = push_train(coordinator, device.session.node_id, server_round=round_)
            await until(lambda tid=tid: complete(coordinator, tid), "the result accepted")
            (reply,) = coordinator.grid.pull_messages([tid])
        assert list(reply.content["arrays"].keys()) == [UPDATE_KEY]
        seen.append(reply.content["metrics"]["seen-residual"])
        if round_ == 1:
            path = DeviceFolder(folder).context_path(coordinator.run_id)
            stored = context_from_bytes(path.read_bytes())
            residual = stored.state.array_records[RESIDUAL_STATE_KEY]
            residual_sum = float(sum(np.abs(a.numpy()).sum() for a in residual.values()))
    assert seen[0] == -1.0  # round 1: no residual yet
    assert residual_sum > 0
    assert seen[1] == pytest.approx(residual_sum, rel=1e-6)  # round 2 found round 1's residual


async def test_stock_flower_client_app_trains_via_the_cli(real, tmp_path) -> None:
    coordinator, link = real
    folder = tmp_path / "dev"
    proc = await spawn_real(link.target, folder, "--app", "test_edge_runtime:stock_app")
    try:
        await until(lambda: coordinator.fleet.live_node_ids(), "the device joined")
        (node_id,) = coordinator.fleet.live_node_ids()
        device_id = coordinator.fleet.device_for_node(node_id).device_id
        # what the device's fedge can encode, whichever app it runs; the reply below shows
        # that a stock app runs as it is defined (no mod is added to it)
        assert coordinator.store.get_device(device_id).capabilities.get("codecs", []) == list(
            DEVICE_CODECS
        )
        tid = push_train(coordinator, node_id)
        await until(lambda: complete(coordinator, tid), "the result accepted")
    finally:
        assert await stop_process(proc) == 0
    (reply,) = coordinator.grid.pull_messages([tid])
    arrays = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    assert arrays.keys() == GLOBAL.keys()  # a plain ArrayRecord of full weights
    assert any(not np.allclose(arrays[k], GLOBAL[k]) for k in arrays)  # trained
    assert reply.content["metrics"]["num-examples"] == 200


async def test_unauthenticated_makes_the_device_join_again(real, tmp_path) -> None:
    """The real service forgets the device's session (a newer Join replaced its token):
    the next call is UNAUTHENTICATED and the device joins again, same id, same node."""
    coordinator, link = real
    device = make_device(link.target, tmp_path / "dev")
    async with running(device):
        first_node, first_token = device.session.node_id, device.session.token
        entry = coordinator.fleet.device_for_node(first_node)
        coordinator.fleet.join(entry.device_id, first_node, entry.name)  # the old token dies
        await until(lambda: device.joins >= 2, "the device joined again")
        tid = push_train(coordinator, first_node)
        await until(lambda: complete(coordinator, tid), "the result accepted")
    assert any(code == "UNAUTHENTICATED" for _, _, code in link.seen.refusals)
    assert device.session.token != first_token
    assert device.session.node_id == first_node
    assert coordinator.fleet.device_for_node(first_node).device_id == device.identity.device_id


async def test_device_backs_off_and_rejoins_a_restarted_coordinator(real, tmp_path) -> None:
    """The real coordinator goes down and comes back on the same state and port: the
    device retries with backoff meanwhile, joins again (same id, same node: the store
    remembers devices, not sessions) and answers the restarted coordinator's task."""
    coordinator, _ = real
    device = make_device(coordinator.target, tmp_path / "dev")  # direct: the outage is seen
    async with running(device):
        device_id, node_id = device.identity.device_id, device.session.node_id
        await coordinator.go_down()
        await until(lambda: device.backoff.failures >= 2, "retries while it is gone")
        await coordinator.come_back()
        await until(lambda: device.joins >= 2, "joined the restarted coordinator")
        assert coordinator.fleet.device_for_node(node_id).device_id == device_id
        tid = push_train(coordinator, node_id)
        await until(lambda: complete(coordinator, tid), "the result accepted")
    assert device.session.node_id == node_id


async def test_stop_during_training_abandons_the_task_at_once(real, tmp_path) -> None:
    coordinator, link = real
    ref = "test_edge_runtime:slow_app"
    SLOW_RELEASE.clear()
    device = make_device(link.target, tmp_path / "dev", client_app_ref=ref)
    task = asyncio.create_task(device.run())
    session = await asyncio.wait_for(device.wait_joined(), 10)
    push_train(coordinator, session.node_id)
    # heartbeats go on while it trains, saying so (DEVICE_STATE_WORKING)
    await until(lambda: 2 in link.seen.heartbeat_states, "a heartbeat while working")
    assert device.worker_busy
    try:
        device.stop()
        assert await asyncio.wait_for(task, 30) == 0  # (the bound only guards a hang)
        assert device.worker_busy  # stopped while the app still trains: not waited for
    finally:
        SLOW_RELEASE.set()


async def test_revoked_device_stops_with_exit_code_3(real, tmp_path) -> None:
    """Revoked in the registry: the real service refuses its next Join PERMISSION_DENIED
    (under mTLS every call is refused: tests/test_trust_e2e.py)."""
    coordinator, link = real
    device = make_device(link.target, tmp_path / "dev")
    task = asyncio.create_task(device.run())
    session = await asyncio.wait_for(device.wait_joined(), 10)
    coordinator.store.set_device_status(device.identity.device_id, DeviceStatus.REVOKED)
    entry = coordinator.fleet.device_for_node(session.node_id)
    coordinator.fleet.join(entry.device_id, session.node_id, entry.name)  # must Join again
    assert await asyncio.wait_for(task, 30) == 3
    assert ("Join", "", "PERMISSION_DENIED") in link.seen.refusals


async def test_tls_is_the_default(tmp_path) -> None:
    """The real service behind server TLS (a coordinator with a certificate the device
    trusts through --ca): the device joins; without the CA it cannot, and keeps retrying.
    (fedge's own coordinator also asks for the device's certificate: tests/test_trust_e2e.py.)"""
    from fedge.server.tls import ensure_server_tls, server_credentials

    paths = ensure_server_tls(tmp_path / "tls")
    secure = ServiceHarness(tmp_path / "coord", device_run_config=json.loads(RUN_CONFIG))
    target = await secure.start(credentials=server_credentials(paths))
    try:
        device = make_device(target, tmp_path / "dev", ca_cert=paths.ca_cert, insecure=False)
        async with running(device):
            assert device.session.node_id
            assert secure.fleet.device_for_node(device.session.node_id) is not None
        # without the coordinator's CA the device cannot join (and keeps retrying)
        untrusting = make_device(target, tmp_path / "dev2", insecure=False)
        task = asyncio.create_task(untrusting.run())
        await until(lambda: untrusting.backoff.failures >= 2, "failed attempts")
        assert untrusting.session is None
        untrusting.stop()
        assert await asyncio.wait_for(task, 30) == 0
        assert len(secure.fleet.live_node_ids()) == 1  # only the trusting device joined
    finally:
        await secure.stop()


HEAVY = "print(sorted(m for m in ('torch', 'flwr', 'numpy', 'fedge.server') if m in sys.modules))"


def test_waiting_device_does_not_load_torch_or_flower() -> None:
    code = "import sys, fedge.client.cli, fedge.client.edge_runtime;" + HEAVY
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=ENV, check=True)
    assert out.stdout.strip() == "[]"
    # what `fedge client run` loads through the root command (typer-only modules aside)
    heavy = HEAVY.replace(", 'fedge.server'", ", 'fedge.server.coordinator', 'grpc'")
    out = subprocess.run([sys.executable, "-c", "import sys, fedge.cli;" + heavy],
                         capture_output=True, text=True, env=ENV)
    if "ModuleNotFoundError" in out.stderr:
        pytest.skip(f"fedge.cli does not import yet: {out.stderr.strip().splitlines()[-1]}")
    assert out.stdout.strip() == "[]", "the `fedge` command loads heavy modules at import"


def test_cli_refuses_bad_options_without_a_traceback(tmp_path) -> None:
    from fedge.client.cli import client_app_cli

    runner = CliRunner()
    cases = [
        (["--coordinator", "nohost", "--insecure"], "HOST:PORT"),
        (["--coordinator", "127.0.0.1:99999", "--insecure"], "HOST:PORT"),
        (["--coordinator", "127.0.0.1:9092", "--ca", str(tmp_path / "no.pem")], "not found"),
        (["--coordinator", "127.0.0.1:9092", "--ca", str(tmp_path / "no.pem"), "--insecure"],
         "either --ca or --insecure"),
        (["--coordinator", "127.0.0.1:9092", "--insecure", "--app", "no_such_mod:app"],
         "not found"),
    ]
    for args, message in cases:
        result = runner.invoke(client_app_cli, ["run", "--data", str(tmp_path / "d"), *args])
        text = result.output + (result.stderr if result.stderr_bytes is not None else "")
        assert result.exit_code == 2, (args, text)
        assert message in " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split()), (args, text)
        assert "Traceback" not in text


def test_fedge_command_has_client_run() -> None:
    try:
        from fedge.cli import app
    except ModuleNotFoundError as e:
        pytest.skip(f"fedge.cli does not import yet: {e}")

    result = CliRunner().invoke(app, ["client", "run", "--help"])
    assert result.exit_code == 0
    assert "--coordinator" in result.output and "--insecure" in result.output


def test_outbox_survives_only_whole_entries(tmp_path) -> None:
    folder = DeviceFolder(tmp_path / "dev")
    ident = folder.load_identity("pi-1")
    assert DeviceFolder(tmp_path / "dev").load_identity().device_id == ident.device_id
    good = folder.write_result("task/../1", 3, 2, "train", b"x" * 5000)
    assert good.path.parent == folder.outbox_dir  # an odd task id cannot escape the outbox
    bad = folder.write_result("t2", 3, 2, "train", b"y" * 10)
    bad.path.write_bytes(b"z" * 10)  # damaged after the sidecar was written
    (folder.outbox_dir / "orphan.bin").write_bytes(b"never announced")
    (folder.outbox_dir / ".tmp-123.bin").write_bytes(b"half written")
    assert [e.task_id for e in folder.outbox()] == ["task/../1"]
    assert sorted(p.name for p in folder.outbox_dir.iterdir()) == sorted(
        [good.path.name, good.sidecar.name]
    )
    folder.remove(good)
    assert folder.outbox() == []
