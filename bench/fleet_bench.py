"""`fedge bench fleet`: one coordinator and a fleet of light devices, on 127.0.0.1.

Issue 14 asks what one coordinator holds. Three figures, one JSON object:

1. **idle**: a real `fedge coordinator run` process (mutual TLS, a run that
   waits for more devices than will come) while the fleet grows through
   several sizes; at each size every device has joined on its own mTLS
   connection, heartbeats at the interval the coordinator asks for and
   long-polls for a task. Reported per size: the coordinator's RSS, how long
   that step of devices took to join, and the coordinator's CPU while they
   idle (percent of one core, over `window_s`: 60 s by default, because a
   fleet's heartbeats and polls come in waves and a few seconds see one wave
   or none). `marginal_kb_per_device` is the RSS slope
   between the smallest and the largest size.
2. **round**: one round of the digits MLP with every device taking part
   (int8 updates). The devices are light in-bench clients that speak the real
   protocol: certificates from the coordinator's CA, the generated
   `fedge.v1` stubs, a Flower reply to the very task, an update encoded by
   fedge's codec, signed with the device key (`fedge.common.signing`). The
   store is read afterwards: each accepted update is counted exactly once
   (one complete result per device and task, the round's contributors
   without repeats and equal to the acknowledged results). The coordinator's
   peak RSS is its kernel high-water mark.
3. **storm**: the same fleet in a two-round run; while round 1's uploads
   arrive the coordinator process gets `kill -9`, is restarted on the same
   state folder and port, and every device rejoins with jittered exponential
   backoff (`fedge.client.backoff`); the run resumes at the interrupted round
   and ends. Checked in SQLite: no device's update missing from a completed
   round (`lost`), none counted twice (`double_counted`).

The client side runs in several processes (`DEVICES_PER_WORKER` devices
each, asyncio inside); every process, the coordinator included, is started
here, stopped by its own handle (the coordinator's kill -9 by its pid), and
every wait is bounded in time. Devices are enrolled in bulk by
`fedge.bench.bench_devices` (the CA code enrollment uses).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.bench.bench_devices import BenchDevice, enroll_devices, load, save

DEFAULT_IDLE_SIZES = (1000, 5000, 10000)
DEFAULT_ROUND_DEVICES = 1000
DEFAULT_STORM_DEVICES = 1000
DEVICES_PER_WORKER = 500
HEARTBEAT_S = 30.0
"""The coordinator's heartbeat interval in this bench: a fleet of thousands, not a lab. It is
the floor: the coordinator stretches the interval it announces as the fleet grows
(`fedge.server.fleet.HEARTBEATS_PER_S`), and the devices follow each reply, as real ones do."""
POLL_WAIT_S = 120.0
"""How long a device's long poll asks to wait: the edge runtime's own `poll_wait_s`."""
IDLE_RSS_KB_GOAL = 100
IDLE_CPU_PERCENT_GOAL = 25.0
REJOIN_SECONDS_GOAL = 60.0
_MB = 1_000_000


# ------------------------------------------------------------------ the coordinator process


class Coordinator:
    """`fedge coordinator run` as a child process; its output lines are kept for `wait_line`."""

    def __init__(self, state: Path, args: Sequence[str], port: int = 0) -> None:
        cmd = [sys.executable, "-c", "from fedge.cli import app; app()", "coordinator", "run",
               "--state", str(state), "--port", str(port), *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=_env())
        self.lines: list[str] = []
        self.times: list[float] = []  # time.monotonic() each line arrived
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            line = self.wait_line("listening on ", 120)
        except RuntimeError:
            self.stop()
            raise
        self.port = int(line.rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self.times.append(time.monotonic())
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, needle: str, timeout: float, start: int = 0) -> str:
        """The first output line (from index `start`) containing `needle`; bounded in time."""
        return self.lines[self.wait_index(needle, timeout, start)]

    def wait_index(self, needle: str, timeout: float, start: int = 0) -> int:
        """Index of the first output line (from `start`) containing `needle`; bounded in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(start, len(self.lines)):
                    if needle in self.lines[i]:
                        return i
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._more()):
                    tail = "\n".join(self.lines[-15:])
                    raise RuntimeError(f"coordinator printed no {needle!r} in time:\n{tail}")
                self._cond.wait(min(left, 0.5))

    def _more(self) -> bool:
        return bool(self.proc.stdout and not self.proc.stdout.closed and self.proc.poll() is None)

    def rss_mb(self) -> float:
        import psutil

        return round(psutil.Process(self.proc.pid).memory_info().rss / _MB, 1)

    def cpu_seconds(self) -> float:
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    def peak_rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) * 1024 / _MB, 1)
        except OSError:
            return None
        return None

    def kill9(self) -> None:
        """`kill -9` of this coordinator, by its pid."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PYTHONUNBUFFERED="1")
    return env


# ------------------------------------------------------------------ device worker processes


@dataclass
class FleetEvents:
    """What the device workers reported, merged (wall-clock times)."""

    joins: dict[int, list[float]] = field(default_factory=dict)
    acks: list[tuple[int, int, str, bool]] = field(default_factory=list)  # idx, round, task, dup
    errors: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def joined_since(self, since: float) -> dict[int, float]:
        """Device index -> its first join at or after `since`."""
        with self.cond:
            out = {}
            for idx, times in self.joins.items():
                later = [t for t in times if t >= since]
                if later:
                    out[idx] = min(later)
            return out

    def wait(self, what: Callable[[], bool], timeout: float, label: str) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not what():
                left = deadline - time.monotonic()
                if left <= 0:
                    errors = "; ".join(self.errors[-5:])
                    raise RuntimeError(f"{label}: not within {timeout:.0f} s ({errors})")
                self.cond.wait(min(left, 0.5))


class Workers:
    """Client processes, each running its share of the devices (asyncio inside)."""

    def __init__(self, events: FleetEvents, log_dir: Path) -> None:
        self.events = events
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, target: str, ca: Path, devices_file: Path, first: int, count: int,
              mode: str, push_delay_s: float = 0.0, per_worker: int = DEVICES_PER_WORKER) -> None:
        for lo in range(first, first + count, per_worker):
            n = min(per_worker, first + count - lo)
            cmd = [sys.executable, "-m", "fedge.bench.fleet_bench", "devices",
                   "--target", target, "--ca", str(ca), "--devices", str(devices_file),
                   "--first", str(lo), "--count", str(n), "--mode", mode,
                   "--push-delay", str(push_delay_s)]
            with open(self.log_dir / f"devices-{lo}.log", "ab") as log:
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=log, text=True, env=_env())
            self.procs.append(proc)
            threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            kind, _, rest = line.strip().partition(" ")
            with self.events.cond:
                if kind == "J":
                    idx, t = rest.split()
                    self.events.joins.setdefault(int(idx), []).append(float(t))
                elif kind == "A":
                    idx, rnd, task, dup = rest.split()
                    self.events.acks.append((int(idx), int(rnd), task, dup == "1"))
                elif kind == "E":
                    self.events.errors.append(rest)
                self.events.cond.notify_all()

    def wait(self, what: Callable[[], bool], timeout: float, label: str) -> None:
        """`events.wait`, with the workers' own error output in the message if it fails."""
        try:
            self.events.wait(what, timeout, label)
        except RuntimeError as e:
            tails = [
                f"{log.name}: {' | '.join(log.read_text(errors='replace').splitlines()[-3:])}"
                for log in sorted(self.log_dir.glob("devices-*.log")) if log.stat().st_size
            ]
            raise RuntimeError("; ".join([str(e), *tails[:3]])) from None

    def stop(self) -> None:
        """Close each worker's stdin (its signal to stop), then make sure it is gone."""
        for proc in self.procs:
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.procs.clear()


