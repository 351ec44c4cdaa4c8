"""Real Flower and Ray processes for end-to-end tests: started here, stopped by process id.

Flower's SuperLink starts `flower-superexec`, which starts `flwr-simulation`,
each found on PATH; Ray's workers run the driver's Python. So the tests put a
folder of small launchers first on PATH, one per console script, each running
this interpreter (the one with this checkout's fedge) -- whatever the scripts
installed next to it point at.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("flwr", "flower-superlink", "flower-superexec", "flwr-simulation", "flwr-serverapp",
           "flwr-clientapp", "flower-supernode", "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launchers(folder: Path) -> Path:
    """`folder` with one launcher per console script, each on this interpreter."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in SCRIPTS:
        (point,) = entry_points(group="console_scripts", name=name)
        module, _, func = point.value.partition(":")
        path = folder / name
        path.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func} as main\n"
                        "sys.exit(main())\n")
        path.chmod(0o755)
    return folder


def flower_env(tmp: Path) -> dict[str, str]:
    """Offline Flower with its own home, launchers first on PATH, no telemetry."""
    env = dict(os.environ)
    env.update({
        "PATH": f"{launchers(tmp / 'bin')}{os.pathsep}{env.get('PATH', '')}",
        "FLWR_HOME": str(tmp / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "PYTHONUNBUFFERED": "1",
    })
    (tmp / "flwr-home").mkdir(parents=True, exist_ok=True)
    return env


def stop_tree(proc: subprocess.Popen) -> None:
    """End `proc`, its process group and every process it started, by their ids."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)  # started with start_new_session: pgid == pid
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(family, timeout=10)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_for(ready, proc: subprocess.Popen, what: str, log: Path, limit_s: float = 120) -> None:
    """Poll `ready()` until true; fail early if `proc` exits (its log in the message)."""
    deadline = time.monotonic() + limit_s
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready after {limit_s:.0f} s:\n{log.read_text()}")
        time.sleep(0.2)


@contextlib.contextmanager
def local_superlink(tmp: Path, env: dict[str, str], name: str = "fedge-test") -> Iterator[str]:
    """A simulation SuperLink on 127.0.0.1 (a child process), named `name` in FLWR_HOME."""
    port = free_port()
    home = Path(env["FLWR_HOME"])
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    log = tmp / "superlink.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
             "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp,
        )
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success
            except httpx.HTTPError:
                return False

        wait_for(healthy, proc, "flower-superlink", log)
        yield name
    finally:
        stop_tree(proc)


@contextlib.contextmanager
def ray_head(tmp: Path, env: dict[str, str]) -> Iterator[tuple[str, Path]]:
    """A Ray head on 127.0.0.1 (2 CPUs, no dashboard, its own temp dir), as a child process;
    yields its address and temp dir, and ends it by process id (never `ray stop`)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="fr", dir="/tmp"))  # Ray's socket paths are short
    port = free_port()
    log = tmp / "ray-head.log"
    try:
        with log.open("wb") as out:
            head = subprocess.Popen(
                [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                 "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                 "--include-dashboard", "false", "--temp-dir", str(temp_dir),
                 "--disable-usage-stats"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            wait_for(lambda: b"Ray runtime started" in log.read_bytes(), head, "ray head", log)
            yield f"127.0.0.1:{port}", temp_dir
            assert head.poll() is None, "the Ray head ended before the test did"
        finally:
            stop_tree(head)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def actor_logs(temp_dir: Path) -> set[Path]:
    """Worker logs of a Ray head's session that ran Flower's ClientApp actors."""
    logs = {p.resolve() for p in temp_dir.glob("session_*/logs/worker-*.out")}  # + _latest
    return {p for p in logs if "ClientAppActor" in p.read_text(errors="replace")}
