"""`fedge bench flower`: what fedge's two lines cost a Flower app on Flower's simulation runtime.

The example app (`examples/fashion-mnist-pytorch`) runs twice under `flwr run`
on the same SuperLink (`flower-superlink --simulation`, started here on free
loopback ports, its own FLWR_HOME), with the same seeds, rounds and clients:
once as written (fedge's compression mod and strategy wrapper), once with
fedge's two lines taken out again (`without_fedge`). Reported:

- `wall_ratio`: wall time of `flwr run --stream` (submit to the run's end),
  with fedge / without (goal: at most 1.05); `app_ratio` the same for the
  ServerApp's own time (its start to the last round's evaluation).
- `uplink_ratio`: uplink bytes per round, with / without, as the example's
  ServerApp counted them from the replies it received (the bytes of every
  array a reply carried: fedge's int8 update, or the fp32 weights).
- each run's final accuracy.

The SuperLink, and whatever it started, is stopped by its process group id
(it runs in a session of its own); nothing else is touched. The helpers here
also serve `tests/test_example_app.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = REPO / "examples" / "fashion-mnist-pytorch"

#: the example's lines that are fedge: the import on each side, and the use on each side
FEDGE_IMPORT = "from fedge.flower import"
FEDGE_CLIENT = ("ClientApp(mods=[compression_mod])", "ClientApp()")
FEDGE_SERVER = "strategy = Compressed("


def without_fedge(src: Path, dest: Path) -> Path:
    """A copy of the example app with fedge's two lines per side taken out (a plain Flower app)."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    removed = 0
    for path in (dest / "fmnist_example").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        lines = []
        for line in text.splitlines(keepends=True):
            if line.lstrip().startswith((FEDGE_IMPORT, FEDGE_SERVER)):
                removed += 1
                continue
            if FEDGE_CLIENT[0] in line:
                removed += 1
                line = line.replace(*FEDGE_CLIENT)
            lines.append(line)
        path.write_text("".join(lines), encoding="utf-8")
    if removed != 4:
        raise RuntimeError(f"expected fedge's 2 lines on each side of the example, found {removed}")
    return dest


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (held together while chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower's commands: offline, no telemetry, its own FLWR_HOME, this venv."""
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_HOME=str(flwr_home),
        PYTHONUNBUFFERED="1",
        RAY_DISABLE_USAGE_STATS="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra or {})
    return env


def flower_bin(name: str) -> str:
    """A Flower console script of this interpreter's environment."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


@dataclass
class Process:
    """A child in its own session: stopped by its process group id (it and what it started)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self, grace_s: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        # children of the group that outlived its leader (Ray workers, app processes)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)


def start(name: str, argv: list[str], env: Mapping[str, str], logs: Path,
          cwd: Path | None = None) -> Process:
    """Start `argv` in a session of its own, output to `logs/<name>.log`."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=dict(env),
                                 cwd=cwd, start_new_session=True)
    return Process(name, popen, log)


def wait_port(port: int, proc: Process, timeout_s: float) -> None:
    """Until something accepts on 127.0.0.1:`port` (RuntimeError if `proc` exits first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n"
                               f"{proc.output()[-3000:]}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name}: nothing listens on {port} after {timeout_s:.0f} s")


@dataclass
class SuperLink:
    """A running `flower-superlink` and the `flwr` connection that reaches it."""

    process: Process
    connection: str
    fleet_address: str
    env: dict[str, str]


@contextlib.contextmanager
def superlink(workdir: Path, *, simulation: bool, timeout_s: float = 60.0) -> Iterator[SuperLink]:
    """`flower-superlink --insecure` on free loopback ports, with a FLWR_HOME naming it.

    `simulation=True` runs Flower's simulation runtime (`--simulation`): the
    run's ClientApps are Ray actors, `num-supernodes` of them. Otherwise it is
    the deployment runtime, waiting for SuperNodes on `fleet_address`.
    """
    home = workdir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (http,) = free_ports(1)  # Flower 1.42: Control, Fleet and ServerAppIo APIs all on HTTP
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "bench"\n\n'
        f'[superlink.bench]\naddress = "127.0.0.1:{http}"\ninsecure = true\n',
        encoding="utf-8",
    )
    env = flower_env(home)
    argv = [flower_bin("flower-superlink"), "--insecure", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(http),
            "--database", str(workdir / "superlink.db")]
    if simulation:
        argv.append("--simulation")
    proc = start("superlink", argv, env, workdir / "logs", cwd=workdir)
    try:
        wait_port(http, proc, timeout_s)
        yield SuperLink(proc, "bench", f"127.0.0.1:{http}", env)
    finally:
        proc.stop()


def toml_value(value: Any) -> str:
    """A run-config value as `--run-config` takes it (TOML)."""
    return json.dumps(value) if isinstance(value, str) else str(value).lower() \
        if isinstance(value, bool) else str(value)