def _reply_bytes(task_payload: bytes | bytearray, device_seed: int) -> bytes:
    """A Flower reply to a train task: an int8 delta of the task's global model, encoded as
    the compression mod encodes it (the caller signs it)."""
    import numpy as np
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.app import Message as FlowerMessage

    from fedge.common.contract import BASE_VERSION_KEY, CODEC_KEY, RUN_ID_KEY, UPDATE_KEY
    from fedge.common.flower_compat import message_from_bytes, message_to_bytes
    from fedge.common.update_array import pack_update
    from fedge.common.update_codec import encode_update

    task = message_from_bytes(bytes(task_payload))
    cfg = task.content["config"]
    arrays = task.content["arrays"]
    rnd = int(cfg["server-round"])
    rng = np.random.default_rng([device_seed, rnd])
    delta = {}
    for k, a in arrays.items():
        g = a.numpy()
        delta[k] = (0.001 * rng.standard_normal(g.shape)).astype(g.dtype) if g.dtype.kind == "f" \
            else np.zeros_like(g)
    update, _ = encode_update(
        delta, str(cfg.get(CODEC_KEY, "int8")), run_id=str(cfg.get(RUN_ID_KEY, "")), round=rnd,
        base_version=str(cfg.get(BASE_VERSION_KEY, "")), num_examples=20,
    )
    content = RecordDict({
        "arrays": ArrayRecord({UPDATE_KEY: pack_update(update.SerializeToString())}),
        "metrics": MetricRecord({"num-examples": 20, "train-loss": 1.0}),
    })
    return message_to_bytes(FlowerMessage(content, reply_to=task))


