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
