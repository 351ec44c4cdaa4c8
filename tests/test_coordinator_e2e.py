"""End to end with real processes on 127.0.0.1: `fedge coordinator run` and `fedge client run`.

What a user runs, as separate processes, TLS on (the coordinator's own CA):
- 3 devices x 3 rounds (one of them a stock Flower ClientApp) reach the accuracy of the
  same ServerApp on the in-process Grid;
- `kill -9` of the coordinator after round 2 and a restart finish the run at round 3,
  rounds 1-2 untouched in SQLite;
- a device killed mid-upload and restarted resumes from the coordinator's offset;
- a device that never comes back holds its round no longer than the round timeout.
"""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from fedge.demo import _Proc, enroll_devices, fedge_command, start, stop, wait_for_line
from fedge.server.store import Round, RoundStatus, RunStatus, Store

TESTS = Path(__file__).parent
ENV = {"PYTHONPATH": str(TESTS)}  # e2e_apps, importable by coordinator and devices
LISTEN = re.compile(r"^listening on (\S+):(\d+)$")
CA = re.compile(r"^TLS on: devices need --ca (.+)$")
ENROLL = re.compile(r"^enrollment on (\S+):(\d+)$")

pytestmark = pytest.mark.timeout(240)


class Fleet:
    """The processes of one test; every one is stopped (by pid) when the test ends."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[_Proc] = []
        self.coordinator: _Proc | None = None
        self.target = ""
        self.ca = ""
        self.enroll_target = ""

    def start_coordinator(self, *args: str, port: int = 0) -> _Proc:
        argv = fedge_command(
            "coordinator", "run", "--state", str(self.tmp / "state"), "--port", str(port),
            "--heartbeat-interval", "2", "--enroll-port", "0", *args,
        )
        proc = start("coordinator", argv, echo=False, log_path=self.tmp / "coordinator.log",
                     env=ENV)
        self.procs.append(proc)
        self.coordinator = proc
        self.ca = wait_for_line(proc, CA, 90).group(1)
        listen = wait_for_line(proc, LISTEN, 90)
        self.target = f"{listen.group(1)}:{listen.group(2)}"
        enroll_at = wait_for_line(proc, ENROLL, 90)
        self.enroll_target = f"{enroll_at.group(1)}:{enroll_at.group(2)}"
        return proc

    def start_device(self, name: str, *args: str, target: str | None = None,
                     env: dict[str, str] | None = None) -> _Proc:
        if not (self.tmp / name / "identity" / "enrollment.json").exists():
            # TLS mode: a device joins with the certificate it enrolled for (one-time token)
            enroll_devices(self.tmp / "state", self.enroll_target, Path(self.ca),
                           [self.tmp / name])
        argv = fedge_command(
            "client", "run", "--coordinator", target or self.target, "--ca", self.ca,
            "--data", str(self.tmp / name), "--name", name, "--max-backoff", "2", *args,
        )
        proc = start(name, argv, echo=False, log_path=self.tmp / f"{name}.log",
                     env={**ENV, **(env or {})})
        self.procs.append(proc)
        return proc

    def wait_coordinator(self, timeout: float) -> int:
        assert self.coordinator is not None
        return self.coordinator.popen.wait(timeout)

    def rounds(self) -> tuple[list[Round], RunStatus]:
        with Store.open(self.tmp / "state" / "fedge.db") as store:
            run = store.list_runs()[-1]
            return store.list_rounds(run.id), run.status

    def device_id(self, name: str) -> str:
        import json

        return json.loads((self.tmp / name / "device.json").read_text())["device_id"]


@contextmanager
def fleet_of(tmp: Path):
    fleet = Fleet(tmp)
    try:
        yield fleet
    finally:
        stop(fleet.procs)


def _completed(rounds: list[Round]) -> list[int]:
    return [r.round for r in rounds if r.status == RoundStatus.COMPLETED]


# ----------------------------------------------------------------------------- accuracy


def test_three_devices_reach_the_inprocess_accuracy_with_a_stock_app(tmp_path: Path) -> None:
    config = {"task": "digits", "codec": "int8", "num-rounds": 3, "min-train-nodes": 3}
    with fleet_of(tmp_path) as fleet:
        fleet.start_coordinator("--rounds", "3", "--min-devices", "3", "--min-train-nodes", "3",
                                "--codec", "int8", "--round-timeout", "90")
        for i, app in enumerate(["fedge.client.client_app:app"] * 2 + ["e2e_apps:stock_app"]):
            fleet.start_device(f"dev{i}", "--partition-id", str(i), "--num-partitions", "3",
                               "--app", app)
        reference = _inprocess_reference(config)  # meanwhile, the same run in-process
        assert fleet.wait_coordinator(150) == 0
        rounds, status = fleet.rounds()
    assert status == RunStatus.COMPLETED and _completed(rounds) == [1, 2, 3]
    stock_device = fleet.device_id("dev2")
    for got, want in zip(rounds, reference, strict=True):
        assert got.metrics.accepted == 3 and got.metrics.rejected == 0
        assert stock_device in got.contributors and got.dropped == []
        # same apps, data, seeds and codec: only the order of summation may differ
        assert abs(got.metrics.accuracy - want.accuracy) <= 0.01, (got.metrics, want)
    assert rounds[-1].metrics.accuracy > 0.8


def _inprocess_reference(config: dict) -> list:
    import sys

    sys.path.insert(0, str(TESTS))
    from e2e_apps import stock_app

    from fedge.client.client_app import make_client_app
    from fedge.client.compression_mod import compression_mod
    from fedge.server.inprocess_grid import InProcessGrid, run_server_app_inprocess
    from fedge.server.server_app import make_server_app

    fedge_app = make_client_app(mods=[compression_mod])
    records: list = []
    grid = InProcessGrid([fedge_app, fedge_app, stock_app], run_config=config)
    run_server_app_inprocess(make_server_app(listeners=[records.append]), grid)
    return records


# ----------------------------------------------------------------------------- kill -9


def test_kill_9_after_round_2_then_restart_finishes_round_3(tmp_path: Path) -> None:
    with fleet_of(tmp_path) as fleet:
        coordinator = fleet.start_coordinator("--rounds", "3", "--min-devices", "1",
                                              "--min-train-nodes", "1", "--round-timeout", "90")
        port = fleet.target.rsplit(":", 1)[1]
        fleet.start_device("dev0")  # one device is enough: the coordinator is under test
        wait_for_line(coordinator, re.compile(r"^round 2/3:"), 150)
        coordinator.popen.send_signal(signal.SIGKILL)
        coordinator.popen.wait(10)
        before, status = fleet.rounds()
        assert status == RunStatus.RUNNING and _completed(before) == [1, 2]
        with Store.open(tmp_path / "state" / "fedge.db") as store:
            run = store.list_runs()[-1]
            assert run.current_round == 2 and run.model_version == before[1].model_version
        restarted = fleet.start_coordinator("--rounds", "3", "--min-devices", "1",
                                            "--min-train-nodes", "1", "--round-timeout", "90",
                                            port=int(port))
        resumed = wait_for_line(restarted, re.compile(r"^run \d+: resuming after round (\d+) "
                                                      r"\(model ([0-9a-f]{12})\)"), 30)
        assert resumed.group(1) == "2" and before[1].model_version.startswith(resumed.group(2))
        assert fleet.wait_coordinator(120) == 0
        after, status = fleet.rounds()
    assert status == RunStatus.COMPLETED and _completed(after) == [1, 2, 3]
    assert after[:2] == before[:2]  # rounds 1-2 intact: metrics, times, model versions
    with Store.open(tmp_path / "state" / "fedge.db") as store:
        lineage = store.get_model(after[2].model_version)
    assert lineage.parent_version == before[1].model_version and lineage.round == 3
    assert after[2].metrics.accepted == 1 and after[2].contributors == [fleet.device_id("dev0")]
    assert any("round 3/3:" in line for line in restarted.lines)
    assert not any("round 1/3:" in line or "round 2/3:" in line for line in restarted.lines)


# ----------------------------------------------------------------------------- upload


class ThrottledProxy:
    """A TCP relay for one device: device->coordinator bytes at `rate` bytes/s, counted."""

    def __init__(self, target: str, rate: float) -> None:
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        self.rate = rate
        self.upstream = 0  # bytes forwarded to the coordinator
        self.listen_port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._writers: list[asyncio.StreamWriter] = []
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0)
        )
        self.listen_port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self._writers += [writer, up_writer]

        async def pump(src, dst, throttle: bool) -> None:
            try:
                while data := await src.read(8192):
                    if throttle:
                        await asyncio.sleep(len(data) / self.rate)
                        self.upstream += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.listen_port}"

    def cut(self) -> None:
        """Break every relayed connection now, dropping what is in flight (a link that dies)."""
        def abort() -> None:
            for w in self._writers:
                w.transport.abort()
            self._writers.clear()

        self._loop.call_soon_threadsafe(abort)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


def test_device_killed_mid_upload_resumes_from_the_offset(tmp_path: Path) -> None:
    from e2e_apps import BIG_PARAMS

    size = 4 * BIG_PARAMS  # the fp32 update's bytes, the bulk of the reply
    # 64 KiB chunks: a chunk is the unit the coordinator keeps, so a cut mid-way loses < 64 KiB
    with fleet_of(tmp_path) as fleet:
        fleet.start_coordinator("--task", "e2e_apps:BIG_TASK", "--codec", "none",
                                "--rounds", "1", "--min-devices", "1", "--min-train-nodes", "1",
                                "--round-timeout", "120", "--chunk-size", "65536")
        proxy = ThrottledProxy(fleet.target, rate=400_000)
        try:
            device = fleet.start_device("dev0", target=proxy.target)
            deadline = time.monotonic() + 90
            while proxy.upstream < 0.65 * size:  # two thirds of the upload are through
                assert time.monotonic() < deadline and device.popen.poll() is None
                time.sleep(0.005)
            proxy.cut()  # the link and the device die together, mid-upload
            device.popen.send_signal(signal.SIGKILL)
            device.popen.wait(10)
            time.sleep(0.5)  # the coordinator notices the broken stream and keeps the bytes
            first = proxy.upstream
            fleet.start_device("dev0", target=proxy.target)
            assert fleet.wait_coordinator(120) == 0
            resent = proxy.upstream - first
        finally:
            proxy.close()
        rounds, status = fleet.rounds()
        with Store.open(tmp_path / "state" / "fedge.db") as store:
            (result,) = store.list_results(rounds[0].run_id, 1)
    assert status == RunStatus.COMPLETED and rounds[0].contributors == [fleet.device_id("dev0")]
    assert result.total_size > size
    assert resent < 0.5 * result.total_size, (resent, result.total_size)
    log = (tmp_path / "dev0.log").read_text()
    resumed = re.search(r"resumed at (\d+)", log)
    assert resumed and 0.5 * size < int(resumed.group(1)) < 0.8 * size, resumed


# ----------------------------------------------------------------------------- timeout


def test_a_device_that_never_comes_back_does_not_hold_the_round(tmp_path: Path) -> None:
    timeout = 8.0
    with fleet_of(tmp_path) as fleet:
        fleet.start_coordinator("--rounds", "3", "--min-devices", "2", "--min-train-nodes", "1",
                                "--round-timeout", str(timeout))
        fleet.start_device("dev0", "--partition-id", "0", "--num-partitions", "2")
        doomed = fleet.start_device("dev1", "--partition-id", "1", "--num-partitions", "2",
                                    "--app", "e2e_apps:stalling_app",
                                    env={"E2E_STALL_FROM": "3"})
        wait_for_line(fleet.coordinator, re.compile(r"^round 2/3:"), 120)
        time.sleep(1.0)  # it takes its round-3 task, hangs on it, and then dies for good
        doomed.popen.send_signal(signal.SIGKILL)
        assert fleet.wait_coordinator(60) == 0
        rounds, status = fleet.rounds()
    assert status == RunStatus.COMPLETED and _completed(rounds) == [1, 2, 3]
    last = rounds[2]
    # rounds 1-2 may drop a device still starting up (importing torch under load); in round
    # 3 the healthy device answers and the dead one is left out once the timeout passes
    assert last.dropped == [fleet.device_id("dev1")]
    assert last.contributors == [fleet.device_id("dev0")]
    assert timeout - 0.5 <= last.metrics.seconds <= timeout + 5, last.metrics.seconds
    assert last.ended - last.started <= timeout + 5