async def _device(idx: int, dev: BenchDevice, target: str, ca: bytes, mode: str,
                  push_delay_s: float, stop: asyncio.Event, handshakes: asyncio.Semaphore) -> None:
    """One light device: join, heartbeat, long-poll; in `train` mode answer train tasks.

    A broken link or a coordinator that forgot the session: back off with full
    jitter (`Backoff`) and join again, as the edge runtime does.
    """
    import grpc

    from fedge.client.backoff import Backoff
    from fedge.client.edge_session import open_channel
    from fedge.common.chunking import iter_chunks, sha256_hex
    from fedge.common.contract import FLOWER_MESSAGE_FORMAT
    from fedge.common.signing import sign_result
    from fedge.v1 import coordinator_pb2 as pb
    from fedge.v1 import coordinator_pb2_grpc as pb_grpc

    channel = open_channel(target, ca_pem=None, insecure=False,
                           credentials=dev.credentials(ca), reconnect_backoff=(0.5, 10.0))
    stub = pb_grpc.CoordinatorStub(channel)
    key = dev.private_key() if mode == "train" else None
    backoff = Backoff(0.5, 10.0, random.Random(idx))
    first = True
    try:
        while not stop.is_set():
            try:
                if first:
                    async with handshakes:  # the first wave of TLS handshakes, paced
                        join = await stub.Join(pb.JoinRequest(
                            device_id=dev.device_id, device_name=f"fleet-{idx}",
                            protocol_version=1), timeout=120)
                    first = False
                else:
                    join = await stub.Join(pb.JoinRequest(
                        device_id=dev.device_id, device_name=f"fleet-{idx}",
                        protocol_version=1), timeout=30)
                print(f"J {idx} {time.time():.3f}", flush=True)
                backoff.reset()
                token = join.session_token
                beat = asyncio.create_task(_heartbeats(stub, token, join.heartbeat_interval_s))
                try:
                    while not stop.is_set():
                        header, parts = None, []
                        async for c in stub.PullTask(pb.PullTaskRequest(
                                session_token=token, wait_s=POLL_WAIT_S)):
                            if c.WhichOneof("part") == "header":
                                header = c.header
                            else:
                                parts.append(c.data.data)
                        if header is None or mode != "train" or header.message_type != "train":
                            continue
                        payload = _reply_bytes(b"".join(parts), idx)
                        if push_delay_s:
                            await asyncio.sleep(random.uniform(0, push_delay_s))
                        digest = sha256_hex(payload)
                        assert key is not None
                        sig = sign_result(key, run_id=header.run_id, round=header.round,
                                          task_id=header.task_id, payload_sha256=digest)

                        async def stream(h=header, p=payload, d=digest, s=sig, tok=token):
                            yield pb.ResultChunk(header=pb.ResultHeader(
                                session_token=tok, task_id=h.task_id, run_id=h.run_id,
                                round=h.round, total_size=len(p), sha256=d, signature=s,
                                payload_format=FLOWER_MESSAGE_FORMAT))
                            for off, view in iter_chunks(p, 1 << 20):
                                yield pb.ResultChunk(data=pb.Chunk(offset=off, data=bytes(view)))

                        ack = await stub.PushResult(stream(), timeout=120)
                        if ack.accepted:
                            print(f"A {idx} {header.round} {header.task_id} "
                                  f"{int(ack.duplicate)}", flush=True)
                finally:
                    beat.cancel()
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                    print(f"E {idx} revoked", flush=True)
                    return
                if e.code() != grpc.StatusCode.UNAUTHENTICATED:  # session lost: join at once
                    await asyncio.sleep(backoff.next_delay())
    finally:
        await channel.close()


