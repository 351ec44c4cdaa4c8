"""Secure aggregation over the coordinator's gRPC path, devices as `fedge client run` processes.

The coordinator's service and `GrpcGrid` serve on 127.0.0.1 in this process (the
harness every coordinator test uses); four devices run the real edge runtime in
their own processes with `secagg_apps:secagg_app`. `run_secagg_round` drives the
four exchanges through the Grid as fedge's ServerApp would, and the sum it
unmasks is exactly the sum of the devices' quantized updates.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from coordinator_harness import ServiceHarness
from flwr.app import ConfigRecord, Message, RecordDict
from secagg_apps import STEP, partition_delta

from fedge.common.arrays import arrays_to_record
from fedge.demo import fedge_command, start, stop
from fedge.server.secagg_server import SecAggConfig, run_secagg_round

TESTS = Path(__file__).resolve().parent
ENV = {
    "PYTHONPATH": str(TESTS),
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "PYTHONUNBUFFERED": "1",
}
CLIP = 127 * STEP

pytestmark = pytest.mark.timeout(240)


async def test_masked_round_over_grpc_with_device_processes_sums_exactly(tmp_path: Path) -> None:
    n = 4
    model = {"w": np.zeros((6, 5), np.float32), "b": np.zeros(5, np.float32)}
    h = ServiceHarness(tmp_path / "coord", heartbeat_interval_s=2.0, model_arrays=model)
    h.grid.default_timeout = 120.0
    await h.start()
    procs = []
    try:
        for i in range(n):
            argv = fedge_command(
                "client", "run", "--insecure", "--coordinator", h.target,
                "--data", str(tmp_path / f"dev{i}"), "--name", f"dev{i}",
                "--partition-id", str(i), "--num-partitions", str(n),
                "--app", "secagg_apps:secagg_app", "--max-backoff", "2",
            )  # fmt: skip
            procs.append(
                start(f"dev{i}", argv, echo=False, log_path=tmp_path / f"dev{i}.log", env=ENV)
            )
        nodes = await asyncio.to_thread(h.grid.wait_for_nodes, n)
        messages = [
            Message(
                RecordDict(
                    {"arrays": arrays_to_record(model), "config": ConfigRecord({"server-round": 1})}
                ),
                node,
                "train",
            )
            for node in nodes[:n]
        ]
        result = await asyncio.to_thread(
            run_secagg_round, h.grid, messages, SecAggConfig(clip=CLIP, timeout=120.0),
            server_round=1,
        )  # fmt: skip
    finally:
        stop(procs)
        await h.stop()
    logs = "".join(p.read_text() for p in tmp_path.glob("dev*.log"))
    assert sorted(result.survivors) == sorted(nodes[:n]), (result.refused, logs[-3000:])
    assert result.dropped == [] and not result.refused
    expected = np.concatenate(
        [sum(partition_delta(p, a.shape) for p in range(n)).ravel() for a in model.values()]
    )
    assert np.array_equal(result.delta_sum, expected)
    assert set(result.traffic) == {"advertise", "share-keys", "masked-input", "unmask"}


def test_coordinator_runs_fedges_app_with_secure_aggregation_from_its_run_config(
    tmp_path: Path,
) -> None:
    """`fedge coordinator run --codec none --run-config 'secure-aggregation=true'` and three
    `fedge client run` processes with fedge's own ClientApp (TLS, enrolled devices): every
    round is a masked exchange, and the store, the round line and the record say so."""
    from test_coordinator_e2e import fleet_of

    from fedge.server.store import RoundStatus, RunStatus

    with fleet_of(tmp_path) as fleet:
        fleet.start_coordinator("--rounds", "2", "--min-devices", "3", "--min-train-nodes", "3",
                                "--codec", "none", "--round-timeout", "90",
                                "--run-config", "secure-aggregation=true lr=0.1")
        for i in range(3):
            fleet.start_device(f"dev{i}", "--partition-id", str(i), "--num-partitions", "3")
        assert fleet.wait_coordinator(180) == 0, (tmp_path / "coordinator.log").read_text()
        rounds, status = fleet.rounds()
    log = (tmp_path / "coordinator.log").read_text()
    assert status == RunStatus.COMPLETED, log[-3000:]
    assert [r.round for r in rounds if r.status == RoundStatus.COMPLETED] == [1, 2], log[-3000:]
    devices = {fleet.device_id(f"dev{i}") for i in range(3)}
    for r in rounds:
        m = r.metrics
        assert m.codec == "secagg-int8" and m.accepted == 3 and m.rejected == 0, m
        assert m.secagg is not None and (m.secagg["ring_bits"], m.secagg["survivors"]) == (10, 3)
        assert m.uplink_bytes == sum(m.secagg["up_bytes"].values())
        assert set(r.contributors) == devices and r.dropped == []
    assert log.count("secure aggregation: 3 masked inputs in a 10-bit ring") == 2, log[-3000:]
    assert rounds[-1].metrics.accuracy is not None and rounds[-1].metrics.accuracy > 0.5