def flwr_run(
    link: SuperLink,
    app_dir: Path,
    run_config: Mapping[str, Any],
    *,
    federation_config: str = "",
    timeout_s: float = 600.0,
    logs: Path,
    name: str = "flwr-run",
) -> float:
    """`flwr run APP --stream` against `link` until the run ends; returns its wall seconds.

    The app is copied first: `flwr run` may rewrite an app's pyproject.toml
    (it migrates a legacy federation table), and the example stays as written.
    """
    work = Path(tempfile.mkdtemp(prefix="app-", dir=logs))
    app = work / app_dir.name
    shutil.copytree(app_dir, app, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pairs = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
    argv = [flower_bin("flwr"), "run", str(app), link.connection, "--stream",
            "--run-config", pairs]
    if federation_config:
        argv += ["--federation-config", federation_config]
    started = time.monotonic()
    proc = start(name, argv, link.env, logs, cwd=work)
    try:
        code = proc.popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"flwr run did not finish in {timeout_s:.0f} s:\n"
                           f"{proc.output()[-3000:]}") from None
    finally:
        proc.stop()
    wall = time.monotonic() - started
    if code != 0 or "Strategy execution finished" not in proc.output():
        raise RuntimeError(f"flwr run failed ({code}):\n{proc.output()[-4000:]}\n"
                           f"superlink:\n{link.process.output()[-3000:]}")
    return wall


def read_rounds(path: Path) -> list[dict[str, Any]]:
    """The example ServerApp's per-round lines (round 0 is the initial evaluation)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def example_config(metrics: Path, *, rounds: int, samples: int, seed: int = 0,
                   test_samples: int = 1000) -> dict[str, Any]:
    """The run config every runtime gets: same seed, rounds and data sizes."""
    return {"num-server-rounds": rounds, "samples-per-client": samples, "seed": seed,
            "test-samples": test_samples, "metrics-path": str(metrics)}


def run_simulation(link: SuperLink, app_dir: Path, workdir: Path, *, clients: int, rounds: int,
                   samples: int, timeout_s: float = 600.0, tag: str = "sim"
                   ) -> tuple[float, list[dict[str, Any]]]:
    """One `flwr run` of the example on `link` (simulation): wall seconds and round lines."""
    metrics = workdir / f"{tag}-rounds.jsonl"
    metrics.unlink(missing_ok=True)
    wall = flwr_run(link, app_dir, example_config(metrics, rounds=rounds, samples=samples),
                    federation_config=f"num-supernodes={clients}", timeout_s=timeout_s,
                    logs=workdir / "logs", name=f"flwr-run-{tag}")
    return wall, read_rounds(metrics)


def summary(wall: float, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    trained = [r for r in rounds if r["round"] > 0]
    uplink = sum(r["uplink-bytes"] for r in trained)
    fp32 = sum(r["fp32-bytes"] for r in trained)
    return {
        "wall_s": round(wall, 2),
        "app_s": trained[-1]["seconds"] if trained else None,
        "final_accuracy": trained[-1]["accuracy"] if trained else None,
        "uplink_bytes_per_round": uplink // max(1, len(trained)),
        "uplink_vs_fp32": round(uplink / fp32, 4) if fp32 else None,
        "rounds": len(trained),
    }


def measure(*, clients: int, rounds: int, samples: int, workdir: Path,
            timeout_s: float = 900.0) -> dict[str, Any]:
    """Both runs on one simulation SuperLink; the JSON object `main` prints."""
    plain = without_fedge(EXAMPLE_DIR, workdir / "plain" / EXAMPLE_DIR.name)
    with superlink(workdir, simulation=True) as link:
        wall_plain, rounds_plain = run_simulation(link, plain, workdir, clients=clients,
                                                  rounds=rounds, samples=samples,
                                                  timeout_s=timeout_s, tag="plain")
        wall_fedge, rounds_fedge = run_simulation(link, EXAMPLE_DIR, workdir, clients=clients,
                                                  rounds=rounds, samples=samples,
                                                  timeout_s=timeout_s, tag="fedge")
    with_fedge, without = summary(wall_fedge, rounds_fedge), summary(wall_plain, rounds_plain)
    return {
        "bench": "flower",
        "app": str(EXAMPLE_DIR.relative_to(REPO)),
        "runtime": "flwr run on flower-superlink --simulation (Ray)",
        "clients": clients,
        "rounds": rounds,
        "samples_per_client": samples,
        "with_fedge": with_fedge,
        "without_fedge": without,
        "wall_ratio": round(wall_fedge / wall_plain, 3),
        "app_ratio": round(with_fedge["app_s"] / without["app_s"], 3)
        if with_fedge["app_s"] and without["app_s"] else None,
        "uplink_ratio": round(with_fedge["uplink_bytes_per_round"]
                              / max(1, without["uplink_bytes_per_round"]), 4),
        "wall_ratio_goal": 1.05,
    }


def main(*, json_output: bool = False, clients: int = 4, rounds: int = 3, samples: int = 300,
         timeout_s: float = 900.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedge-flower-bench-") as tmp:
        result = measure(clients=clients, rounds=rounds, samples=samples, workdir=Path(tmp),
                         timeout_s=timeout_s)
    if json_output:
        print(json.dumps(result, indent=2))
    else:
        print(f"with fedge: {result['with_fedge']}\nwithout:    {result['without_fedge']}\n"
              f"wall ratio {result['wall_ratio']} (goal <= 1.05), "
              f"uplink ratio {result['uplink_ratio']}")
    return result
