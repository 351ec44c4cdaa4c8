"""`fedge bench transport`: what the coordinator's gRPC path costs, measured on 127.0.0.1.

Three figures, one JSON object:

Devices get in as real ones do: each holds a certificate from the coordinator's
CA and its registry row (`fedge.bench.bench_devices`), connects with mutual TLS
and signs every result it pushes (`fedge.common.signing`).

1. **ingest**: devices (default 50, one mTLS connection each, all at once) each
   pull a task and push its result, several times over. The result is a real
   int8 update of the FedAvg paper's CNN (1,663,370 parameters: about 1.7 MB
   as a Flower reply message), sent in the coordinator's chunking. The same
   client code runs against (a) the real servicer, `CoordinatorService` with
   its store, upload files, hash and signature checks, reply validation and a `GrpcGrid`
   that hands every reply to a consumer thread, and (b) a bare grpc.aio
   server (same mutual TLS) that only reads the chunks and answers. Each server is its own
   child process, one after the other; the ratio (a)/(b) of payload MB/s is
   the servicer's overhead (bar: at least 0.5).
2. **idle**: `fedge coordinator run` (mutual TLS, a run waiting for more
   devices than will come) in a child process, with 500 enrolled devices joined
   and long-polling on their own connections; its RSS (psutil) before and after
   (bar: 400 MB).
3. **edge**: `fedge.bench.edge_footprint` (device RSS while waiting and peak
   while training the CNN on 600 samples; bars: 200 MB waiting, and a peak
   while training no higher than a bare torch loop's in the same run).

Every child is started and stopped (by its own handle) here, and bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fedge.bench.bench_devices import BenchDevice, enroll_devices

INGEST_RATIO_BAR = 0.5
IDLE_RSS_BAR_MB = 400
_MB = 1_000_000


# ------------------------------------------------------------------ payloads


def cnn_update_content() -> tuple[bytes, int]:
    """(content fragment of a Flower train reply holding an int8 CNN update, update bytes).

    A real update: the CNN's initial weights moved by a small random step, the
    delta encoded by fedge's codec (int8), as the compression mod sends it.
    """
    import numpy as np
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from fedge.common.arrays import model_to_arrays
    from fedge.common.contract import UPDATE_KEY
    from fedge.common.flower_compat import ProtoMessage, recorddict_to_proto
    from fedge.common.models import FedAvgCNN
    from fedge.common.update_codec import encode_update

    rng = np.random.default_rng(0)
    weights = model_to_arrays(FedAvgCNN(seed=0))
    delta = {k: (0.01 * rng.standard_normal(a.shape)).astype(a.dtype) for k, a in weights.items()}
    update, _ = encode_update(delta, "int8", run_id="1", round=1, num_examples=600)
    data = np.frombuffer(update.SerializeToString(), dtype=np.uint8)
    content = RecordDict(
        {
            "arrays": ArrayRecord({UPDATE_KEY: Array(data.copy())}),
            "metrics": MetricRecord({"num-examples": 600, "train-loss": 0.5}),
        }
    )
    return ProtoMessage(content=recorddict_to_proto(content)).SerializeToString(), data.nbytes


def reply_payload(task_payload: bytes, content: bytes) -> bytes:
    """A Flower reply to the task message: the shared content fragment + this reply's metadata."""
    from flwr.app import Message, RecordDict

    from fedge.common import flower_compat as fc

    task = fc.message_from_bytes(task_payload)
    reply = Message(RecordDict(), reply_to=task)
    return content + fc.message_parts(reply)[1]


# ------------------------------------------------------------------ servers (child processes)


