"""`fedge simulate --ray-address`: the virtual clients run on an existing Ray cluster.

A real Ray head on 127.0.0.1 is started here as a child process (its own temp
dir, 2 CPUs, no dashboard) and stopped by its process id -- never `ray stop`,
which ends every Ray process on the machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from flower_processes import REPO, flower_env, free_port, stop_tree, wait_for

pytestmark = pytest.mark.timeout(600)

FEDGE = [sys.executable, "-c", "from fedge.cli import app; app()"]


def _actor_logs(temp_dir: Path) -> set[Path]:
    """Worker logs of the head's session that ran Flower's ClientApp actors."""
    logs = {p.resolve() for p in temp_dir.glob("session_*/logs/worker-*.out")}  # + _latest
    return {p for p in logs if "ClientAppActor" in p.read_text(errors="replace")}


def test_simulate_runs_on_an_existing_ray_cluster(tmp_path: Path) -> None:
    env = flower_env(tmp_path)
    temp_dir = Path(tempfile.mkdtemp(prefix="fr", dir="/tmp"))  # Ray's socket paths are short
    port = free_port()
    log = tmp_path / "ray-head.log"
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
            out_dir = tmp_path / "sim"
            done = subprocess.run(
                [*FEDGE, "simulate", "--clients", "3", "--rounds", "2", "--codec", "int8",
                 "--ray-address", f"127.0.0.1:{port}", "--out", str(out_dir)],
                env=env, cwd=REPO, capture_output=True, text=True, timeout=480,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert head.poll() is None  # the cluster outlives the simulation's driver
            actor_logs = _actor_logs(temp_dir)
        finally:
            stop_tree(head)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    text = done.stdout + done.stderr
    assert "deprecated" not in text.lower(), text
    report = json.loads((out_dir / "report.json").read_text())
    assert report["meta"]["ray_address"] == f"127.0.0.1:{port}"
    (run,) = report["runs"]
    assert [r["round"] for r in run["rounds"]] == [1, 2]
    assert all(r["rejected"] == 0 and r["accepted"] == 3 for r in run["rounds"]), run
    assert run["uplink_codec"] == "int8"
    # the clients trained in the cluster's workers (a fresh local Ray has its own temp dir)
    assert 1 <= len(actor_logs) <= 2, actor_logs  # 2 CPUs: at most 2 actors at a time


def test_a_bad_ray_address_is_refused_before_anything_starts() -> None:
    done = subprocess.run([*FEDGE, "simulate", "--ray-address", "localhost"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "HOST:PORT" in lines[0] and "Traceback" not in done.stderr
