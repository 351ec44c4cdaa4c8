"""The strategy wrapper: streaming mean, delegation to other strategies, bad replies dropped."""

from __future__ import annotations

import gc
import random
import weakref
from collections.abc import Iterable, Iterator

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
)

from fedge.client.client_app import make_client_app
from fedge.client.compression_mod import compression_mod
from fedge.common.contract import (
    BASE_VERSION_KEY,
    CODEC_KEY,
    REPORT_STATE_KEY,
    RUN_ID_KEY,
    UPDATE_KEY,
)
from fedge.common.model_version import model_version
from fedge.common.update_array import pack_update
from fedge.common.update_codec import encode_update
from fedge.server.compressed_strategy import CompressedStrategy, uses_fedavg_mean
from fedge.server.inprocess_grid import InProcessGrid, run_server_app_inprocess
from fedge.server.round_metrics import RoundMetrics
from fedge.server.server_app import make_server_app
from fedge.server.streaming_mean import StreamingMean

RNG = np.random.default_rng(3)
GLOBAL = {
    "w": RNG.normal(size=(50, 30)).astype(np.float32),
    "b": RNG.normal(size=30).astype(np.float32),
    "count": np.array(10, dtype=np.int64),
}
NUM_NODES = 5
STEPS = [
    {
        "w": RNG.normal(scale=0.02, size=(50, 30)).astype(np.float32),
        "b": RNG.normal(scale=0.02, size=30).astype(np.float32),
        "count": np.array(i + 1, dtype=np.int64),
    }
    for i in range(NUM_NODES)
]
WEIGHTS = [10 * (i + 1) for i in range(NUM_NODES)]


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _reply(message: Message, arrays: ArrayRecord, metrics: dict) -> Message:
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=message)


def step_app(i: int, compressed: bool) -> ClientApp:
    """Replies global + STEPS[i] with weight WEIGHTS[i]; behind the mod if `compressed`."""
    app = ClientApp(mods=[compression_mod] if compressed else [])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        arrays = {k: a.numpy() for k, a in message.content["arrays"].items()}
        local = {k: v + STEPS[i][k] for k, v in arrays.items()}
        return _reply(message, _record(local), {"num-examples": WEIGHTS[i], "train-loss": float(i)})

    return app


def _one_round(strategy, clients, codec: str = "int8"):
    random.seed(0)
    grid = InProcessGrid(clients)
    wrapper = CompressedStrategy(strategy, codec, run_id="r1")
    messages = wrapper.configure_train(1, _record(GLOBAL), ConfigRecord(), grid)
    arrays, metrics = wrapper.aggregate_train(1, grid.send_and_receive(messages))
    out = None if arrays is None else {k: a.numpy() for k, a in arrays.items()}
    return out, metrics, wrapper.traffic(1), list(messages)


def _fedavg(n: int = NUM_NODES, **kw) -> FedAvg:
    return FedAvg(min_train_nodes=n, min_available_nodes=n, fraction_evaluate=0.0, **kw)


def _expected_mean(indices: Iterable[int]) -> dict[str, np.ndarray]:
    idx = list(indices)
    w = np.array([WEIGHTS[i] for i in idx], dtype=np.float64)
    out = {}
    for k, g in GLOBAL.items():
        stack = np.stack([g.astype(np.float64) + STEPS[i][k] for i in idx])
        out[k] = np.average(stack, axis=0, weights=w)
    return out


def _tolerance(indices: Iterable[int]) -> float:
    """int8 with absmax scales: each value is off by at most half a step (absmax/254)."""
    return max(float(np.abs(STEPS[i]["w"]).max()) for i in indices) / 127 + 1e-6


# ------------------------------------------------------------ streaming mean


def test_streaming_mean_equals_numpy_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    base = {"a": rng.normal(size=(7, 5)).astype(np.float32), "n": np.array([3, 4], dtype=np.int64)}
    xs = [
        {"a": rng.normal(size=(7, 5)).astype(np.float32), "n": rng.integers(0, 9, 2)}
        for _ in range(6)
    ]
    ws = rng.uniform(1, 50, size=6)
    mean = StreamingMean(base)
    for j, (x, w) in enumerate(zip(xs, ws, strict=True)):
        if j % 2:  # half arrive as deltas, half as full weights
            mean.add_delta({k: x[k] - base[k] for k in x}, w)
        else:
            mean.add_full(x, w)
    got = mean.result()
    assert got is not None and mean.count == 6
    want_a = np.average(np.stack([x["a"] for x in xs]).astype(np.float64), axis=0, weights=ws)
    np.testing.assert_allclose(got["a"], want_a, rtol=1e-6, atol=1e-6)
    assert got["a"].dtype == np.float32
    want_n = np.rint(np.average(np.stack([x["n"] for x in xs]), axis=0, weights=ws))
    np.testing.assert_array_equal(got["n"], want_n.astype(np.int64))
    assert StreamingMean(base).result() is None
    with pytest.raises(ValueError):
        mean.add_full(xs[0], 0.0)