def _serve_coordinator(state: Path, devices: int, tasks: int, chunk: int) -> None:
    """The real servicer and Grid; pushes `tasks` tasks per device once all have joined."""
    from fedge.server.coordinator_service import CoordinatorService, ServiceSettings
    from fedge.server.fleet import Fleet
    from fedge.server.flower_compat import set_task_identity
    from fedge.server.grpc_grid import GrpcGrid
    from fedge.server.model_store import ModelStore
    from fedge.server.store import Store

    async def main() -> None:
        import grpc
        from flwr.app import ConfigRecord, Message, RecordDict

        from fedge.server.tls import ensure_server_tls, server_credentials
        from fedge.v1 import coordinator_pb2_grpc as pb_grpc

        store = Store.open(state / "fedge.db")
        models = ModelStore(state / "models")
        run_id = 4242
        store.create_run(run_id, {"task": "bench"})
        fleet = Fleet(heartbeat_interval_s=30.0)
        fleet.bind_loop(asyncio.get_running_loop())
        service = CoordinatorService(
            store, fleet, models, state / "uploads",
            settings=ServiceSettings(chunk_size=chunk, max_result_bytes=64 << 20),
            mtls=True,
        )
        grid = GrpcGrid(store, fleet, run_id=run_id, default_timeout=600.0)
        server = grpc.aio.server()
        pb_grpc.add_CoordinatorServicer_to_server(service, server)
        port = server.add_secure_port(
            "127.0.0.1:0", server_credentials(ensure_server_tls(state), require_client_auth=True)
        )
        await server.start()
        print(f"PORT {port}", flush=True)
        await asyncio.to_thread(grid.wait_for_nodes, devices, poll_s=0.05)
        set_task_identity(run_id)
        content = RecordDict({"config": ConfigRecord({"server-round": 1})})
        messages = [
            Message(content, node, "train")
            for _ in range(tasks)
            for node in fleet.live_node_ids()
        ]

        def consume() -> int:  # the ServerApp's side: every reply decoded, then dropped
            return sum(1 for _ in grid.send_and_receive(messages, timeout=600))

        received = await asyncio.to_thread(consume)
        print(f"DONE {json.dumps({'replies': received})}", flush=True)
        await asyncio.to_thread(sys.stdin.read)
        await server.stop(None)
        store.close()

    asyncio.run(main())


def _serve_echo(state: Path, chunk: int) -> None:
    """A bare grpc.aio server on the same service and TLS: reads chunks, answers, keeps nothing."""
    from fedge.common.chunking import sha256_hex

    async def main() -> None:
        import grpc
        from flwr.app import ConfigRecord, Message, RecordDict

        from fedge.common import flower_compat as fc
        from fedge.server.flower_compat import set_task_identity
        from fedge.server.tls import ensure_server_tls, server_credentials
        from fedge.v1 import coordinator_pb2 as pb
        from fedge.v1 import coordinator_pb2_grpc as pb_grpc

        set_task_identity(4242)
        task = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), 2, "train")
        fc.set_message_id(task, "0" * 32)
        payload = fc.message_to_bytes(task)
        header = pb.TaskEnvelope(task_id="0" * 32, run_id=4242, round=1, message_type="train",
                                 total_size=len(payload), sha256=sha256_hex(payload))

        class Echo(pb_grpc.CoordinatorServicer):
            async def Join(self, request, context):
                return pb.JoinReply(device_id=request.device_id or "d", node_id=2,
                                    session_token="t", chunk_size=chunk)

            async def PullTask(self, request, context) -> AsyncIterator[pb.TaskChunk]:
                yield pb.TaskChunk(header=header)
                yield pb.TaskChunk(data=pb.Chunk(offset=0, data=payload))

            async def PushResult(self, request_iterator, context):
                held = 0
                async for msg in request_iterator:
                    if msg.WhichOneof("part") == "data":
                        held += len(msg.data.data)
                return pb.PushResultReply(accepted=True, offset=held)

        server = grpc.aio.server()
        pb_grpc.add_CoordinatorServicer_to_server(Echo(), server)
        port = server.add_secure_port(
            "127.0.0.1:0", server_credentials(ensure_server_tls(state), require_client_auth=True)
        )
        await server.start()
        print(f"PORT {port}", flush=True)
        await asyncio.to_thread(sys.stdin.read)
        await server.stop(None)

    asyncio.run(main())


