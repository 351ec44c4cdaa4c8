"""`fedge bench secagg`: what secure aggregation costs a device and the coordinator.

One round per (clients, codec) on the FedAvg CNN (1,663,370 parameters),
every device and the coordinator in this process over an `InProcessGrid`, so
every message crosses Flower's protobuf and is counted. Devices "train" by
adding a seeded normal delta (sd 0.01) to the model; that time is excluded.

Per row:

- ``bytes_per_coordinate``: everything the devices upload in the round (all
  stages: public keys, encrypted share bundles, the masked words, unmask
  shares; Flower's message envelopes included), per device, per model
  coordinate. fp32 plain would be 4.0.
- ``round_trips``: coordinator -> devices -> coordinator exchanges per round.
- ``client_seconds``: the mean over devices of their time in the mod (and
  the Flower app around it) over all stages, training excluded.
- ``server_seconds``: the coordinator's own time (building messages,
  summing, reconstructing and removing masks), device time excluded.

``flower-secaggplus`` rows run Flower's legacy SecAgg+ (`SecAggPlusWorkflow`
with a `LegacyContext`, `secaggplus_mod` on a NumPyClient) on the same grid,
degree and threshold, when it runs here; else the row says why not.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedge.client.secagg_device import secagg_mod
from fedge.common import secagg_protocol as sp
from fedge.common.arrays import arrays_to_record, model_to_arrays
from fedge.common.records import records_of
from fedge.server.inprocess_grid import InProcessGrid
from fedge.server.secagg_server import SecAggConfig, run_secagg_round

CLIENTS = (10, 50, 100)
CODECS = ("int8", "int4", "flower-secaggplus")
BITS = {"int8": 8, "int4": 4}
DELTA_SD = 0.01
CLIP = 0.04  # 4 sd: what a coordinator would broadcast for such updates
GOAL = ("int8", 100, 2.0)


def cnn_arrays() -> dict[str, np.ndarray]:
    from fedge.common.models import FedAvgCNN

    return model_to_arrays(FedAvgCNN())


def small_arrays(params: int) -> dict[str, np.ndarray]:
    """A two-tensor model of `params` floats (tests run the bench's code path on it)."""
    return {"w": np.zeros(max(1, params - 10), np.float32), "b": np.zeros(10, np.float32)}


class CountingGrid(InProcessGrid):
    """Counts the coordinator's exchanges (send_and_receive calls) and devices' time."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.exchanges = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):  # type: ignore[no-untyped-def]
        self.exchanges += 1
        return super().send_and_receive(messages, timeout=timeout)


class DeviceClock:
    """Per-device seconds in the client callable, minus the synthetic training."""

    def __init__(self) -> None:
        self.total: dict[int, float] = {}
        self.training = 0.0

    def wrap(
        self, client: Callable[[Message, Context], Message]
    ) -> Callable[[Message, Context], Message]:
        def timed(msg: Message, context: Context) -> Message:
            t0 = time.perf_counter()
            try:
                return client(msg, context)
            finally:
                self.total[context.node_id] = self.total.get(context.node_id, 0.0) + (
                    time.perf_counter() - t0
                )

        return timed

    def per_device(self) -> float:
        return (sum(self.total.values()) - self.training) / max(1, len(self.total))


def _delta(shape: tuple[int, ...], pid: int, name: str) -> np.ndarray:
    rng = np.random.default_rng([pid, sum(name.encode())])
    return rng.normal(0.0, DELTA_SD, shape).astype(np.float32)


def _fedge_app(clock: DeviceClock) -> ClientApp:
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        t0 = time.perf_counter()
        record = records_of(msg.content, ArrayRecord)["arrays"]
        pid = int(context.node_config["partition-id"])
        out = {}
        for k, a in record.items():
            x = a.numpy()
            out[k] = x + _delta(x.shape, pid, k) if np.issubdtype(x.dtype, np.floating) else x
        reply = Message(
            RecordDict(
                {
                    "arrays": arrays_to_record(out),
                    "metrics": MetricRecord({"num-examples": 100, "train-loss": 0.0}),
                }
            ),
            reply_to=msg,
        )
        clock.training += time.perf_counter() - t0
        return reply

    return app


def run_fedge(codec: str, clients: int, model: dict[str, np.ndarray]) -> dict:
    clock = DeviceClock()
    grid = CountingGrid(clock.wrap(_fedge_app(clock)), clients, stream_replies=True)
    messages = [
        Message(
            RecordDict(
                {"arrays": arrays_to_record(model), "config": ConfigRecord({"server-round": 1})}
            ),
            node,
            MessageType.TRAIN,
        )
        for node in grid.get_node_ids()
    ]
    # the grid counts the bytes (as for Flower's rows): no second serialization here
    config = SecAggConfig(clip=CLIP, bits=BITS[codec], count_bytes=False)
    result = run_secagg_round(grid, messages, config, server_round=1)
    params = sum(a.size for a in model.values() if np.issubdtype(a.dtype, np.floating))
    up = grid.wire.bytes_up
    # exactness against the clipped plain sum, within one quantization step per device
    expected_first = sum(
        float(np.clip(_delta(a.shape, p, k).ravel()[0], -CLIP, CLIP))
        for p in range(clients)
        for k, a in list(model.items())[:1]
    )
    step = CLIP / (127 if codec == "int8" else 7)
    assert abs(float(result.delta_sum[0]) - expected_first) <= clients * step + 1e-6
    return {
        "clients": clients,
        "codec": codec,
        "bytes_per_coordinate": round(up / clients / params, 4),
        "round_trips": grid.exchanges,
        "client_seconds": round(clock.per_device(), 4),
        "server_seconds": round(result.server_seconds, 3),
        "degree": result.degree,
        "threshold": result.threshold,
        "word_bits": BITS[codec] + math.ceil(math.log2(clients)),
        "survivors": len(result.survivors),
    }


def run_flower(clients: int, model: dict[str, np.ndarray]) -> dict:
    """Flower's legacy SecAgg+ on the same grid; the same figures, or why it did not run."""
    try:
        from flwr.client import ClientApp as LegacyClientApp
        from flwr.client import NumPyClient
        from flwr.client.mod import secaggplus_mod
        from flwr.common import ndarrays_to_parameters
        from flwr.server import LegacyContext, ServerConfig
        from flwr.server.strategy import FedAvg as LegacyFedAvg
        from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    except ImportError as exc:  # pragma: no cover - depends on the Flower build
        return {"clients": clients, "codec": "flower-secaggplus", "skipped": f"import: {exc}"}
    clock = DeviceClock()
    names = list(model)
    initial = [model[k] for k in names]

    class Client(NumPyClient):  # type: ignore[misc]
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            out = [
                p + _delta(p.shape, self.pid, k) if np.issubdtype(p.dtype, np.floating) else p
                for k, p in zip(names, parameters, strict=True)
            ]
            clock.training += time.perf_counter() - t0
            return out, 100, {}

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return Client(int(context.node_config["partition-id"])).to_client()

    app = LegacyClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    grid = CountingGrid(clock.wrap(app), clients)
    degree = sp.default_degree(clients)
    num_shares = (
        degree + 1 if degree % 2 == 0 else degree
    )  # Flower wants an odd count, self included
    strategy = LegacyFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_available_clients=clients,
        initial_parameters=ndarrays_to_parameters(initial),
    )
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(context=ctx, config=ServerConfig(num_rounds=1), strategy=strategy)
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=num_shares,
            reconstruction_threshold=sp.default_threshold(degree),
            clipping_range=CLIP,
        )
    )
    t0 = time.perf_counter()
    try:
        workflow(grid, legacy)
    except Exception as exc:  # report why Flower's legacy path did not run
        return {
            "clients": clients,
            "codec": "flower-secaggplus",
            "skipped": f"{type(exc).__name__}: {exc}",
        }
    total = time.perf_counter() - t0
    device_total = sum(clock.total.values())
    params = sum(a.size for a in model.values() if np.issubdtype(a.dtype, np.floating))
    return {
        "clients": clients,
        "codec": "flower-secaggplus",
        "bytes_per_coordinate": round(grid.wire.bytes_up / clients / params, 4),
        "round_trips": grid.exchanges,
        "client_seconds": round(clock.per_device(), 4),
        "server_seconds": round(total - device_total, 3),
        "degree": num_shares - 1,
        "note": "legacy SecAggPlusWorkflow + secaggplus_mod; int64 words; evaluate skipped",
    }