def test_which_strategies_stream() -> None:
    assert uses_fedavg_mean(FedAvg()) and uses_fedavg_mean(FedProx(proximal_mu=0.1))

    class MyFedAvg(FedAvg):
        pass

    assert uses_fedavg_mean(MyFedAvg())
    others = [FedAdam(), FedYogi(), FedAdagrad(), FedAvgM(), FedMedian(), FedTrimmedAvg(),
              Krum(), MultiKrum(), Bulyan(), QFedAvg(client_learning_rate=0.1)]
    assert not any(uses_fedavg_mean(s) for s in others)
    assert CompressedStrategy(FedProx(proximal_mu=0.1), "int8").streaming
    assert not CompressedStrategy(FedMedian(), "int8").streaming


# ------------------------------------------------------------ config and bytes


def test_config_injection_and_downlink_bytes() -> None:
    codec = lambda r: "int8" if r == 1 else "int4:block=64"  # noqa: E731
    wrapper = CompressedStrategy(_fedavg(3), codec, run_id="run-9")
    grid = InProcessGrid([step_app(i, True) for i in range(3)])
    for rnd in (1, 2):
        config = ConfigRecord({"lr": 0.1})
        messages = list(wrapper.configure_train(rnd, _record(GLOBAL), config, grid))
        cfg = messages[0].content["config"]
        assert cfg[CODEC_KEY] == ("int8" if rnd == 1 else "int4:block=64")
        assert cfg[BASE_VERSION_KEY] == model_version(GLOBAL)
        assert cfg[RUN_ID_KEY] == "run-9" and cfg["lr"] == 0.1 and cfg["server-round"] == rnd
        model_bytes = sum(len(a.data) for a in _record(GLOBAL).values())
        assert wrapper.traffic(rnd).downlink_bytes == 3 * model_bytes
        assert wrapper.traffic(rnd).codec == cfg[CODEC_KEY]


# ------------------------------------------------------------ mixed replies


@pytest.mark.parametrize("make", [_fedavg, lambda: FedMedian(min_train_nodes=5,
                                  min_available_nodes=5, fraction_evaluate=0.0)])