# ------------------------------------------------------------------ devices (this process)


async def _ingest(target: str, ca: bytes, devices: list[BenchDevice], tasks: int,
                  content: bytes, chunk: int) -> tuple[float, int]:
    """All devices join (mutual TLS), then pull+push `tasks` signed results each at once;
    (seconds, payload bytes)."""
    import grpc

    from fedge.common.chunking import iter_chunks, sha256_hex
    from fedge.common.contract import FLOWER_MESSAGE_FORMAT
    from fedge.common.signing import sign_result
    from fedge.v1 import coordinator_pb2 as pb
    from fedge.v1 import coordinator_pb2_grpc as pb_grpc

    channels = [grpc.aio.secure_channel(target, d.credentials(ca)) for d in devices]
    stubs = [pb_grpc.CoordinatorStub(c) for c in channels]
    keys = [d.private_key() for d in devices]
    tokens = []
    for d, stub in zip(devices, stubs, strict=True):
        reply = await stub.Join(pb.JoinRequest(device_id=d.device_id, device_name="bench"))
        tokens.append(reply.session_token)
    sent = 0

    async def device(stub: Any, token: str, key: Any) -> None:
        nonlocal sent
        for _ in range(tasks):
            header, parts = None, []
            async for c in stub.PullTask(pb.PullTaskRequest(session_token=token, wait_s=30)):
                if c.WhichOneof("part") == "header":
                    header = c.header
                else:
                    parts.append(c.data.data)
            assert header is not None, "no task within 30 s"
            payload = reply_payload(b"".join(parts), content)
            digest = sha256_hex(payload)
            signature = sign_result(key, run_id=header.run_id, round=header.round,
                                    task_id=header.task_id, payload_sha256=digest)

            async def stream(h=header, p=payload, sha=digest,
                             sig=signature) -> AsyncIterator[pb.ResultChunk]:
                yield pb.ResultChunk(header=pb.ResultHeader(
                    session_token=token, task_id=h.task_id, run_id=h.run_id, round=h.round,
                    total_size=len(p), sha256=sha, signature=sig,
                    payload_format=FLOWER_MESSAGE_FORMAT))
                for off, view in iter_chunks(p, chunk):
                    yield pb.ResultChunk(data=pb.Chunk(offset=off, data=bytes(view)))

            ack = await stub.PushResult(stream(), timeout=120)
            assert ack.accepted, ack
            sent += len(payload)

    started = time.perf_counter()
    await asyncio.gather(*(device(s, t, k) for s, t, k in zip(stubs, tokens, keys, strict=True)))
    seconds = time.perf_counter() - started
    for c in channels:
        await c.close()
    return seconds, sent


