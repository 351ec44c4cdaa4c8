"""A user's own Flower objects on fedge: `--server-app`, `--strategy module:object`, `--app`,
`--node-config`. Bad references are refused in one line (exit 2) before anything starts or
is stored; a strategy object runs inside fedge's ServerApp; a foreign ServerApp's run is
not resumed mid-run. (The foreign ServerApp itself running on the coordinator with
enrolled mTLS devices: tests/test_example_app.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.serverapp.strategy import FedAvg

from fedge.client.client_app import make_client_app
from fedge.client.compression_mod import compression_mod
from fedge.demo import fedge_command
from fedge.server.app_loading import AppRefError, load_server_app, load_strategy
from fedge.server.coordinator import CoordinatorOptions, _plan
from fedge.server.inprocess_grid import InProcessGrid, run_server_app_inprocess
from fedge.server.model_store import ModelStore
from fedge.server.round_metrics import RoundMetrics
from fedge.server.run_plan import StartRefused, app_snapshot
from fedge.server.server_app import make_server_app
from fedge.server.store import Store

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist-pytorch"

#: a strategy object, and a factory of one, for `--strategy module:object`
HALF = FedAvg(fraction_train=0.5, min_train_nodes=2, min_available_nodes=2)


def quarter() -> FedAvg:
    return FedAvg(fraction_train=0.25, min_train_nodes=1, min_available_nodes=1)


def _fedge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(EXAMPLE)}
    return subprocess.run(fedge_command(*args), cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize(
    ("ref", "why"),
    [
        ("no_such_module:app", "cannot import 'no_such_module'"),
        ("fmnist_example.server_app:nope", "has no attribute 'nope'"),
        ("fmnist_example.task:Net", "is a type, not a Flower ServerApp"),
        ("fmnist_example.server_app", "is not module:object"),
    ],
)
def test_a_bad_server_app_is_refused_before_anything_is_stored(
    tmp_path: Path, ref: str, why: str
) -> None:
    state = tmp_path / "state"
    done = _fedge("coordinator", "run", "--state", str(state), "--port", "0",
                  "--server-app", ref, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0] and "--server-app" in lines[0], done.stderr
    assert not state.exists()


def test_fedge_flags_with_a_server_app_are_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for flag in (["--codec", "int4"], ["--continuous"], ["--strategy", "krum"]):
        done = _fedge("coordinator", "run", "--state", str(state), "--port", "0",
                      "--server-app", "fmnist_example.server_app:app", *flag, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert flag[0] in done.stderr and "--run-config" in done.stderr
    assert not state.exists()


def test_a_bad_strategy_object_is_refused_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for ref, why in (("tests.test_server_app_on_coordinator:EXAMPLE", "not a Flower Strategy"),
                     ("no_such_module:half", "no module 'no_such_module'")):
        done = _fedge("coordinator", "run", "--state", str(state), "--port", "0",
                      "--strategy", ref, cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and why in done.stderr, done.stderr
    assert not state.exists()


def test_client_refuses_a_bad_app_or_node_config_before_starting(tmp_path: Path) -> None:
    data = tmp_path / "device"
    for extra, why in (
        (["--app", "fmnist_example.client_app:nope"], "defines no 'nope'"),
        (["--app", "fmnist_example.nothing:app"], "not found"),
        (["--node-config", "partition-id=0 junk"], "'junk' is not KEY=VALUE"),
        (["--node-config", "partition-id=[1,2]"], "partition-id needs to be of type"),
    ):
        done = _fedge("client", "run", "--coordinator", "127.0.0.1:1", "--insecure",
                      "--data", str(data), "--app", "fmnist_example.client_app:app", *extra,
                      cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert why in done.stderr, done.stderr
    assert not data.exists()


def test_loaders_name_what_is_wrong() -> None:
    assert isinstance(load_strategy("tests.test_server_app_on_coordinator:HALF"), FedAvg)
    made = load_strategy("tests.test_server_app_on_coordinator:quarter")
    assert isinstance(made, FedAvg) and made.fraction_train == 0.25
    with pytest.raises(AppRefError, match="not a Flower ServerApp"):
        load_server_app("tests.test_server_app_on_coordinator:HALF")


def test_a_strategy_object_runs_in_fedges_server_app() -> None:
    """`strategy = module:object`: the object (fraction 0.5 of 4 nodes) picks 2 per round,
    where the built-in `fedavg` with the same config takes all 4."""
    config = {"task": "digits", "num-rounds": 2, "min-train-nodes": 4, "codec": "int8",
              "seed": 3, "strategy": "tests.test_server_app_on_coordinator:HALF"}
    rounds: list[RoundMetrics] = []
    grid = InProcessGrid(make_client_app(mods=[compression_mod]), 4, run_config=config)
    run_server_app_inprocess(make_server_app(listeners=[rounds.append]), grid)
    assert [r.accepted for r in rounds] == [2, 2]
    assert all(r.codec == "int8" for r in rounds)
    builtin: list[RoundMetrics] = []
    grid = InProcessGrid(make_client_app(mods=[compression_mod]), 4,
                         run_config={**config, "strategy": "fedavg"})
    run_server_app_inprocess(make_server_app(listeners=[builtin.append]), grid)
    assert [r.accepted for r in builtin] == [4, 4]


def test_a_server_app_run_is_not_resumed_mid_run(tmp_path: Path) -> None:
    """Its model and strategy state live in the app: a restart after round 1 is refused
    (one line naming --new-run); before any round completed it simply starts again."""
    ref = "fmnist_example.server_app:app"
    config = {"server-app": ref, "round-timeout": 60.0}
    with Store.open(tmp_path / "fedge.db") as store:
        version = ModelStore(tmp_path / "models").put(app_snapshot(ref))
        store.create_run(42, config, model_version=version)
        options = CoordinatorOptions(state_dir=tmp_path, run_config=config)
        assert _plan(options, tmp_path).first_round == 1  # nothing completed: run it again
        store.open_round(42, 1)
        store.complete_round(42, 1, model_version=version, metrics=RoundMetrics(round=1))
    with pytest.raises(StartRefused) as refused:
        _plan(options, tmp_path)
    assert refused.value.reason == "app_not_resumable" and "--new-run" in str(refused.value)
    fresh = _plan(CoordinatorOptions(state_dir=tmp_path, run_config=config, new_run=True),
                  tmp_path)
    assert fresh.resumed_after is None and fresh.run_id != 42


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