def test_mixed_plain_and_compressed_match_all_plain(make) -> None:
    plain, _, plain_stats, _ = _one_round(make(), [step_app(i, False) for i in range(NUM_NODES)])
    mixed, metrics, mixed_stats, _ = _one_round(
        make(), [step_app(i, i % 2 == 0) for i in range(NUM_NODES)]
    )
    assert plain is not None and mixed is not None
    assert plain_stats.accepted == mixed_stats.accepted == NUM_NODES
    assert plain_stats.rejected == mixed_stats.rejected == 0
    assert mixed_stats.uplink_bytes < 0.75 * plain_stats.uplink_bytes  # three of five int8
    tol = _tolerance(range(NUM_NODES))
    for k in GLOBAL:
        assert mixed[k].dtype == GLOBAL[k].dtype and mixed[k].shape == GLOBAL[k].shape
        np.testing.assert_allclose(mixed[k], plain[k], atol=tol)
    if isinstance(make(), FedMedian):
        want = {k: np.median(np.stack([GLOBAL[k] + s[k] for s in STEPS]), axis=0) for k in GLOBAL}
    else:
        want = _expected_mean(range(NUM_NODES))
        total = sum(WEIGHTS)
        assert metrics["train-loss"] == pytest.approx(
            sum(w * i for i, w in enumerate(WEIGHTS)) / total
        )
    for k in ("w", "b"):
        np.testing.assert_allclose(plain[k], want[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ bad replies


def _raw_app(make_record, weight: int = 10) -> ClientApp:
    """An app whose reply arrays are `make_record(global_arrays, config)`."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        arrays = {k: a.numpy() for k, a in message.content["arrays"].items()}
        record = make_record(arrays, message.content["config"])
        return _reply(message, record, {"num-examples": weight, "train-loss": 1.0})

    return app


def _packed(data: bytes) -> ArrayRecord:
    return ArrayRecord({UPDATE_KEY: pack_update(data)})


def _encoded(arrays, cfg, **overrides) -> bytes:
    kwargs = {
        "run_id": cfg[RUN_ID_KEY], "round": cfg["server-round"],
        "base_version": cfg[BASE_VERSION_KEY], "num_examples": 10, "is_delta": True,
    }
    kwargs.update(overrides)
    delta = {k: np.asarray(STEPS[0][k]) for k in arrays}
    update, _ = encode_update(delta, "int8", **kwargs)
    return update.SerializeToString()


def _nan(arrays, cfg):
    bad = dict(arrays)
    bad["w"] = bad["w"].copy()
    bad["w"][3, 4] = np.nan
    return _record(bad)


def _wrong_shape(arrays, cfg):
    bad = dict(arrays)
    bad["w"] = np.zeros((30, 50), dtype=np.float32)
    return _record(bad)


def _missing(arrays, cfg):
    return _record({k: v for k, v in arrays.items() if k != "b"})


def _broken(message: Message, context: Context) -> Message:
    raise RuntimeError("battery died")


BAD_CLIENTS = {
    "malformed": _raw_app(lambda a, c: _packed(np.random.default_rng(1).bytes(500))),
    "truncated": _raw_app(lambda a, c: _packed(_encoded(a, c)[:-40])),
    "non_finite": _raw_app(_nan),
    "shape_mismatch": _raw_app(_wrong_shape),
    "missing_tensor": _raw_app(_missing),
    "stale_base": _raw_app(lambda a, c: _packed(_encoded(a, c, base_version="0" * 64))),
    "wrong_round": _raw_app(lambda a, c: _packed(_encoded(a, c, round=7))),
    "bad_weight": _raw_app(lambda a, c: _record(a), weight=0),
    "client_error": _broken,
}


@pytest.mark.parametrize("make", [_fedavg, lambda n: FedMedian(
    min_train_nodes=n, min_available_nodes=n, fraction_evaluate=0.0)])
def test_bad_replies_are_dropped_and_counted(make) -> None:
    good = [step_app(0, True), step_app(1, False)]
    clients = good + list(BAD_CLIENTS.values())
    strategy = make(len(clients))
    out, metrics, stats, _ = _one_round(strategy, clients)
    assert stats.accepted == 2
    assert stats.rejected == len(BAD_CLIENTS)
    reasons = dict(stats.rejected_reasons)
    for reason in ("non_finite", "shape_mismatch", "stale_base", "wrong_round", "bad_weight",
                   "client_error"):
        assert reasons.get(reason) == 1, reasons
    assert reasons.get("missing_tensor", 0) >= 1, reasons
    assert out is not None and metrics is not None
    if isinstance(strategy, FedMedian):  # the median of two is their plain mean
        want = {k: (2 * GLOBAL[k] + STEPS[0][k] + STEPS[1][k]) / 2 for k in ("w", "b")}
    else:
        want = _expected_mean([0, 1])
    for k in ("w", "b"):
        np.testing.assert_allclose(out[k], want[k], atol=_tolerance([0, 1]))


def test_all_replies_bad_gives_no_model() -> None:
    out, metrics, stats, _ = _one_round(_fedavg(2), [_broken, BAD_CLIENTS["non_finite"]])
    assert out is None and metrics is None
    assert stats.rejected == 2 and stats.accepted == 0


# ------------------------------------------------------------ memory: one reply at a time


def test_streaming_holds_one_reply_at_a_time() -> None:
    n = 6
    clients = [step_app(i % NUM_NODES, i % 2 == 0) for i in range(n)]
    grid = InProcessGrid(clients, stream_replies=True)
    wrapper = CompressedStrategy(_fedavg(n), "int8")
    messages = wrapper.configure_train(1, _record(GLOBAL), ConfigRecord(), grid)
    refs: list[weakref.ref] = []
    alive_when_pulled: list[int] = []

    def watched(replies: Iterable[Message]) -> Iterator[Message]:
        for reply in replies:
            gc.collect()
            alive_when_pulled.append(sum(r() is not None for r in refs[:-1]))
            refs.append(weakref.ref(reply))
            yield reply
            del reply

    arrays, _ = wrapper.aggregate_train(1, watched(grid.send_and_receive(messages)))
    assert arrays is not None and wrapper.traffic(1).accepted == n
    assert alive_when_pulled == [0] * n  # replies before the previous one were all freed


# ------------------------------------------------------------ whole runs on digits


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "fedmedian"])
def test_wrapped_strategies_lower_the_loss_on_digits(strategy: str) -> None:
    rounds: list[RoundMetrics] = []
    app = make_server_app(listeners=[rounds.append])
    run_config = {
        "task": "digits", "strategy": strategy, "codec": "int8", "num-rounds": 2,
        "min-train-nodes": 5, "lr": 0.1, "local-epochs": 2, "seed": 1,
    }
    grid = InProcessGrid(make_client_app(mods=[compression_mod]), 5, run_config=run_config)
    ctx = run_server_app_inprocess(app, grid)
    initial = float(ctx.state[REPORT_STATE_KEY]["initial-loss"])
    assert [r.round for r in rounds] == [1, 2]
    assert all(r.rejected == 0 and r.accepted == 5 for r in rounds)
    assert rounds[1].loss < rounds[0].loss < initial
    assert all(r.uplink_bytes > 0 and r.downlink_bytes > r.uplink_bytes for r in rounds)
