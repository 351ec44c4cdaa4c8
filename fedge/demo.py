"""`fedge demo`: the README's main job, a real federation on this machine's loopback.

It starts what a user would start by hand, as separate processes: one
`fedge coordinator run` (TLS on, its own CA), enrolls three devices with a
one-time token each (what `fedge coordinator token create` and `fedge enroll`
do; the tokens are never printed or logged), then starts three
`fedge client run` devices that call with their device certificates (mutual
TLS) and sign their results, on digits with int8 updates for 5 rounds. The
coordinator's per-round lines are relayed as they come; at the end the
rounds are read back from the coordinator's SQLite and shown as a table.
Every process it started is stopped by pid (SIGTERM, then SIGKILL); nothing
else is touched. Exits non-zero if any part failed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import typer

from fedge.common.cli_options import LogLevel, log_level_option

_LISTEN = re.compile(r"^listening on (\S+):(\d+)$")
_CA = re.compile(r"^TLS on: devices need --ca (.+)$")
_ENROLL = re.compile(r"^enrollment on (\S+):(\d+)$")
_CLI = "from fedge.cli import app; app()"


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)


def fedge_command(*args: str) -> list[str]:
    """The argv that runs `fedge ARGS...` with this interpreter (no PATH lookup)."""
    return [sys.executable, "-c", _CLI, *args]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def _relay(proc: _Proc, echo: bool, log_path: Path | None) -> None:
    """Read a child's output line by line: keep it, echo it, log it."""
    assert proc.popen.stdout is not None
    log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
    try:
        for raw in proc.popen.stdout:
            line = raw.rstrip("\n")
            proc.lines.append(line)
            if log is not None:
                log.write(raw)
                log.flush()
            if echo:
                print(f"  {proc.name} | {line}", flush=True)
    finally:
        if log is not None:
            log.close()


def start(
    name: str,
    argv: list[str],
    *,
    echo: bool,
    log_path: Path | None,
    env: Mapping[str, str] | None = None,
) -> _Proc:
    """Start a child process whose output is relayed (echoed, logged, kept) line by line."""
    popen = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env(env),
        start_new_session=True,  # a Ctrl-C in the terminal reaches the demo, which stops them
    )
    proc = _Proc(name, popen)
    threading.Thread(target=_relay, args=(proc, echo, log_path), daemon=True).start()
    return proc


def stop(procs: list[_Proc], grace_s: float = 5.0) -> None:
    """SIGTERM each process we started (by pid), then SIGKILL what is left after `grace_s`."""
    for p in procs:
        if p.popen.poll() is None:
            p.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait(5)