def _spawn_server(args: list[str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedge.bench.transport_bench", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(),
    )
    assert proc.stdout is not None
    line = _read_line(proc, "PORT ", 120)
    return proc, int(line.split()[1])


def _read_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    """The child's next stdout line starting with `prefix` (bounded in time)."""
    result: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(prefix):
                result.append(line.strip())
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise RuntimeError(f"child {proc.pid} printed no {prefix!r} line in {timeout:.0f} s")
    return result[0]


def _finish(proc: subprocess.Popen[str]) -> None:
    """Close the child's stdin (its signal to stop), then make sure it is gone."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def measure_ingest(
    devices: int = 50, tasks: int = 8, chunk: int = 1 << 20, repeats: int = 2
) -> dict[str, Any]:
    """Payload MB/s through the real servicer vs the bare echo, same clients, same bytes.

    The two servers take turns `repeats` times and each keeps its best run, so
    a burst of load from elsewhere on the machine does not decide the ratio.
    Server CPU seconds per payload GB are reported too (load-independent).
    """
    import psutil

    from fedge.server.tls import ensure_server_tls

    content, update_bytes = cnn_update_content()
    out: dict[str, Any] = {
        "devices": devices,
        "pushes_per_device": tasks,
        "update": "int8 FedAvgCNN delta (1,663,370 parameters)",
        "update_bytes": update_bytes,
        "chunk_size": chunk,
        "transport": "mutual TLS, one connection per device, signed results, 127.0.0.1",
        "repeats": repeats,
    }
    runs: dict[str, list[dict[str, float]]] = {"coordinator": [], "echo": []}
    with tempfile.TemporaryDirectory(prefix="fedge-transport-") as tmp:
        enrolled = Path(tmp) / "enrolled"  # one CA and one registry for every server
        fleet = enroll_devices(enrolled, devices)
        tls = ensure_server_tls(enrolled)
        ca = tls.ca_cert.read_bytes()
        for attempt in range(repeats):
            for mode in ("coordinator", "echo"):
                state = Path(tmp) / f"{mode}-{attempt}"
                state.mkdir()
                os.symlink(tls.ca_cert.parent, state / "tls")
                for db in enrolled.glob("fedge.db*"):  # the devices' registry rows
                    shutil.copy(db, state / db.name)
                args = ["serve", mode, "--state", str(state), "--devices", str(devices),
                        "--tasks", str(tasks), "--chunk", str(chunk)]
                proc, port = _spawn_server(args)
                try:
                    server = psutil.Process(proc.pid)
                    cpu0 = sum(server.cpu_times()[:2])
                    seconds, sent = asyncio.run(
                        _ingest(f"127.0.0.1:{port}", ca, fleet, tasks, content, chunk)
                    )
                    cpu = sum(server.cpu_times()[:2]) - cpu0
                    if mode == "coordinator":
                        done = json.loads(_read_line(proc, "DONE ", 120)[5:])
                        assert done["replies"] == devices * tasks, done
                finally:
                    _finish(proc)
                runs[mode].append({"seconds": round(seconds, 3),
                                   "mb_s": round(sent / seconds / _MB, 1),
                                   "server_cpu_s_per_gb": round(cpu / (sent / 1e9), 2)})
                out["payload_bytes"] = sent // (devices * tasks)
    for mode, results in runs.items():
        best = max(results, key=lambda r: r["mb_s"])
        out[f"{mode}_mb_s"] = best["mb_s"]
        out[f"{mode}_server_cpu_s_per_gb"] = min(r["server_cpu_s_per_gb"] for r in results)
        out[f"{mode}_runs"] = results
    out["ratio"] = round(out["coordinator_mb_s"] / out["echo_mb_s"], 3)
    out["bar"] = INGEST_RATIO_BAR
    out["ok"] = out["ratio"] >= INGEST_RATIO_BAR
    return out


# ------------------------------------------------------------------ idle devices


async def _idle_devices(
    target: str, ca: bytes, devices: list[BenchDevice], settle_s: float,
    sample: Callable[[], int],
) -> tuple[int, int]:
    """`devices` join on their own mTLS connections and long-poll; once all have joined and
    `settle_s` has passed, `sample()` is taken. Returns (devices joined, the sample)."""
    import grpc

    from fedge.v1 import coordinator_pb2 as pb
    from fedge.v1 import coordinator_pb2_grpc as pb_grpc

    count = len(devices)
    channels = [grpc.aio.secure_channel(target, d.credentials(ca)) for d in devices]
    handshakes = asyncio.Semaphore(50)  # TLS handshakes in waves, not 500 at once
    joined = 0

    async def device(i: int, channel: Any) -> None:
        nonlocal joined
        stub = pb_grpc.CoordinatorStub(channel)
        async with handshakes:
            reply = await stub.Join(
                pb.JoinRequest(device_id=devices[i].device_id, device_name="idle"), timeout=120
            )
        joined += 1
        while True:  # long-poll, as a waiting device does
            async for _ in stub.PullTask(
                pb.PullTaskRequest(session_token=reply.session_token, wait_s=20.0)
            ):
                pass

    tasks = [asyncio.create_task(device(i, c)) for i, c in enumerate(channels)]
    deadline = time.monotonic() + 180
    while joined < count:
        failed = [t for t in tasks if t.done()]
        if failed:
            failed[0].result()  # raises what went wrong
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {joined} of {count} devices joined in 180 s")
        await asyncio.sleep(0.2)
    await asyncio.sleep(settle_s)
    value = sample()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in channels:
        await c.close()
    return joined, value


def measure_idle(count: int = 500, settle_s: float = 5.0) -> dict[str, Any]:
    """RSS of `fedge coordinator run` before and with `count` idle devices connected."""
    import psutil

    with tempfile.TemporaryDirectory(prefix="fedge-idle-") as tmp:
        state = Path(tmp) / "state"
        devices = enroll_devices(state, count)
        cmd = [sys.executable, "-c", "from fedge.cli import app; app()", "coordinator", "run",
               "--state", str(state), "--port", "0", "--min-devices", str(count + 1),
               "--heartbeat-interval", "30"]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=_env())
        try:
            port = int(_read_line(proc, "listening on ", 120).rsplit(":", 1)[1])
            ca = (state / "tls" / "ca.pem").read_bytes()
            time.sleep(1.0)
            ps = psutil.Process(proc.pid)
            before = ps.memory_info().rss
            t0 = time.perf_counter()
            connected, after = asyncio.run(
                _idle_devices(f"127.0.0.1:{port}", ca, devices, settle_s,
                              lambda: ps.memory_info().rss)
            )
            seconds = time.perf_counter() - t0
            hwm = _hwm(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    return {
        "devices": connected,
        "transport": "mutual TLS, one connection per device, long-polling, 127.0.0.1",
        "coordinator_rss_mb_before": round(before / _MB, 1),
        "coordinator_rss_mb": round(after / _MB, 1),
        "coordinator_peak_rss_mb": hwm,
        "per_device_kb": round((after - before) / max(connected, 1) / 1e3, 1),
        "seconds": round(seconds, 1),
        "bar_mb": IDLE_RSS_BAR_MB,
        "ok": after / _MB <= IDLE_RSS_BAR_MB,
    }


def _hwm(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / _MB, 1)
    except OSError:
        return None
    return None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


# ------------------------------------------------------------------ entry points


def run(devices: int = 50, pushes: int = 8, idle: int = 500, edge: bool = True,
        repeats: int = 2, settle_s: float = 5.0) -> dict[str, Any]:
    """All three figures as one JSON-ready dict."""
    result: dict[str, Any] = {
        "ingest": measure_ingest(devices, pushes, repeats=repeats),
        "idle": measure_idle(idle, settle_s=settle_s),
    }
    if edge:
        from fedge.bench.edge_footprint import edge_footprint

        result["edge"] = edge_footprint()
    result["ok"] = all(part.get("ok", False) for part in result.values())
    return result


def main(json_output: bool = True, devices: int = 50, pushes: int = 8, idle: int = 500,
         edge: bool = True, repeats: int = 2) -> dict[str, Any]:
    """Print one JSON object (indented unless `json_output`) and return it."""
    result = run(devices, pushes, idle, edge, repeats)
    print(json.dumps(result, indent=None if json_output else 2))
    return result


def _child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="fedge.bench.transport_bench")
    parser.add_argument("cmd", choices=["serve"])
    parser.add_argument("mode", choices=["coordinator", "echo"])
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=1 << 20)
    args = parser.parse_args(argv)
    if args.mode == "coordinator":
        _serve_coordinator(args.state, args.devices, args.tasks, args.chunk)
    else:
        _serve_echo(args.state, args.chunk)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
