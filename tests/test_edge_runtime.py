"""The edge runtime against a real grpc.aio coordinator on 127.0.0.1 (tests/edge_fake_coordinator).

In-process devices (`EdgeDevice.run()` on the test's event loop, the ClientApp
in its worker thread) for the protocol paths; real device processes
(`python -m fedge.client.cli run`) where the acceptance needs one: a device
killed with SIGKILL mid-upload, a stock Flower ClientApp named with `--app`,
SIGTERM. Nothing of fedge is mocked.
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
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from edge_fake_coordinator import FakeCoordinator
from flwr.app import (
    DEFAULT_TTL,
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from typer.testing import CliRunner

from fedge.client.compression_mod import RESIDUAL_STATE_KEY, UPDATE_KEY, compression_mod
from fedge.client.device_state import DeviceFolder
from fedge.client.edge_runtime import DEVICE_CODECS, EdgeDevice
from fedge.common.arrays import arrays_to_record, model_to_arrays
from fedge.common.flower_compat import context_from_bytes, message_from_bytes, message_to_bytes
from fedge.common.models import DigitsMLP
from fedge.common.update_codec import decode_update

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
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
"""Trains for a long time (a few seconds): a stop must not wait for it."""


@slow_app.train()
def _slow_train(msg: Message, context: Context) -> Message:
    time.sleep(4)
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)


# -------------------------------------------------------------------- helpers


def train_payload(node_id: int, *, run_id: int = 11, round_: int = 1, codec: str = "int8") -> bytes:
    """A Flower train Message as the ServerApp sends it: digits MLP weights + config."""
    config = {
        "server-round": round_,
        "fedge.codec": codec,
        "fedge.run-id": str(run_id),
        "fedge.base-version": "v-test",
        "local-epochs": 1,
        "lr": 0.1,
    }
    content = RecordDict({"arrays": arrays_to_record(GLOBAL), "config": ConfigRecord(config)})
    metadata = Metadata(
        run_id=run_id,
        message_id=uuid.uuid4().hex,
        src_node_id=1,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id=str(round_),
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=MessageType.TRAIN,
    )
    return message_to_bytes(Message(content, metadata=metadata))


@pytest.fixture
async def fake() -> AsyncIterator[FakeCoordinator]:
    coordinator = FakeCoordinator()
    await coordinator.start()
    yield coordinator
    await coordinator.stop()


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


async def spawn(fake: FakeCoordinator, folder: Path, *extra: str, cwd: Path | None = None):
    """A device process (`python -m fedge.client.cli run ...`), logging next to its folder."""
    log = open(folder.with_suffix(".log"), "ab")  # noqa: SIM115 - the child holds it
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedge.client.cli", "run", "--coordinator", fake.address,
        "--data", str(folder), "--insecure", "--max-backoff", "1", *extra,
        stdout=log, stderr=log, env=ENV, cwd=cwd,
    )
    log.close()
    return proc


async def joined_device(fake: FakeCoordinator, count: int = 1) -> tuple[str, int]:
    await fake.wait_until(lambda: len(fake.join_requests) >= count, 30)
    device_id = fake.join_requests[-1].device_id
    return device_id, fake.devices[device_id]


async def stop_process(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), 15)


def decode_reply(payload: bytes) -> Message:
    reply = message_from_bytes(payload)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply


# ---------------------------------------------------------------------- tests


async def test_device_trains_and_pushes_an_int8_update(fake, tmp_path) -> None:
    device = make_device(fake.address, tmp_path / "dev")
    async with running(device):
        node_id = device.session.node_id
        payload = train_payload(node_id)
        tid = fake.add_task(device.identity.device_id, payload, run_id=11, round_=1,
                            run_config_json=RUN_CONFIG)
        await fake.wait_until(lambda: tid in fake.results, 60)
        await fake.wait_until(lambda: len(device.completed) == 1, 5)
        await fake.wait_until(lambda: len(fake.heartbeats) >= 1, 5)  # every 0.5 s

    join = fake.join_requests[0]
    assert join.protocol_version == 1 and join.device_name == "test-device"
    assert "int8" in join.capabilities.codecs
    reply = decode_reply(fake.results[tid])
    assert reply.metadata.src_node_id == node_id
    assert reply.metadata.reply_to_message_id == message_from_bytes(payload).metadata.message_id
    record = reply.content["arrays"]
    assert list(record.keys()) == [UPDATE_KEY]
    update = decode_update(record[UPDATE_KEY].data, expected=EXPECTED)
    assert update.is_delta and update.codec.startswith("int8") and update.round == 1
    assert update.base_version == "v-test" and update.num_examples > 0
    assert any(np.abs(v).max() > 0 for v in update.arrays.values())  # it trained
    assert reply.content["metrics"]["num-examples"] == update.num_examples
    stats = device.completed[-1]
    assert stats.outcome == "accepted" and stats.round == 1
    assert stats.bytes_down == len(payload) and stats.bytes_up == len(fake.results[tid])
    assert device.folder.outbox() == []  # delivered: nothing left to send
    # the residual is kept on disk for the next round
    ctx = context_from_bytes(device.folder.context_path(11).read_bytes())
    assert RESIDUAL_STATE_KEY in ctx.state.array_records
    assert fake.heartbeats[0].session_token == device.session.token


async def test_upload_resumes_at_the_coordinators_offset(fake, tmp_path) -> None:
    device = make_device(fake.address, tmp_path / "dev", chunk_size=1024)
    async with running(device):
        payload = train_payload(device.session.node_id, codec="none")  # full weights: ~20 kB
        tid = fake.add_task(device.identity.device_id, payload, run_id=11, round_=1,
                            run_config_json=RUN_CONFIG)
        fake.abort_after[tid] = (8192, grpc.StatusCode.ABORTED)
        await fake.wait_until(lambda: tid in fake.results, 60)
        # the device records the task once the upload call returns, a moment later
        await fake.wait_until(lambda: len(device.completed) == 1, 5)

    result = fake.results[tid]
    upload = fake.uploads[tid]
    assert len(result) > 16384
    # resumed exactly where the coordinator was (a header-only probe may come first when
    # gRPC lost the abort's status to a racing write)
    assert upload.header_offsets[0] == 0 and set(upload.header_offsets[1:]) == {8192}
    assert upload.received - len(result) < len(result) / 2  # less than half sent again
    assert upload.received == len(result)  # in fact no byte was received twice
    reply = decode_reply(result)
    weights = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    assert weights.keys() == GLOBAL.keys()  # codec none: full weights
    assert device.completed[-1].outcome == "accepted"
    assert device.completed[-1].bytes_up >= len(result)


async def test_interrupted_download_resumes(fake, tmp_path) -> None:
    device = make_device(fake.address, tmp_path / "dev", chunk_size=1024)
    async with running(device):
        payload = train_payload(device.session.node_id)
        tid = fake.add_task(device.identity.device_id, payload, run_id=11, round_=1,
                            run_config_json=RUN_CONFIG)
        fake.break_download_after[tid] = 4096
        await fake.wait_until(lambda: tid in fake.results, 60)
        await fake.wait_until(lambda: len(device.completed) == 1, 5)
    assert fake.download_offsets == [(tid, 0), (tid, 4096)]
    assert device.completed[-1].bytes_down == len(payload)  # each byte once


async def test_killed_device_finishes_its_upload_from_the_outbox(fake, tmp_path) -> None:
    folder = tmp_path / "dev"
    proc = await spawn(fake, folder, "--chunk-size", "1024", "--partition-id", "1",
                       "--num-partitions", "20")
    device_id, node_id = await joined_device(fake)
    payload = train_payload(node_id, codec="none")
    tid = fake.add_task(device_id, payload, run_id=11, round_=1, run_config_json=RUN_CONFIG)
    fake.stall_after[tid] = 8192
    await fake.wait_until(lambda: tid in fake.stalled, 60)
    proc.kill()  # SIGKILL, mid-upload
    await proc.wait()
    assert len(DeviceFolder(folder).outbox()) == 1

    proc = await spawn(fake, folder, "--chunk-size", "1024")
    await fake.wait_until(lambda: tid in fake.results, 60)
    assert await stop_process(proc) == 0  # SIGTERM: a clean exit

    result = fake.results[tid]
    upload = fake.uploads[tid]
    assert upload.header_offsets == [0, 8192]  # the restarted device resumed at the offset
    assert upload.received - len(result) < len(result) / 2
    assert fake.join_requests[-1].device_id == device_id  # same identity after the restart
    assert DeviceFolder(folder).outbox() == []
    decode_reply(result)
    log = folder.with_suffix(".log").read_text()
    assert "resuming its upload from the outbox" in log and "Traceback" not in log


async def test_context_state_survives_a_restart(fake, tmp_path) -> None:
    folder = tmp_path / "dev"
    ref = "test_edge_runtime:residual_app"
    seen = []
    for round_ in (1, 2):  # a new EdgeDevice (a restarted runtime) for each round
        device = make_device(fake.address, folder, client_app_ref=ref)
        async with running(device):
            payload = train_payload(device.session.node_id, round_=round_)
            tid = fake.add_task(device.identity.device_id, payload, run_id=11, round_=round_)
            await fake.wait_until(lambda tid=tid: tid in fake.results, 60)
        reply = decode_reply(fake.results[tid])
        assert list(reply.content["arrays"].keys()) == [UPDATE_KEY]
        seen.append(reply.content["metrics"]["seen-residual"])
        if round_ == 1:
            stored = context_from_bytes(DeviceFolder(folder).context_path(11).read_bytes())
            residual = stored.state.array_records[RESIDUAL_STATE_KEY]
            residual_sum = float(sum(np.abs(a.numpy()).sum() for a in residual.values()))
    assert seen[0] == -1.0  # round 1: no residual yet
    assert residual_sum > 0
    assert seen[1] == pytest.approx(residual_sum, rel=1e-6)  # round 2 found round 1's residual


async def test_stock_flower_client_app_trains_via_the_cli(fake, tmp_path) -> None:
    folder = tmp_path / "dev"
    proc = await spawn(fake, folder, "--app", "test_edge_runtime:stock_app", cwd=TESTS)
    try:
        device_id, node_id = await joined_device(fake)
        # what the device's fedge can encode, whichever app it runs; the reply below shows
        # that a stock app runs as it is defined (no mod is added to it)
        assert list(fake.join_requests[0].capabilities.codecs) == list(DEVICE_CODECS)
        payload = train_payload(node_id)
        tid = fake.add_task(device_id, payload, run_id=11, round_=1, run_config_json=RUN_CONFIG)
        await fake.wait_until(lambda: tid in fake.results, 60)
    finally:
        assert await stop_process(proc) == 0
    reply = decode_reply(fake.results[tid])
    arrays = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    assert arrays.keys() == GLOBAL.keys()  # a plain ArrayRecord of full weights
    assert any(not np.allclose(arrays[k], GLOBAL[k]) for k in arrays)  # trained
    assert reply.content["metrics"]["num-examples"] == 200


async def test_unauthenticated_makes_the_device_join_again(fake, tmp_path) -> None:
    device = make_device(fake.address, tmp_path / "dev")
    async with running(device):
        first_node = device.session.node_id
        fake.drop_sessions()
        await fake.wait_until(lambda: len(fake.join_requests) >= 2, 10)
        tid = fake.add_task(device.identity.device_id, train_payload(first_node), run_id=11,
                            round_=1, run_config_json=RUN_CONFIG)
        await fake.wait_until(lambda: tid in fake.results, 60)
    ids = {j.device_id for j in fake.join_requests}
    assert ids == {device.identity.device_id}  # the same identity every time
    assert device.session.node_id == first_node


async def test_device_backs_off_and_rejoins_a_restarted_coordinator(fake, tmp_path) -> None:
    device = make_device(fake.address, tmp_path / "dev")
    async with running(device):
        device_id = device.identity.device_id
        port, devices = fake.port, dict(fake.devices)
        await fake.stop()
        await asyncio.sleep(1.5)  # a few failed attempts while it is gone
        assert device.backoff.failures >= 1
        fresh = FakeCoordinator()
        fresh.devices = devices  # a restarted coordinator remembers devices, not sessions
        await fresh.start(port=port)
        try:
            await fresh.wait_until(lambda: len(fresh.join_requests) >= 1, 15)
            assert fresh.join_requests[0].device_id == device_id
            tid = fresh.add_task(device_id, train_payload(devices[device_id]), run_id=11,
                                 round_=1, run_config_json=RUN_CONFIG)
            await fresh.wait_until(lambda: tid in fresh.results, 60)
        finally:
            device.stop()
            await fresh.stop()


async def test_result_for_a_closed_round_is_dropped(fake, tmp_path) -> None:
    device = make_device(fake.address, tmp_path / "dev")
    async with running(device):
        tid = fake.add_task(device.identity.device_id, train_payload(device.session.node_id),
                            run_id=11, round_=1, run_config_json=RUN_CONFIG)
        await fake.wait_until(lambda: fake.tasks[tid].state == "delivered", 10)
        fake.close_task(tid)
        await fake.wait_until(lambda: len(device.completed) == 1, 60)
    assert tid not in fake.results
    assert device.completed[-1].outcome.startswith("dropped")
    assert device.folder.outbox() == []


async def test_stop_during_training_abandons_the_task_at_once(fake, tmp_path) -> None:
    ref = "test_edge_runtime:slow_app"
    device = make_device(fake.address, tmp_path / "dev", client_app_ref=ref)
    task = asyncio.create_task(device.run())
    session = await asyncio.wait_for(device.wait_joined(), 10)
    fake.add_task(device.identity.device_id, train_payload(session.node_id), run_id=11, round_=1)
    # heartbeats go on while it trains, saying so (DEVICE_STATE_WORKING)
    await fake.wait_until(lambda: any(h.state == 2 for h in fake.heartbeats), 10)
    assert device.worker_busy
    started = time.monotonic()
    device.stop()
    assert await asyncio.wait_for(task, 5) == 0
    assert time.monotonic() - started < 1.0 and device.worker_busy  # not waited for


async def test_revoked_device_stops_with_exit_code_3(fake, tmp_path) -> None:
    device = make_device(fake.address, tmp_path / "dev")
    task = asyncio.create_task(device.run())
    await asyncio.wait_for(device.wait_joined(), 10)
    fake.revoked.add(device.identity.device_id)
    assert await asyncio.wait_for(task, 10) == 3


async def test_tls_is_the_default(fake, tmp_path) -> None:
    from fedge.server.tls import ensure_server_tls, server_credentials

    paths = ensure_server_tls(tmp_path / "coord")
    secure = FakeCoordinator()
    await secure.start(credentials=server_credentials(paths))
    try:
        device = make_device(secure.address, tmp_path / "dev", ca_cert=paths.ca_cert,
                             insecure=False)
        async with running(device):
            assert device.session.node_id
        # without the coordinator's CA the device cannot join (and keeps retrying)
        untrusting = make_device(secure.address, tmp_path / "dev2", insecure=False)
        task = asyncio.create_task(untrusting.run())
        await asyncio.sleep(1.0)
        assert untrusting.session is None and untrusting.backoff.failures >= 1
        untrusting.stop()
        assert await asyncio.wait_for(task, 5) == 0
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
