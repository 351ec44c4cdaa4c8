"""Simulations on an existing Ray cluster: `fedge simulate --ray-address`, and `flwr run`
with Ray's own `RAY_ADDRESS` in the SuperLink's environment.

A real Ray head on 127.0.0.1 is started here as a child process (its own temp
dir, 2 CPUs, no dashboard) and stopped by its process id -- never `ray stop`,
which ends every Ray process on the machine. That the clients trained on it is
read from its session's worker logs (a fresh local Ray has its own temp dir).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flower_processes import REPO, actor_logs, flower_env, local_superlink, ray_head

from fedge.server.round_metrics import read_round_metrics

pytestmark = pytest.mark.timeout(600)

FEDGE = [sys.executable, "-c", "from fedge.cli import app; app()"]


def test_simulate_runs_on_an_existing_ray_cluster(tmp_path: Path) -> None:
    env = flower_env(tmp_path)
    out_dir = tmp_path / "sim"
    with ray_head(tmp_path, env) as (address, temp_dir):
        done = subprocess.run(
            [*FEDGE, "simulate", "--clients", "3", "--rounds", "2", "--codec", "int8",
             "--ray-address", address, "--out", str(out_dir)],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=480,
        )
        ran_on_cluster = actor_logs(temp_dir)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    assert "deprecated" not in text.lower(), text
    report = json.loads((out_dir / "report.json").read_text())
    assert report["meta"]["ray_address"] == address
    (run,) = report["runs"]
    assert [r["round"] for r in run["rounds"]] == [1, 2]
    assert all(r["rejected"] == 0 and r["accepted"] == 3 for r in run["rounds"]), run
    assert run["uplink_codec"] == "int8"
    assert 1 <= len(ran_on_cluster) <= 2, ran_on_cluster  # 2 CPUs: at most 2 actors


def test_flwr_run_uses_the_cluster_named_by_ray_address(tmp_path: Path) -> None:
    env = flower_env(tmp_path)
    report = tmp_path / "rounds.jsonl"
    with ray_head(tmp_path, env) as (address, temp_dir):
        env["RAY_ADDRESS"] = address  # the SuperLink hands it to flwr-simulation's Ray
        with local_superlink(tmp_path, env) as connection:
            done = subprocess.run(
                ["flwr", "run", str(REPO), connection, "--stream",
                 "--run-config", f'num-rounds=1 report-path="{report}"'],
                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480,
            )
        ran_on_cluster = actor_logs(temp_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = read_round_metrics(report)
    assert record.accepted == 2 and record.codec == "int8"
    assert ran_on_cluster, done.stdout + done.stderr


def test_a_bad_ray_address_is_refused_before_anything_starts() -> None:
    done = subprocess.run([*FEDGE, "simulate", "--ray-address", "localhost"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "HOST:PORT" in lines[0] and "Traceback" not in done.stderr
