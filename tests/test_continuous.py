"""Continuous mode with real processes on 127.0.0.1: `fedge coordinator run --continuous`.

3 devices (digits, tiny rounds), at least 4 rounds: round 3 is forced bad
(`lr-round-3`, gradient ascent) and is not promoted; later rounds train from
`current`; `current` survives a coordinator restart (SIGTERM, then the same
state folder); `/metrics` counters match the rounds run; SIGTERM stops cleanly.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedge.demo import _Proc, fedge_command, start, stop, wait_for_line
from fedge.server.continuous import ContinuousSettings, round_config, wait_for_round
from fedge.server.model_store import ModelStore
from fedge.server.registry import Registry
from fedge.server.store import RoundStatus, Store

LISTEN = re.compile(r"^listening on (\S+):(\d+)$")
HTTP = re.compile(r"^HTTP API on (http://\S+)$")

pytestmark = pytest.mark.timeout(300)


def _coordinator(tmp: Path, log: str, *extra: str) -> tuple[_Proc, str, str]:
    argv = fedge_command(
        "coordinator", "run", "--state", str(tmp / "state"), "--port", "0", "--insecure",
        "--heartbeat-interval", "1", "--task", "digits", "--codec", "int8",
        "--min-devices", "3", "--min-train-nodes", "3", "--round-timeout", "10",
        "--continuous", "--min-ready", "3", "--promote-margin", "0.05", "--http-port", "0",
        "--run-config", "local-epochs=1", "--run-config", "lr-round-3=-0.5", *extra,
    )
    proc = start("coordinator", argv, echo=False, log_path=tmp / log)
    listen = wait_for_line(proc, LISTEN, 90)
    http = wait_for_line(proc, HTTP, 30).group(1)
    return proc, f"{listen.group(1)}:{listen.group(2)}", http


def _device(tmp: Path, name: str, target: str, i: int) -> _Proc:
    argv = fedge_command(
        "client", "run", "--coordinator", target, "--insecure", "--data", str(tmp / name),
        "--name", name, "--max-backoff", "1", "--partition-id", str(i), "--num-partitions", "3",
    )
    return start(name, argv, echo=False, log_path=tmp / f"{name}.log")


def _wait_round(proc: _Proc, n: int, timeout: float) -> re.Match[str]:
    return wait_for_line(proc, re.compile(rf"^round {n}: (\w+) (promoted|NOT promoted)"), timeout)


def _counters(http: str) -> dict[str, float]:
    text = httpx.get(f"{http}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f"{{{k}={v}}}" for k, v in sorted(sample.labels.items()))
            out[key] = sample.value
    return out


def test_continuous_gate_restart_and_metrics(tmp_path: Path) -> None:
    procs: list[_Proc] = []
    try:
        coord, target, http = _coordinator(tmp_path, "coordinator.log")
        procs.append(coord)
        devices = [_device(tmp_path, f"dev{i}", target, i) for i in range(3)]
        procs += devices
        for n in (1, 2, 4):
            _wait_round(coord, n, 120)
        bad = _wait_round(coord, 3, 1)
        assert bad.group(2) == "NOT promoted", coord.lines[-20:]
        assert _wait_round(coord, 4, 1).group(2) == "promoted"  # trained from current again
        # one device leaves: no further round starts (--min-ready 3); let the fleet settle
        devices[2].popen.terminate()
        deadline = time.monotonic() + 60
        while True:
            scrape = _counters(http)
            started = sum(1 for line in coord.lines if re.match(r"^round \d+ starts", line))
            done = sum(1 for line in coord.lines if re.match(r"^round \d+: accuracy", line))
            if (started == done == scrape["fedge_rounds_completed_total"]
                    and scrape["fedge_devices_connected"] == 2):
                break
            assert time.monotonic() < deadline, (scrape, started, done)
            time.sleep(0.5)
        assert done >= 4
        assert scrape["fedge_bytes_in_total"] > 0 and scrape["fedge_bytes_out_total"] > 0
        with httpx.Client(timeout=10) as client:
            current_before = client.get(f"{http}/healthz").json()["current"]
            models = client.get(f"{http}/v1/models").json()["models"]
        assert any(m["status"] == "rejected" and "worse than current" in m["status_reason"]
                   for m in models)
        coord.popen.terminate()  # SIGTERM: clean stop, the run stays resumable
        assert coord.popen.wait(30) == 0
        with Store.open(tmp_path / "state" / "fedge.db") as store:
            registry = Registry(store, ModelStore(tmp_path / "state" / "models"))
            current = registry.current()
            run = store.list_runs()[-1]
            rounds = store.list_rounds(run.id)
            by_round = {r.round: r for r in rounds if r.status == RoundStatus.COMPLETED}
            bad_version = by_round[3].model_version
            assert registry.get(bad_version).status == "rejected"
            assert current != bad_version and current == current_before
            # round 4 trained from current (round 2's model), not from the rejected candidate
            assert registry.get(by_round[4].model_version).parent_version != bad_version
        last = max(by_round)
        # restart on the same state: current survives, rounds continue after the last one
        coord2, _, http2 = _coordinator(tmp_path, "coordinator2.log", "--port", "0")
        procs.append(coord2)
        assert httpx.get(f"{http2}/healthz", timeout=10).json()["current"] == current
        resumed = wait_for_line(coord2, re.compile(r"^run \d+: resuming after round (\d+)"), 5)
        assert int(resumed.group(1)) == last
    finally:
        stop(procs)


def test_round_config_and_trigger() -> None:
    cfg = round_config({"lr": 0.3, "lr-round-3": -2.0}, 3, "/m.pb")
    assert (cfg["first-round"], cfg["num-rounds"], cfg["lr"], cfg["initial-model"]) == (
        3, 3, -2.0, "/m.pb")
    assert round_config({"lr": 0.3, "lr-round-3": -2.0}, 4, "/m.pb")["lr"] == 0.3
    settings = ContinuousSettings(min_ready=3, every_minutes=1.0, poll_s=0.0)
    now = [0.0]

    def sleep(_: float) -> None:
        now[0] += 10.0

    assert wait_for_round(lambda: 3, settings, min_train_nodes=2, last_round_end=0.0,
                          stopped=lambda: False, clock=lambda: now[0], sleep=sleep) == "ready"
    assert wait_for_round(lambda: 2, settings, min_train_nodes=2, last_round_end=0.0,
                          stopped=lambda: False, clock=lambda: now[0], sleep=sleep) == "timer"
    assert now[0] >= 60.0
    assert wait_for_round(lambda: 0, settings, min_train_nodes=2, last_round_end=now[0],
                          stopped=lambda: True, clock=time.monotonic) == "stopped"


def test_reset_residual_reaches_the_train_config() -> None:
    from fedge.common.task import resolve_task
    from fedge.server.server_app import ServerConfig, train_config

    task = resolve_task("digits")
    reset = round_config({}, 4, "/m.pb", reset_residual=True)
    assert train_config(ServerConfig.from_mapping(reset), task)["fedge.reset-residual"] is True
    plain = round_config({}, 4, "/m.pb")
    assert "fedge.reset-residual" not in train_config(ServerConfig.from_mapping(plain), task)
