"""A run is stored only once the coordinator serves, and run flags never lose silently.

Real `fedge coordinator run` processes on 127.0.0.1 with real SQLite state:
- a port that is taken: exit 2, one line, no run row and no file under --state; the
  corrected rerun starts the run it asks for (not one stored by the failed start);
- a resume whose flags differ from the stored run's: exit 2, one line naming the
  differences and both ways on, nothing changed; the same command without the differing
  flags resumes; `--new-run` starts a new run and stops the old one.
In-process (the real `Coordinator`, one raw-protocol device): a run in which no round
aggregated anything exits 1 and says the first device error in one line.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import subprocess
from pathlib import Path

import pytest
from coordinator_harness import RawDevice

from fedge.common import flower_compat as fc
from fedge.demo import _Proc, child_env, fedge_command, start, stop, wait_for_line
from fedge.server.coordinator import Coordinator, CoordinatorOptions
from fedge.server.run_plan import StartRefused, config_differences, plan_run
from fedge.server.store import Run, RunStatus, Store

pytestmark = pytest.mark.timeout(240)

RUN_LINE = re.compile(r"^run (\d+): (new|resuming after round \d+)")
WAITING = re.compile(r"^waiting for \d+ device")


def _argv(state: Path, *flags: str) -> list[str]:
    # --min-devices 5: no device ever joins, the coordinator waits until it is stopped
    return fedge_command("coordinator", "run", "--state", str(state), "--insecure",
                         "--min-devices", "5", *flags)


def _refused(argv: list[str]) -> list[str]:
    """Run a command that must be refused: exit 2; returns its output lines."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=child_env())
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2, lines
    return lines


def _serve_until_waiting(state: Path, tmp: Path, log: str, *flags: str) -> re.Match[str]:
    """Start a coordinator, read its run line, wait until it serves, then SIGTERM it (exit 0)."""
    proc: _Proc = start("coordinator", _argv(state, "--port", "0", *flags), echo=False,
                        log_path=tmp / log)
    try:
        run = wait_for_line(proc, RUN_LINE, 90)
        wait_for_line(proc, WAITING, 90)
    finally:
        stop([proc])
    assert proc.popen.returncode == 0, proc.lines
    return run