async def _heartbeats(stub: Any, token: str, interval_s: float) -> None:
    from fedge.v1 import coordinator_pb2 as pb

    while True:
        await asyncio.sleep(interval_s or HEARTBEAT_S)
        with contextlib.suppress(Exception):  # the main loop notices a broken link
            reply = await stub.Heartbeat(pb.HeartbeatRequest(session_token=token, state=1),
                                         timeout=30)
            interval_s = reply.heartbeat_interval_s or interval_s  # as the edge runtime does


async def _run_devices(args: argparse.Namespace) -> None:
    if args.mode == "train":  # imported before joining: a device has its libraries loaded
        import flwr.app  # noqa: F401

        import fedge.common.update_codec  # noqa: F401
    devices = load(args.devices)[args.first : args.first + args.count]
    ca = Path(args.ca).read_bytes()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.read(1) else None)
    handshakes = asyncio.Semaphore(25)
    tasks = [
        asyncio.create_task(_device(args.first + i, d, args.target, ca, args.mode,
                                    args.push_delay, stop, handshakes))
        for i, d in enumerate(devices)
    ]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------------ the three figures


def _coordinator_args(min_devices: int, rounds: int, extra: Sequence[str] = ()) -> list[str]:
    return ["--task", "digits", "--codec", "int8", "--rounds", str(rounds),
            "--min-devices", str(min_devices), "--heartbeat-interval", str(HEARTBEAT_S),
            "--round-timeout", "600", *extra]


def _at_least(joins: dict[int, list[float]], n: int) -> Callable[[], bool]:
    return lambda: len(joins) >= n


def _fleet(tmp: Path, count: int) -> tuple[Path, Path, Path]:
    """(state folder, CA file, devices file) with `count` devices enrolled."""
    state = tmp / "state"
    devices_file = tmp / "devices.json"
    save(enroll_devices(state, count, label="fleet"), devices_file)
    return state, state / "tls" / "ca.pem", devices_file


def measure_idle(sizes: Sequence[int], settle_s: float = 5.0, window_s: float = 60.0,
                 per_worker: int = DEVICES_PER_WORKER) -> dict[str, Any]:
    """The coordinator's RSS, join time and idle CPU at each fleet size (growing)."""
    sizes = sorted(set(sizes))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedge-fleet-idle-") as t:
        state, ca, devices_file = _fleet(Path(t), sizes[-1])
        coord = Coordinator(state, _coordinator_args(sizes[-1] + 1, 1))
        events = FleetEvents()
        workers = Workers(events, Path(t))
        try:
            time.sleep(1.0)
            base_rss = coord.rss_mb()
            have = 0
            for size in sizes:
                t0 = time.time()
                workers.start(f"127.0.0.1:{coord.port}", ca, devices_file, have, size - have,
                              "idle", per_worker=per_worker)
                workers.wait(_at_least(events.joins, size), 120 + size / 20,
                            f"{size} devices joined")
                join_s = max(min(v) for k, v in events.joins.items() if k >= have) - t0
                have = size
                time.sleep(settle_s)
                cpu0, w0 = coord.cpu_seconds(), time.monotonic()
                time.sleep(window_s)
                cpu = (coord.cpu_seconds() - cpu0) / (time.monotonic() - w0)
                rows.append({"devices": size, "coordinator_rss_mb": coord.rss_mb(),
                             "join_seconds": round(join_s, 2),
                             "idle_cpu_percent": round(100 * cpu, 1)})
        finally:
            workers.stop()
            coord.stop()
    lo, hi = rows[0], rows[-1]
    if hi["devices"] > lo["devices"]:
        marginal = (hi["coordinator_rss_mb"] - lo["coordinator_rss_mb"]) * 1000 / (
            hi["devices"] - lo["devices"])
    else:
        marginal = (hi["coordinator_rss_mb"] - base_rss) * 1000 / hi["devices"]
    return {"idle": rows, "coordinator_rss_mb_without_devices": base_rss,
            "marginal_kb_per_device": round(marginal, 1)}