def run(
    clients: Sequence[int] = CLIENTS,
    codecs: Sequence[str] = CODECS,
    model: dict[str, np.ndarray] | None = None,
) -> list[dict]:
    model = cnn_arrays() if model is None else model
    rows = []
    for codec in codecs:
        for n in clients:
            row = (
                run_flower(n, model) if codec == "flower-secaggplus" else run_fedge(codec, n, model)
            )
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress; stdout stays one list
            rows.append(row)
    return rows


def check_goal(rows: list[dict]) -> list[str]:
    codec, clients, bar = GOAL
    lines = []
    for r in rows:
        if r["codec"] == codec and r["clients"] == clients and "bytes_per_coordinate" in r:
            ok = r["bytes_per_coordinate"] <= bar
            lines.append(
                f"{'PASS' if ok else 'FAIL'}: {codec} at {clients} clients uploads "
                f"{r['bytes_per_coordinate']} bytes/coordinate (bar {bar})"
            )
    return lines


def main(
    json_output: bool = False,
    clients: Sequence[int] = CLIENTS,
    codecs: Sequence[str] = CODECS,
    params: int | None = None,
) -> None:
    rows = run(clients, codecs, None if params is None else small_arrays(params))
    if json_output:
        print(json.dumps(rows))
        return
    for r in rows:
        print(json.dumps(r))
    for line in check_goal(rows):
        print(line)