def _snapshot(state: Path) -> tuple[list[Run], dict[str, str]]:
    """The runs in SQLite and every file under the state folder, with its content hash."""
    with Store.open(state / "fedge.db") as store:
        runs = store.list_runs()
    files = {str(p.relative_to(state)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(state.rglob("*")) if p.is_file()}
    return runs, files


def test_a_failed_bind_stores_nothing_and_the_corrected_rerun_is_what_it_asks(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        lines = _refused(_argv(state, "--port", str(port), "--codec", "int8", "--rounds", "1"))
    finally:
        holder.close()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Error: cannot listen on 127.0.0.1:{port} (--port)"), lines
    assert "--port" in lines[0] and "0 picks a free one" in lines[0]
    assert not state.exists() or not any(state.rglob("*"))  # no run row, no file at all
    run = _serve_until_waiting(state, tmp_path, "rerun.log", "--codec", "int4", "--rounds", "3")
    assert run.group(2) == "new"  # not a resume of settings the failed start never stored
    runs, _ = _snapshot(state)
    assert len(runs) == 1 and runs[0].config["codec"] == "int4"
    assert runs[0].config["num-rounds"] == 3


def test_differing_flags_are_refused_the_same_command_resumes_new_run_starts_anew(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    first = _serve_until_waiting(state, tmp_path, "first.log", "--codec", "int4",
                                 "--rounds", "3", "--run-config", "lr=0.05")
    (old,), _ = _snapshot(state)
    assert first.group(1) == str(old.id) and old.status == RunStatus.RUNNING
    before = _snapshot(state)

    lines = _refused(_argv(state, "--port", "0", "--codec", "int8", "--rounds", "3",
                           "--run-config", "lr=0.1"))
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"Error: run {old.id} in {state} was started with "), line
    assert "codec int4" in line and "codec int8" in line
    assert "lr 0.05" in line and "lr 0.1" in line
    assert "num-rounds" not in line  # the same value is no difference
    assert "--new-run" in line and "without --codec, --run-config lr" in line
    assert _snapshot(state) == before  # nothing changed: rows and files

    resumed = _serve_until_waiting(state, tmp_path, "resumed.log", "--rounds", "3")
    assert resumed.group(1) == str(old.id) and resumed.group(2) == "resuming after round 0"
    runs, _ = _snapshot(state)
    assert [r.id for r in runs] == [old.id] and runs[0].config == old.config

    fresh = _serve_until_waiting(state, tmp_path, "new.log", "--codec", "int8", "--new-run")
    assert fresh.group(2) == "new" and fresh.group(1) != str(old.id)
    runs, _ = _snapshot(state)
    by_id = {r.id: r for r in runs}
    assert by_id[old.id].status == RunStatus.STOPPED
    new = by_id[int(fresh.group(1))]
    assert new.status == RunStatus.RUNNING and new.config["codec"] == "int8"


def test_plan_compares_only_the_given_flags(tmp_path: Path) -> None:
    from fedge.server.model_store import ModelStore

    models = ModelStore(tmp_path / "models")
    with Store.open(tmp_path / "fedge.db") as store:
        version = models.put(b"model")
        store.create_run(11, {"codec": "int4", "num-rounds": 3}, model_version=version)
        asked = {"codec": "int8", "num-rounds": 5}
        with pytest.raises(StartRefused) as refused:
            plan_run(store, models, asked, given_flags={"num-rounds": "--rounds"})
        assert refused.value.reason == "run_flags_differ"
        assert "num-rounds 3" in str(refused.value) and "num-rounds 5" in str(refused.value)
        assert "codec" not in str(refused.value) and "without --rounds" in str(refused.value)
        # a flag left at its default is not given: the stored run resumes with its own value
        resumed = plan_run(store, models, {"codec": "int4", "num-rounds": 5},
                           given_flags={"codec": "--codec"})
        assert resumed.run_id == 11 and resumed.resumed_after == 0
        assert resumed.model_version == version and resumed.config["num-rounds"] == 3
        assert [r.id for r in store.list_runs()] == [11]  # planning stores nothing
    diffs = config_differences({"a": 1}, {"a": 1.0, "b": 2}, {"a": "--a", "b": "--b"})
    assert [(key, want) for key, _, want in diffs] == [("b", 2)]  # 1 == 1.0; b is new


async def test_a_run_that_aggregated_nothing_exits_1_with_the_first_device_error(
    tmp_path: Path,
) -> None:
    lines: list[str] = []
    opts = CoordinatorOptions(
        state_dir=tmp_path / "state",
        port=0,
        insecure=True,
        run_config={"task": "digits", "codec": "int8", "num-rounds": 1,
                    "min-train-nodes": 1, "round-timeout": 60.0},
        min_devices=1,
        heartbeat_interval_s=1.0,
        grace_s=0.5,
    )
    coordinator = await Coordinator.start(opts, out=lines.append)
    runner = asyncio.create_task(coordinator.run())
    device = RawDevice(f"127.0.0.1:{coordinator.port}", "broken")
    try:
        await device.join()
        task = await device.pull(30)
        assert task is not None
        # what a device's runtime sends when its ClientApp raises
        reply = fc.error_reply(fc.message_from_bytes(task.payload),
                               "ValueError: unknown partition 'dirichet'\n  (traceback)")
        answer = await device.push(task.envelope, fc.message_to_bytes(reply))
        assert answer.accepted  # a well-formed reply: counted, then dropped by the strategy
        code = await asyncio.wait_for(runner, 120)
    finally:
        await device.close()
        if not runner.done():
            coordinator.request_stop()
            await asyncio.wait_for(runner, 30)
    assert code == 1
    failed = [line for line in lines if "FAILED" in line]
    assert failed == [
        f"run {coordinator.run_id}: FAILED: no round aggregated an update; first device error: "
        f"device {device.device_id} (broken): ValueError: unknown partition 'dirichet' "
        "(traceback)"
    ], lines