def _store_counts(state: Path, rounds: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Per round: complete results (task, device) and the round's contributors, from SQLite."""
    from fedge.server.store import ResultStatus, Store

    out: dict[int, dict[str, Any]] = {}
    with Store.open(state / "fedge.db") as store:
        run = store.list_runs()[-1]
        for rnd in rounds:
            row = store.get_round(run.id, rnd)
            results = store.list_results(run.id, rnd, ResultStatus.COMPLETE)
            out[rnd] = {
                "status": None if row is None else str(row.status),
                "contributors": [] if row is None else list(row.contributors),
                "complete": [(r.task_id, r.device_id) for r in results],
            }
    return out


def measure_round(devices: int, per_worker: int = DEVICES_PER_WORKER,
                  timeout_s: float = 900.0) -> dict[str, Any]:
    """One round with every device; exactly-once counting checked in the store."""
    with tempfile.TemporaryDirectory(prefix="fedge-fleet-round-") as t:
        state, ca, devices_file = _fleet(Path(t), devices)
        coord = Coordinator(state, _coordinator_args(devices, 1, ["--keep-serving"]))
        events = FleetEvents()
        workers = Workers(events, Path(t))
        try:
            workers.start(f"127.0.0.1:{coord.port}", ca, devices_file, 0, devices, "train",
                          per_worker=per_worker)
            workers.wait(lambda: len(events.joins) >= devices, 120 + devices / 20,
                        f"{devices} devices joined")
            started = coord.wait_index("round 1 of 1 starts", 60)
            ended = coord.wait_index("round 1/1", timeout_s)
            wall = coord.times[ended] - coord.times[started]
            said = re.search(r"([0-9.]+) s$", coord.lines[ended])  # the round's own clock
            seconds = float(said.group(1)) if said else wall
            peak = coord.peak_rss_mb()
        finally:
            workers.stop()
            coord.stop()
        counts = _store_counts(state, [1])[1]
    acked = {(task, idx) for idx, rnd, task, dup in events.acks if rnd == 1 and not dup}
    contributors = counts["contributors"]
    complete = counts["complete"]
    counted_once = (
        len(contributors) == len(set(contributors))
        and len(complete) == len({d for _, d in complete}) == len({t for t, _ in complete})
        and set(contributors) == {d for _, d in complete}
        and len(acked) == len(complete)
    )
    return {"devices": devices, "accepted": len(complete), "counted_once": counted_once,
            "seconds": round(seconds, 2), "wall_seconds": round(wall, 2),
            "updates_per_s": round(len(complete) / seconds, 1) if seconds > 0 else None,
            "coordinator_peak_rss_mb": peak}


def measure_storm(devices: int, per_worker: int = DEVICES_PER_WORKER, push_delay_s: float = 5.0,
                  timeout_s: float = 900.0) -> dict[str, Any]:
    """kill -9 of the coordinator during round 1, a restart, the fleet rejoins, the run ends."""
    with tempfile.TemporaryDirectory(prefix="fedge-fleet-storm-") as t:
        state, ca, devices_file = _fleet(Path(t), devices)
        coord = Coordinator(state, _coordinator_args(devices, 2))
        port = coord.port
        events = FleetEvents()
        workers = Workers(events, Path(t))
        try:
            workers.start(f"127.0.0.1:{port}", ca, devices_file, 0, devices, "train",
                          push_delay_s=push_delay_s, per_worker=per_worker)
            workers.wait(lambda: len(events.joins) >= devices, 120 + devices / 20,
                        f"{devices} devices joined")
            half = max(1, devices // 2)  # kill while round 1's uploads arrive
            workers.wait(lambda: sum(1 for a in events.acks if a[1] == 1) >= half, timeout_s,
                        "half of round 1's uploads")
            acked_before_kill = sum(1 for a in events.acks if a[1] == 1)
            coord.kill9()
            killed_at = time.time()
            coord = Coordinator(state, _coordinator_args(devices, 2), port=port)
            restarted_at = time.time()
            workers.wait(lambda: len(events.joined_since(killed_at)) >= devices,
                        REJOIN_SECONDS_GOAL * 3, f"{devices} devices rejoined")
            rejoined = events.joined_since(killed_at)
            coord.wait_line("round 2/2", timeout_s)
            coord.proc.wait(60)
        finally:
            workers.stop()
            coord.stop()
        counts = _store_counts(state, [1, 2])
    lost = double = 0
    for rnd in (1, 2):
        contributors = counts[rnd]["contributors"]
        double += len(contributors) - len(set(contributors))
        lost += devices - len(set(contributors))
    return {"devices": devices, "rejoined": len(rejoined),
            "rejoin_seconds": round(max(rejoined.values()) - restarted_at, 2),
            "killed_after_acks": acked_before_kill,
            "lost": lost, "double_counted": double,
            "rounds_completed": sum(1 for c in counts.values() if c["status"] == "completed")}


def run(idle_sizes: Sequence[int] = DEFAULT_IDLE_SIZES, round_devices: int = DEFAULT_ROUND_DEVICES,
        storm_devices: int = DEFAULT_STORM_DEVICES, per_worker: int = DEVICES_PER_WORKER,
        settle_s: float = 5.0, window_s: float = 60.0, push_delay_s: float = 5.0) -> dict[str, Any]:
    """All three figures as one JSON-ready dict, with the issue's goals checked."""
    from fedge.server.admission import DEFAULT_JOINS_PER_S
    from fedge.server.fleet import HEARTBEATS_PER_S

    idle = measure_idle(idle_sizes, settle_s, window_s, per_worker)
    out: dict[str, Any] = {
        "idle": idle["idle"],
        "marginal_kb_per_device": idle["marginal_kb_per_device"],
        "coordinator_rss_mb_without_devices": idle["coordinator_rss_mb_without_devices"],
    }
    if round_devices:
        out["round"] = measure_round(round_devices, per_worker)
    if storm_devices:
        out["storm"] = measure_storm(storm_devices, per_worker, push_delay_s)
    top = out["idle"][-1]
    checks = {
        "idle_all_held": top["devices"] == max(idle_sizes),
        "idle_kb_per_device": out["marginal_kb_per_device"] <= IDLE_RSS_KB_GOAL,
        "idle_cpu_percent": max(r["idle_cpu_percent"] for r in out["idle"])
        <= IDLE_CPU_PERCENT_GOAL,
    }
    if "round" in out:
        checks["round_counted_once"] = bool(out["round"]["counted_once"]) and (
            out["round"]["accepted"] == round_devices)
    if "storm" in out:
        s = out["storm"]
        checks["storm_rejoined"] = s["rejoined"] == storm_devices and (
            s["rejoin_seconds"] <= REJOIN_SECONDS_GOAL)
        checks["storm_exactly_once"] = s["lost"] == 0 and s["double_counted"] == 0
    out["goals"] = {"idle_kb_per_device": IDLE_RSS_KB_GOAL,
                    "idle_cpu_percent": IDLE_CPU_PERCENT_GOAL,
                    "rejoin_seconds": REJOIN_SECONDS_GOAL}
    out["checks"] = checks
    out["ok"] = all(checks.values())
    out["heartbeat_interval_s"] = HEARTBEAT_S
    out["max_heartbeats_per_s"] = HEARTBEATS_PER_S  # past HEARTBEAT_S x this, the interval grows
    out["long_poll_s"] = POLL_WAIT_S
    out["joins_per_s"] = DEFAULT_JOINS_PER_S
    out["transport"] = "mutual TLS, one connection per device, signed results, 127.0.0.1"
    return out


def main(json_output: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Print one JSON object (indented unless `json_output`) and return it."""
    result = run(**kwargs)
    print(json.dumps(result, indent=None if json_output else 2))
    return result


def _child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="fedge.bench.fleet_bench")
    parser.add_argument("cmd", choices=["devices"])
    parser.add_argument("--target", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--devices", type=Path, required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--mode", choices=["idle", "train"], required=True)
    parser.add_argument("--push-delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    asyncio.run(_run_devices(args))


if __name__ == "__main__":
    _child_main(sys.argv[1:])