def wait_for_line(proc: _Proc, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
    """The first output line of `proc` matching `pattern` (RuntimeError on exit or timeout)."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        while seen < len(proc.lines):
            match = pattern.match(proc.lines[seen])
            seen += 1
            if match:
                return match
        if proc.popen.poll() is not None and seen >= len(proc.lines):
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name}: no line matching {pattern.pattern!r} in {timeout:.0f} s")


def demo_run_config(devices: int, rounds: int) -> dict[str, str | int | float]:
    """What the demo's coordinator runs: digits, int8 updates, every device in every round."""
    return {"task": "digits", "codec": "int8", "num-rounds": rounds,
            "min-train-nodes": devices, "round-timeout": 60.0}


def run_demo(out: Path, *, devices: int = 3, rounds: int = 5, timeout_s: float = 110.0,
             log_level: LogLevel = LogLevel.WARNING) -> int:
    """Run the demo; returns the exit code (0 when every round completed, 2 for a run
    config that cannot run: refused before anything starts)."""
    from fedge.server.run_config import RunConfigError, validate_run_config

    started = time.monotonic()
    config = demo_run_config(devices, rounds)
    try:
        validate_run_config(config)
    except RunConfigError as e:
        print(f"fedge demo: {e}", file=sys.stderr, flush=True)
        return 2
    # devices log to files only: keep at least their info lines there for a post-mortem
    device_log_level = LogLevel.DEBUG if log_level is LogLevel.DEBUG else LogLevel.INFO
    out = out.resolve()
    for sub in ("coordinator", "devices", "logs"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    state = out / "coordinator"
    print(f"fedge demo: 1 coordinator + {devices} devices on 127.0.0.1, digits, int8, "
          f"{rounds} rounds (logs in {out / 'logs'})", flush=True)
    procs: list[_Proc] = []
    ok = False
    try:
        coordinator = start(
            "coordinator",
            fedge_command(
                "coordinator", "run", "--state", str(state), "--host", "127.0.0.1",
                "--port", "0", "--task", str(config["task"]), "--codec", str(config["codec"]),
                "--rounds", str(rounds), "--min-devices", str(devices),
                "--min-train-nodes", str(devices),
                "--round-timeout", str(config["round-timeout"]),
                "--heartbeat-interval", "2", "--log-level", log_level.value,
            ),
            echo=True,
            log_path=out / "logs" / "coordinator.log",
        )
        procs.append(coordinator)
        ca = wait_for_line(coordinator, _CA, 60).group(1)
        wait_for_line(coordinator, _LISTEN, 60)
        enroll_at = wait_for_line(coordinator, _ENROLL, 60)
        enrolled = enroll_devices(
            state, f"{enroll_at.group(1)}:{enroll_at.group(2)}", Path(ca),
            [out / "devices" / f"device-{i}" for i in range(devices)],
        )
        print(f"  enrolled {devices} devices with one-time tokens: "
              f"{', '.join(d[:12] for d in enrolled)}", flush=True)
        for i in range(devices):
            name = f"device-{i}"
            procs.append(
                start(
                    name,
                    fedge_command(  # enrolled: its device port, mTLS, signed results
                        "client", "run",
                        "--data", str(out / "devices" / name), "--name", name,
                        "--partition-id", str(i), "--num-partitions", str(devices),
                        "--log-level", device_log_level.value,
                    ),
                    echo=False,
                    log_path=out / "logs" / f"{name}.log",
                )
            )
        print(f"  started {devices} devices (pids "
              f"{', '.join(str(p.popen.pid) for p in procs[1:])}) trusting {ca}", flush=True)
        remaining = timeout_s - (time.monotonic() - started)
        try:
            code = coordinator.popen.wait(max(1.0, remaining))
        except subprocess.TimeoutExpired:
            print(f"fedge demo: the run did not finish within {timeout_s:.0f} s", flush=True)
            return 1
        failed = [p.name for p in procs[1:] if p.popen.poll() not in (None, 0)]
        ok = code == 0 and not failed
        if code != 0:
            print(f"fedge demo: the coordinator exited with {code}", flush=True)
        for name in failed:
            print(f"fedge demo: {name} exited early (see {out / 'logs' / name}.log)", flush=True)
    except RuntimeError as e:
        print(f"fedge demo: {e}", flush=True)
        return 1
    except KeyboardInterrupt:
        print("fedge demo: interrupted; stopping what it started", flush=True)
        return 130
    finally:
        stop(procs)
    table_ok = _print_rounds(state, rounds)
    print(f"fedge demo: {'done' if ok and table_ok else 'FAILED'} in "
          f"{time.monotonic() - started:.1f} s; all {len(procs)} processes stopped", flush=True)
    return 0 if ok and table_ok else 1


def enroll_devices(state: Path, enroll_target: str, ca: Path, folders: list[Path]) -> list[str]:
    """Enroll each data folder with its own one-time token; returns the device ids.

    Tokens are made in the coordinator's store (what `fedge coordinator token
    create` does; SQLite lets a second process in) and handed to `enroll` in
    memory: never printed, logged, or put on a command line.
    """
    from fedge.client.enroll import enroll
    from fedge.server.store import Store
    from fedge.server.tokens import TokenBook

    ca_pem = ca.read_bytes()
    ids = []
    for folder in folders:
        with Store.open(state / "fedge.db") as store:
            issued = TokenBook(store).create(ttl_s=300, uses=1, label=f"demo {folder.name}")
        creds = enroll(enroll_target, issued.token, ca_pem, data_dir=folder, name=folder.name)
        ids.append(creds.device_id)
    return ids


def _print_rounds(state: Path, rounds: int) -> bool:
    """Print the run's rounds from SQLite; True if all `rounds` completed."""
    from fedge.server.store import RoundStatus, Store

    db = state / "fedge.db"
    if not db.exists():
        return False
    with Store.open(db) as store:
        runs = store.list_runs()
        if not runs:
            return False
        done = [r for r in store.list_rounds(runs[-1].id) if r.status == RoundStatus.COMPLETED]
    header = f"{'round':>5}  {'accuracy':>8}  {'uplink':>10}  {'downlink':>10}  devices"
    print(header, flush=True)
    for r in done:
        m = r.metrics
        acc = "n/a" if m.accuracy is None else f"{m.accuracy:.4f}"
        print(f"{r.round:>5}  {acc:>8}  {m.uplink_bytes:>10,}  {m.downlink_bytes:>10,}  "
              f"{len(r.contributors)} contributed, {len(r.dropped)} dropped", flush=True)
    return len(done) == rounds


def demo_command(
    out: Path = typer.Option(Path("fedge-out/demo"), help="Folder for state and logs."),
    log_level: LogLevel = log_level_option(LogLevel.WARNING),
) -> None:
    """The main job: a coordinator and 3 devices on loopback (TLS, digits, int8, 5 rounds)."""
    code = run_demo(out, log_level=log_level)
    if code:
        raise typer.Exit(code)
