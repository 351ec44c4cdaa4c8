"""The example Flower app (examples/fashion-mnist-pytorch) runs unchanged three ways.

(a) `flwr run` on Flower's simulation runtime (`flower-superlink --simulation`);
(b) Flower's deployment runtime: a `flower-superlink` and two `flower-supernode`s,
    each with its own partition through `--node-config`, and `flwr run` against it;
(c) `fedge coordinator run --server-app ...` with two enrolled `fedge client run
    --app ...` devices over mutual TLS.

Same seeds and rounds: the final accuracies agree within 1 point, and each run's
uplink per round (counted by the example's ServerApp from the bytes the replies
carried) is at most 0.26 x the fp32 model's. Every process runs on 127.0.0.1,
is started here and stopped by its own process id (group), and every wait is
bounded.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fedge.bench.flower_bench import (
    EXAMPLE_DIR,
    example_config,
    flower_bin,
    flwr_run,
    free_ports,
    read_rounds,
    run_simulation,
    start,
    superlink,
    toml_value,
    wait_port,
)

CLIENTS, ROUNDS, SAMPLES = 2, 2, 120
INT8_BOUND = 0.26
pytestmark = pytest.mark.timeout(900)


def _check_run(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Every round trained both clients and went int8 over the wire; the last round's line."""
    trained = [r for r in rounds if r["round"] > 0]
    assert [r["round"] for r in trained] == list(range(1, ROUNDS + 1)), rounds
    for r in trained:
        assert r["replies"] == CLIENTS, r
        assert 0 < r["uplink-bytes"] <= INT8_BOUND * r["fp32-bytes"], r
    return trained[-1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("example-app")


@pytest.fixture(scope="module")
def on_simulation(workdir: Path) -> dict[str, Any]:
    sim = workdir / "a"
    sim.mkdir()
    with superlink(sim, simulation=True) as link:
        _, rounds = run_simulation(link, EXAMPLE_DIR, sim, clients=CLIENTS, rounds=ROUNDS,
                                   samples=SAMPLES, tag="example")
    return _check_run(rounds)


@pytest.fixture(scope="module")
def on_deployment(workdir: Path) -> dict[str, Any]:
    dep = workdir / "b"
    dep.mkdir()
    metrics = dep / "rounds.jsonl"
    with superlink(dep, simulation=False) as link:
        nodes = []
        try:
            for i in range(CLIENTS):
                (port,) = free_ports(1)
                home = dep / f"supernode-{i}"
                home.mkdir()
                env = {**link.env, "FLWR_HOME": str(home)}
                nodes.append(start(
                    f"supernode-{i}",
                    [flower_bin("flower-supernode"), "--insecure", "--superlink",
                     link.fleet_address, "--isolation", "subprocess", "--host", "127.0.0.1",
                     "--port", str(port),
                     "--node-config", f"partition-id={i} num-partitions={CLIENTS}"],
                    env, dep / "logs", cwd=home,
                ))
                wait_port(port, nodes[-1], 60)
            flwr_run(link, EXAMPLE_DIR, example_config(metrics, rounds=ROUNDS, samples=SAMPLES),
                     logs=dep / "logs")
        finally:
            for node in nodes:
                node.stop()
    return _check_run(read_rounds(metrics))


@pytest.fixture(scope="module")
def on_coordinator(workdir: Path) -> dict[str, Any]:
    from fedge.demo import enroll_devices, fedge_command, stop, wait_for_line
    from fedge.demo import start as start_fedge
    from fedge.server.store import ResultStatus, RoundStatus, Store

    coord = workdir / "c"
    coord.mkdir()
    metrics = coord / "rounds.jsonl"
    # the app's own defaults ([tool.flwr.app.config]) under this test's settings, as a file
    defaults = tomllib.loads((EXAMPLE_DIR / "pyproject.toml").read_text())
    config = {**defaults["tool"]["flwr"]["app"]["config"],
              **example_config(metrics, rounds=ROUNDS, samples=SAMPLES)}
    config_file = coord / "run-config.toml"
    config_file.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in config.items()))
    state = coord / "state"
    env = {"PYTHONPATH": str(EXAMPLE_DIR), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    procs = []
    try:
        coordinator = start_fedge(
            "coordinator",
            fedge_command("coordinator", "run", "--state", str(state), "--host", "127.0.0.1",
                          "--port", "0", "--min-devices", str(CLIENTS), "--round-timeout",
                          "600", "--heartbeat-interval", "2",
                          "--server-app", "fmnist_example.server_app:app",
                          "--run-config", str(config_file)),
            echo=False, log_path=coord / "coordinator.log", env=env,
        )
        procs.append(coordinator)
        ca = wait_for_line(coordinator, re.compile(r"^TLS on: devices need --ca (\S+)$"), 120)
        at = wait_for_line(coordinator, re.compile(r"^enrollment on (\S+):(\d+)$"), 60)
        folders = [coord / f"device-{i}" for i in range(CLIENTS)]
        device_ids = enroll_devices(state, f"{at.group(1)}:{at.group(2)}", Path(ca.group(1)),
                                    folders)
        for i, folder in enumerate(folders):
            procs.append(start_fedge(
                f"device-{i}",
                fedge_command("client", "run", "--data", str(folder), "--name", folder.name,
                              "--app", "fmnist_example.client_app:app",
                              "--node-config", f"partition-id={i} num-partitions={CLIENTS}"),
                echo=False, log_path=coord / f"device-{i}.log", env=env,
            ))
        code = coordinator.popen.wait(700)
        output = "\n".join(coordinator.lines)
        assert code == 0, output
    finally:
        stop(procs)
    # the runtime's guarantees held for a foreign app: enrolled devices, signed results
    # counted once, every round committed with its contributors
    with Store.open(state / "fedge.db") as store:
        run = store.list_runs()[-1]
        assert run.config["server-app"] == "fmnist_example.server_app:app"
        rounds = store.list_rounds(run.id)
        assert [r.round for r in rounds] == list(range(1, ROUNDS + 1))
        for r in rounds:
            assert r.status == RoundStatus.COMPLETED
            assert r.metrics.accepted == CLIENTS and r.metrics.uplink_bytes > 0
            assert sorted(r.contributors) == sorted(device_ids)
            assert r.dropped == []
            tasks = store.list_tasks(run.id, r.round)
            results = [store.get_result(t.id) for t in tasks]
            assert results and all(x is not None and x.status == ResultStatus.COMPLETE
                                   for x in results)
    return _check_run(read_rounds(metrics))


def test_simulation_runtime(on_simulation: dict[str, Any]) -> None:
    assert on_simulation["accuracy"] > 0.2  # it learned: 10 classes, chance is 0.1


def test_deployment_runtime(on_deployment: dict[str, Any]) -> None:
    assert on_deployment["accuracy"] > 0.2  # it learned: 10 classes, chance is 0.1


def test_fedge_coordinator(on_coordinator: dict[str, Any]) -> None:
    assert on_coordinator["accuracy"] > 0.2  # it learned: 10 classes, chance is 0.1


def test_three_runtimes_agree(
    on_simulation: dict[str, Any], on_deployment: dict[str, Any], on_coordinator: dict[str, Any]
) -> None:
    accuracies = [r["accuracy"] for r in (on_simulation, on_deployment, on_coordinator)]
    assert max(accuracies) - min(accuracies) <= 0.01, accuracies


def test_without_fedge_takes_out_two_lines_per_side(tmp_path: Path) -> None:
    """The bench's plain variant is the example minus fedge's lines: no fedge import left."""
    from fedge.bench.flower_bench import without_fedge

    plain = without_fedge(EXAMPLE_DIR, tmp_path / "plain")
    sources = {p.name: p.read_text() for p in (plain / "fmnist_example").glob("*.py")}
    assert not any("fedge" in line and "import" in line
                   for text in sources.values() for line in text.splitlines())
    assert "app = ClientApp()" in sources["client_app.py"]
    assert "Compressed(" not in sources["server_app.py"]
    original = (EXAMPLE_DIR / "fmnist_example" / "server_app.py").read_text().splitlines()
    assert len(original) - len(sources["server_app.py"].splitlines()) == 2


def test_bench_flower_at_a_tiny_size(tmp_path: Path) -> None:
    """`fedge bench flower`'s code path: both variants run, and the figures it reports hold
    together (the plain app's uplink is fp32, fedge's int8)."""
    from fedge.bench.flower_bench import measure

    result = measure(clients=2, rounds=1, samples=30, workdir=tmp_path)
    with_fedge, without = result["with_fedge"], result["without_fedge"]
    assert with_fedge["rounds"] == without["rounds"] == 1
    assert with_fedge["uplink_vs_fp32"] <= INT8_BOUND < 1.0 <= without["uplink_vs_fp32"] < 1.01
    assert result["uplink_ratio"] <= INT8_BOUND
    assert result["wall_ratio"] > 0 and result["app_ratio"] > 0
