"""Where epsilon goes (docs/privacy.md): /metrics, the registry, the coordinator's round line,
report.json and the scenario; `fedge simulate --dp-*` refusals."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedge.common.datasets import DEFAULT_FASHION_MNIST_DIR, load_idx_raw
from fedge.server.dp import epsilon_for
from fedge.server.fleet import Fleet
from fedge.server.grpc_grid import GrpcGrid
from fedge.server.metrics import Metrics
from fedge.server.model_store import ModelStore
from fedge.server.registry import Registry
from fedge.server.round_keeper import RoundKeeper, snapshot_bytes
from fedge.server.round_metrics import RoundMetrics
from fedge.server.server_app import RoundEnd
from fedge.server.store import Store
from fedge.simulations.report import load_report
from fedge.simulations.scenario_run import run_scenario
from fedge.simulations.scenarios import DP_NOISE_EPS3, DP_NOISE_EPS8, SCENARIOS, get_scenario

FEDGE = [sys.executable, "-c", "from fedge.cli import app; app()"]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}


def _private_round(server_round: int, epsilon: float) -> RoundMetrics:
    return RoundMetrics(round=server_round, accuracy=0.5, loss=1.0, epsilon=epsilon,
                        delta=1e-3, dp_clip=1.0, dp_noise_std=0.01)


def test_metrics_expose_epsilon() -> None:
    metrics = Metrics()
    metrics.observe_round(RoundMetrics(round=1))  # no DP: no epsilon series value set
    assert b"fedge_dp_epsilon 0.0" in metrics.exposition()[0]
    metrics.observe_round(_private_round(2, 1.25))
    body = metrics.exposition()[0].decode()
    assert "fedge_dp_epsilon 1.25" in body and "fedge_dp_delta 0.001" in body


def test_each_model_version_states_its_epsilon(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "fedge.db")
    models = ModelStore(tmp_path / "models")
    registry = Registry(store, models)
    initial = models.put(snapshot_bytes({"w": np.zeros(3, np.float32)}, "t"))
    store.create_run(7, {"task": "t"}, model_version=initial)
    grid = GrpcGrid(store, Fleet(), run_id=7, device_run_config={})
    keeper = RoundKeeper(store, models, registry, grid, Metrics(), run_id=7, task_ref="t",
                         model_version=initial, out=lambda _line: None)
    try:
        for rnd, eps in ((1, 0.8), (2, 1.1)):
            arrays = ArrayRecord({"w": Array(np.full(3, float(rnd), np.float32))})
            keeper.persist(RoundEnd(_private_round(rnd, eps), arrays, []))
            version = keeper.model_version
            evaluation = registry.get(version).evaluation
            assert evaluation["dp-epsilon"] == eps and evaluation["dp-delta"] == 1e-3
            assert store.get_round(7, rnd).metrics.epsilon == eps  # the round log keeps it
    finally:
        grid.stop()
        store.close()


def test_scenario_is_the_issues() -> None:
    dp = SCENARIOS["fashion-mnist-dp"]
    assert (dp.task, dp.clients, dp.per_round, dp.partition, dp.alpha) == (
        "fashion-mnist", 1000, 50, "dirichlet", 0.3)
    labels = [r.label for r in dp.runs]
    for z in (DP_NOISE_EPS8, DP_NOISE_EPS3):
        assert {f"none+dp={z:g}", f"int8+dp={z:g}", f"int4+dp={z:g}"} <= set(labels)
    assert {"none", "int8", "int4"} <= set(labels)
    assert len({dp.run_config(r)["seed"] for r in dp.runs}) == 1
    delta = dp.dp["dp-delta"]
    assert delta == 1e-3
    # the two noise levels land near epsilon 8 and 3 over the run (Flower's RdpAccountant)
    eps8 = epsilon_for(DP_NOISE_EPS8, dp.per_round, dp.clients, dp.rounds, delta)
    eps3 = epsilon_for(DP_NOISE_EPS3, dp.per_round, dp.clients, dp.rounds, delta)
    assert 7.5 <= eps8 <= 8.0 and 2.8 <= eps3 <= 3.0
    config = dp.run_config(next(r for r in dp.runs if r.label == "int4+dp=0.96"))
    assert (config["codec"], config["dp-noise"], config["dp-clip"]) == ("int4", 0.96, 0.2)
    assert "dp-noise" not in dp.run_config(dp.runs[0])


def _write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    with open(folder / f"{prefix}-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, len(images), 28, 28) + images.tobytes())
    with open(folder / f"{prefix}-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes())


def test_fashion_mnist_dp_smoke(tmp_path: Path) -> None:
    """The smoke (2 rounds, 2 of 1,000 clients, small data): every run reports epsilon."""
    if not DEFAULT_FASHION_MNIST_DIR.exists():
        pytest.skip(f"{DEFAULT_FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist")
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for split, prefix, n in (("train", "train", 5000), ("test", "t10k", 300)):
        images, labels = load_idx_raw(DEFAULT_FASHION_MNIST_DIR, split)
        _write_idx(folder, prefix, np.asarray(images[:n], dtype=np.uint8), labels[:n])
    scenario = get_scenario("fashion-mnist-dp", smoke=True)
    scenario = replace(scenario, extra={"data-dir": str(folder)})
    report = load_report(run_scenario(scenario, tmp_path / "out"))
    runs = {r["codec"]: r for r in report["runs"]}
    assert list(runs) == [r.label for r in scenario.runs]
    expected = epsilon_for(DP_NOISE_EPS8, 2, 1000, 2, 1e-3)
    for label, run in runs.items():
        summary = run["summary"]
        assert summary["final_accuracy"] is not None and summary["rounds"] == 2
        if "+dp=" in label:
            assert summary["epsilon"] == pytest.approx(expected, abs=1e-4)
            assert summary["delta"] == 1e-3
            clip = scenario.dp["dp-clip"]
            assert all(r["dp_clip"] == clip and r["dp_noise_std"] == pytest.approx(
                DP_NOISE_EPS8 * clip / 2) for r in run["rounds"])
        else:
            assert summary["epsilon"] is None and summary["delta"] is None
    assert "| epsilon |" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize(("args", "flag"), [
    (["--dp-clip", "1.0"], "--dp-clip"),
    (["--dp-noise", "1.0"], "--dp-clip"),
    (["--dp-noise", "1.0", "--dp-clip", "1.0", "--strategy", "fedmedian"], "--strategy"),
    (["--dp-noise", "1.0", "--dp-clip", "1.0", "--dp-delta", "2"], "--dp-delta"),
    # 4 of 4 clients at z 1: one round spends epsilon 4.73 at delta 1e-5
    (["--clients", "4", "--dp-noise", "1.0", "--dp-clip", "1.0", "--dp-max-epsilon", "2"],
     "--dp-max-epsilon"),
])
def test_simulate_refuses_bad_dp_flags_in_one_line(args: list[str], flag: str) -> None:
    done = subprocess.run([*FEDGE, "simulate", *args], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {flag} "), lines
