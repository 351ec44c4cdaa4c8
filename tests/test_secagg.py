"""Secure aggregation: the coordinator sees masked words, the sum is exact, dropouts, forgeries.

Every round runs the real device mod and the real coordinator round over an
InProcessGrid, whose messages cross Flower's protobuf as between processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import numpy as np
import pytest
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
from flwr.serverapp.strategy import FedAvg
from scipy import stats

from fedge.client.secagg_device import secagg_mod
from fedge.common import secagg_crypto as sc
from fedge.common import secagg_protocol as sp
from fedge.common.arrays import arrays_to_record
from fedge.common.records import records_of
from fedge.common.secagg_errors import SecAggRefused
from fedge.common.secagg_ring import RingSpec, pack_words, quantize_to_ring, unpack_words
from fedge.server.inprocess_grid import InProcessGrid
from fedge.server.secagg_server import SecAggConfig, SecAggStrategy, run_secagg_round

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# scale = clip / 127 = 2**-10 exactly: deltas on this grid quantize to themselves
STEP = 2.0**-10
CLIP = 127 * STEP


def _model(size: int = 12) -> dict[str, np.ndarray]:
    return {
        "w": np.zeros((size // 3, 3), np.float32),
        "b": np.zeros(3, np.float32),
        "steps": np.zeros(1, np.int64),
    }


def _delta_app(deltas: Callable[[int], dict[str, np.ndarray]]) -> ClientApp:
    """A ClientApp with the secagg mod whose training adds deltas(partition) to the model."""
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        record = records_of(msg.content, ArrayRecord)["arrays"]
        arrays = {k: a.numpy() for k, a in record.items()}
        d = deltas(int(context.node_config["partition-id"]))
        out = {k: (a + d[k]).astype(a.dtype) if k in d else a for k, a in arrays.items()}
        metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0})
        return Message(
            RecordDict({"arrays": arrays_to_record(out), "metrics": metrics}), reply_to=msg
        )

    return app


def _grid_deltas(seed: int, size: int = 12) -> Callable[[int], dict[str, np.ndarray]]:
    """Per-partition deltas on the quantizer's grid, within the clipping range."""

    def deltas(pid: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, pid])
        return {
            "w": (rng.integers(-127, 128, (size // 3, 3)) * STEP).astype(np.float32),
            "b": (rng.integers(-127, 128, 3) * STEP).astype(np.float32),
        }

    return deltas


def _train_messages(
    grid: InProcessGrid, model: dict[str, np.ndarray], rnd: int = 1
) -> list[Message]:
    return [
        Message(
            RecordDict(
                {"arrays": arrays_to_record(model), "config": ConfigRecord({"server-round": rnd})}
            ),
            node,
            MessageType.TRAIN,
        )
        for node in grid.get_node_ids()
    ]


def _stage(msg: Message) -> str | None:
    rec = records_of(msg.content, ConfigRecord).get(sp.SECAGG_RECORD) if msg.has_content() else None
    value = rec.get(sp.STAGE) if rec is not None else None
    return value if isinstance(value, str) else None


def _flat(d: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([d["w"].ravel(), d["b"].ravel()])


class RecordingGrid(InProcessGrid):
    """Keeps every message the coordinator receives (and lets a test rewrite what it sends)."""

    def __init__(self, *args, rewrite: Callable[[Message], None] | None = None, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.received: list[Message] = []
        self.rewrite = rewrite

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):  # type: ignore[no-untyped-def]
        batch = list(messages)
        if self.rewrite is not None:
            for m in batch:
                self.rewrite(m)
        replies = list(super().send_and_receive(batch, timeout=timeout))
        self.received.extend(replies)
        return replies


# ------------------------------------------------------------------ primitives


@pytest.mark.parametrize("bits", [3, 6, 8, 9, 11, 12, 15, 16, 20, 25, 26, 31, 32])
def test_words_pack_tightly_and_round_trip(bits: int) -> None:
    rng = np.random.default_rng(bits)
    n = 70_001
    dtype = np.uint16 if bits <= 16 else np.uint32
    words = rng.integers(0, 1 << bits, n, dtype=np.uint64).astype(dtype)
    data = pack_words(words, bits)
    assert len(data) == (n * bits + 7) // 8
    assert np.array_equal(unpack_words(data, n, bits), words)
    with pytest.raises(SecAggRefused, match="bad_input"):
        unpack_words(data[:-1], n, bits)


def test_ring_size_holds_the_sum_of_all_clients() -> None:
    assert RingSpec(8, 100).word_bits == 15  # int8, 100 clients: 1.875 bytes packed
    assert RingSpec(4, 100).word_bits == 11
    spec = RingSpec(8, 100)
    assert 100 * 2 * spec.qmax < 1 << spec.word_bits


def test_stochastic_rounding_is_unbiased_and_residual_is_exact() -> None:
    spec = RingSpec(8, 4)
    x = np.full(200_000, 0.3 * STEP, np.float32)
    scales = np.full(x.size, STEP, np.float32)
    residual = np.empty_like(x)
    words = quantize_to_ring(x, scales, spec, np.random.default_rng(0), residual)
    q = words.astype(np.int64) - spec.qmax
    assert set(np.unique(q)) == {0, 1}
    assert abs(q.mean() - 0.3) < 0.01
    assert np.allclose(residual, x - q * STEP, atol=0)


def test_shamir_any_threshold_subset_recovers_fewer_do_not() -> None:
    secret = os.urandom(32)
    xs = [1, 2, 3, 4, 5]
    shares = sc.shamir_split(secret, xs, 3)
    points = list(zip(xs, shares, strict=True))
    assert sc.shamir_combine(points[:3], 32) == secret
    assert sc.shamir_combine(points[2:], 32) == secret
    with pytest.raises(SecAggRefused):
        assert sc.shamir_combine(points[:2], 32) != secret
    with pytest.raises(SecAggRefused, match="share_malformed"):
        sc.shamir_combine([(1, shares[0][:-1]), *points[1:3]], 32)
    with pytest.raises(SecAggRefused, match="share_malformed"):
        sc.shamir_combine([(1, b"\xff" * sc.SHARE_BYTES), *points[1:3]], 32)


def test_forged_or_malformed_bundles_are_refused_with_a_reason() -> None:
    key = os.urandom(32)
    sealed = sc.seal(key, b"x" * sp.BUNDLE_BYTES, b"ad")
    forged = bytes([sealed[-1] ^ 1]).join([sealed[:-1], b""])
    with pytest.raises(SecAggRefused, match=r"\(share_forged\)"):
        sc.open_sealed(key, forged, b"ad")
    with pytest.raises(SecAggRefused, match=r"\(share_forged\)"):
        sc.open_sealed(key, sealed, b"other ad")
    with pytest.raises(SecAggRefused, match=r"\(share_malformed\)"):
        sc.open_sealed(key, sealed[:10], b"ad")
    with pytest.raises(SecAggRefused, match=r"\(share_malformed\)"):
        sp.ShareBundle.from_bytes(b"short")


def test_graph_is_symmetric_and_sparse() -> None:
    n = 100
    k = sp.default_degree(n)
    graph = sp.neighbour_graph(n, k, seed=7)
    assert k == 44  # sized for 20 % dropouts with a majority threshold
    assert n * sp.short_of_threshold(k, sp.default_threshold(k), 0.2) <= 1e-3
    assert n * sp.short_of_threshold(16, 9, 0.2) > 0.5  # the bare log floor would not do
    for i, near in enumerate(graph):
        assert len(near) == k and i not in near
        assert all(i in graph[j] for j in near)


# ------------------------------------------------------------------ protocol


def test_unmasked_aggregate_is_exactly_the_sum_of_quantized_updates() -> None:
    deltas = _grid_deltas(seed=1)
    grid = InProcessGrid(_delta_app(deltas), 6)
    model = _model()
    res = run_secagg_round(
        grid, _train_messages(grid, model), SecAggConfig(clip=CLIP), server_round=1
    )
    expected = sum(_flat(deltas(p)) for p in range(6))
    assert res.dropped == [] and len(res.survivors) == 6 and not res.refused
    assert np.array_equal(res.delta_sum, expected)
    mean = {k: a.numpy() for k, a in res.arrays.items()}
    assert np.array_equal(mean["b"], (expected[-3:] / np.float32(6)).astype(np.float32))
    assert np.array_equal(mean["steps"], model["steps"])  # integer tensors are not aggregated
    assert res.num_examples == 60


def test_off_grid_updates_sum_within_one_step_per_device() -> None:
    rng = np.random.default_rng(5)
    fixed = {
        p: {
            "w": rng.normal(0, 0.02, (4, 3)).astype(np.float32),
            "b": rng.normal(0, 0.02, 3).astype(np.float32),
        }
        for p in range(5)
    }
    grid = InProcessGrid(_delta_app(lambda p: fixed[p]), 5)
    res = run_secagg_round(grid, _train_messages(grid, _model()), SecAggConfig(clip=CLIP))
    clipped = sum(np.clip(_flat(fixed[p]), -CLIP, CLIP) for p in range(5))
    assert np.all(np.abs(res.delta_sum - clipped) <= 5 * STEP + 1e-9)


def _vanish_after(stage: str, app: ClientApp) -> Callable[[Message, Context], Message]:
    """The real device, which computes its reply for `stage` and then vanishes (an error reply)."""

    def client(msg: Message, context: Context) -> Message:
        current = _stage(msg)
        reply = app(msg, context)
        if current == stage:
            raise ConnectionError(f"device vanished after {stage}")
        return reply

    return client


def test_twenty_percent_drop_after_masking_and_the_rest_sum_exactly() -> None:
    n = 10
    deltas = _grid_deltas(seed=2)
    app = _delta_app(deltas)
    gone = {3, 7}  # 20 %: they mask their input, then vanish before it arrives
    late = {5}  # masked input arrives, then it misses the unmask stage
    clients = [
        _vanish_after(sp.MASKED_INPUT, app)
        if p in gone
        else _vanish_after(sp.UNMASK, app)
        if p in late
        else app
        for p in range(n)
    ]
    grid = InProcessGrid(clients, n)
    res = run_secagg_round(grid, _train_messages(grid, _model()), SecAggConfig(clip=CLIP))
    ids = list(grid.get_node_ids())
    assert sorted(res.dropped) == sorted(ids[p] for p in gone)
    assert len(res.survivors) == 8
    expected = sum(_flat(deltas(p)) for p in range(n) if p not in gone)
    assert np.array_equal(res.delta_sum, expected)
    assert res.refused == {"masked-input:device_error": 2, "unmask:device_error": 1}


def test_too_many_dropouts_fail_the_round_instead_of_releasing_a_wrong_sum() -> None:
    n = 6
    app = _delta_app(_grid_deltas(seed=3))
    clients = [_vanish_after(sp.MASKED_INPUT, app) if p < 4 else app for p in range(n)]
    grid = InProcessGrid(clients, n)
    with pytest.raises(SecAggRefused, match="reconstruction_failed"):
        run_secagg_round(
            grid, _train_messages(grid, _model()), SecAggConfig(clip=CLIP, min_survivors=2)
        )


def _masked_words_of(grid: RecordingGrid, node: int, spec: RingSpec, n: int) -> np.ndarray:
    for reply in grid.received:
        if reply.metadata.src_node_id != node or reply.has_error():
            continue
        arrays = records_of(reply.content, ArrayRecord)
        if "arrays" in arrays and sp.MASKED_KEY in arrays["arrays"]:
            return unpack_words(arrays["arrays"][sp.MASKED_KEY].data, n, spec.word_bits)
    raise AssertionError("no masked input recorded")


def _seed_reconstructed_by_coordinator(grid: RecordingGrid, index: int) -> bytes:
    """What the coordinator learns of device `index`: its self-mask seed, from unmask shares."""
    points = []
    for reply in grid.received:
        rec = (
            records_of(reply.content, ConfigRecord).get(sp.SECAGG_RECORD)
            if reply.has_content()
            else None
        )
        if rec is None or sp.SEED_OF not in rec:
            continue
        sender_index = list(grid.get_node_ids()).index(reply.metadata.src_node_id)
        for target, share in zip(rec[sp.SEED_OF], rec[sp.SEED_SHARES], strict=True):  # type: ignore[arg-type]
            if target == index:
                points.append((sp.share_point(sender_index), share))
    return sc.shamir_combine(points, sc.SEED_BYTES)


def test_what_the_coordinator_receives_is_independent_of_a_device_input() -> None:
    """Across fresh rounds, device 0's masked vector (even with its self-mask removed, which the
    coordinator can do for a survivor) is uniform over the ring for two opposite inputs, while
    its unmasked words are not: the test has the power to see an input if one leaked."""
    n, size, rounds = 3, 300, 40
    spec = RingSpec(8, n)
    samples: dict[str, list[np.ndarray]] = {"plus": [], "minus": []}
    raw: list[np.ndarray] = []
    for label, sign in (("plus", 1.0), ("minus", -1.0)):

        def deltas(pid: int, sign: float = sign) -> dict[str, np.ndarray]:
            value = sign * CLIP if pid == 0 else 0.0
            return {
                "w": np.full((size // 3, 3), value, np.float32),
                "b": np.full(3, value, np.float32),
            }

        for r in range(rounds):
            grid = RecordingGrid(_delta_app(deltas), n, seed=r)
            res = run_secagg_round(
                grid, _train_messages(grid, _model(size)), SecAggConfig(clip=CLIP)
            )
            assert len(res.survivors) == n
            node0 = next(iter(grid.get_node_ids()))
            words = _masked_words_of(grid, node0, spec, size + 3)
            seed = _seed_reconstructed_by_coordinator(grid, 0)
            unself = (words - sc.expand_mask(seed, words.size, spec.word_bits)) & spec.modulus_mask
            samples[label].append(unself)
            raw.append(np.full(words.size, spec.qmax + sign * spec.qmax, np.int64))
    bins = 1 << spec.word_bits
    counts = {
        k: np.bincount(np.concatenate(v).astype(np.int64), minlength=bins)
        for k, v in samples.items()
    }
    for label, c in counts.items():
        assert stats.chisquare(c).pvalue > 1e-4, label
    two_sample = stats.chi2_contingency(np.stack([counts["plus"], counts["minus"]]) + 1)
    assert two_sample.pvalue > 1e-4
    raw_counts = np.bincount(np.concatenate(raw), minlength=bins)
    assert stats.chisquare(raw_counts).pvalue < 1e-12


def test_forged_share_bundle_is_refused_by_the_device_and_the_round_survives() -> None:
    n = 6
    deltas = _grid_deltas(seed=4)
    victim: list[int] = []

    def forge(msg: Message) -> None:
        if _stage(msg) == sp.MASKED_INPUT and not victim:
            victim.append(msg.metadata.dst_node_id)
            rec = msg.content[sp.SECAGG_RECORD]
            bundles = list(rec[sp.BUNDLES])
            bundles[0] = bundles[0][:-1] + bytes([bundles[0][-1] ^ 1])
            rec[sp.BUNDLES] = bundles

    grid = RecordingGrid(_delta_app(deltas), n, rewrite=forge)
    res = run_secagg_round(grid, _train_messages(grid, _model()), SecAggConfig(clip=CLIP))
    errors = [m for m in grid.received if m.has_error() and m.metadata.src_node_id == victim[0]]
    assert len(errors) == 1 and "(share_forged)" in errors[0].error.reason
    assert res.dropped == victim
    pid = list(grid.get_node_ids()).index(victim[0])
    assert np.array_equal(res.delta_sum, sum(_flat(deltas(p)) for p in range(n) if p != pid))


def test_device_refuses_to_reveal_both_secrets_of_one_device() -> None:
    n = 5

    def both(msg: Message) -> None:
        if _stage(msg) == sp.UNMASK:
            rec = msg.content[sp.SECAGG_RECORD]
            rec[sp.DROPPED] = [0]

    grid = RecordingGrid(_delta_app(_grid_deltas(seed=5)), n, rewrite=both)
    with pytest.raises(SecAggRefused):
        run_secagg_round(grid, _train_messages(grid, _model()), SecAggConfig(clip=CLIP))
    reasons = [m.error.reason for m in grid.received if m.has_error()]
    assert len(reasons) == n and all("(unmask_conflict)" in r for r in reasons)


def test_lying_and_malformed_unmask_shares_are_refused_and_the_sum_stays_exact() -> None:
    n = 7
    deltas = _grid_deltas(seed=6)
    app = _delta_app(deltas)

    def liar(msg: Message, context: Context) -> Message:
        reply = app(msg, context)
        if _stage(msg) == sp.UNMASK:
            rec = reply.content[sp.SECAGG_RECORD]
            shares = list(rec[sp.SEED_SHARES])
            rec[sp.SEED_SHARES] = [os.urandom(sc.SHARE_BYTES - 1) + b"\0" for _ in shares]
        return reply

    def malformed(msg: Message, context: Context) -> Message:
        reply = app(msg, context)
        if _stage(msg) == sp.UNMASK:
            rec = reply.content[sp.SECAGG_RECORD]
            rec[sp.SEED_SHARES] = [s[:-1] for s in rec[sp.SEED_SHARES]]  # type: ignore[index, union-attr]
        return reply

    grid = InProcessGrid([liar, malformed, *[app] * (n - 2)], n)
    res = run_secagg_round(grid, _train_messages(grid, _model()), SecAggConfig(clip=CLIP))
    assert res.refused == {"unmask:share_malformed": 1}
    assert np.array_equal(res.delta_sum, sum(_flat(deltas(p)) for p in range(n)))


def test_strategy_wrapper_runs_fedavg_rounds_through_secure_aggregation() -> None:
    n = 5
    deltas = _grid_deltas(seed=8)
    grid = InProcessGrid(_delta_app(deltas), n)
    strategy = SecAggStrategy(
        FedAvg(fraction_train=1.0, fraction_evaluate=0.0), SecAggConfig(clip=CLIP)
    )
    result = strategy.start(grid=grid, initial_arrays=arrays_to_record(_model()), num_rounds=2)
    total = sum(_flat(deltas(p)) for p in range(n)) / np.float32(n)
    final = {k: a.numpy() for k, a in result.arrays.items()}
    got = np.concatenate([final["w"].ravel(), final["b"].ravel()])
    assert np.allclose(got, 2 * total, atol=1e-6)
    r2 = strategy.result(2)
    assert r2 is not None and len(r2.survivors) == n and r2.round_trips == 4
    assert r2.num_examples == 10 * n
    assert result.train_metrics_clientapp[2]["train-loss"] == pytest.approx(1.0)


def test_hundred_devices_on_the_sparse_graph_survive_twenty_percent_dropouts() -> None:
    """SecAgg+'s point: 100 devices with 44 neighbours each (not 99); 20 of them vanish
    after masking and the coordinator still unmasks the exact sum of the other 80."""
    n = 100
    deltas = _grid_deltas(seed=9, size=6)
    app = _delta_app(deltas)
    gone = set(np.random.default_rng(9).choice(n, 20, replace=False).tolist())
    clients = [_vanish_after(sp.MASKED_INPUT, app) if p in gone else app for p in range(n)]
    grid = InProcessGrid(clients, n)
    res = run_secagg_round(grid, _train_messages(grid, _model(6)), SecAggConfig(clip=CLIP))
    assert res.degree == 44 and res.threshold == 23
    assert len(res.survivors) == 80 and len(res.dropped) == 20
    expected = sum(_flat(deltas(p)) for p in range(n) if p not in gone)
    assert np.array_equal(res.delta_sum, expected)
    # each device's key/share traffic follows k, not n: one bundle per neighbour
    assert res.traffic["share-keys"].up < n * 60 * sp.BUNDLE_BYTES


def test_a_round_that_cannot_unmask_releases_nothing_and_the_run_goes_on() -> None:
    n = 5
    deltas = _grid_deltas(seed=10)
    app = _delta_app(deltas)
    # round 1: three of five vanish after masking (threshold 3 of 4 neighbours fails)
    clients = [_round_vanish(app, {1}) if p < 3 else app for p in range(n)]
    grid = InProcessGrid(clients, n)
    strategy = SecAggStrategy(
        FedAvg(fraction_train=1.0, fraction_evaluate=0.0), SecAggConfig(clip=CLIP)
    )
    result = strategy.start(grid=grid, initial_arrays=arrays_to_record(_model()), num_rounds=2)
    assert strategy.grid is not None
    assert strategy.grid.failures[1].reason == "reconstruction_failed"
    assert strategy.result(1) is None and strategy.result(2) is not None
    final = {k: a.numpy() for k, a in result.arrays.items()}
    got = np.concatenate([final["w"].ravel(), final["b"].ravel()])
    assert np.allclose(got, sum(_flat(deltas(p)) for p in range(n)) / np.float32(n), atol=1e-6)


def _round_vanish(app: ClientApp, rounds: set[int]) -> Callable[[Message, Context], Message]:
    """The real device, vanishing after its masked input in the given server rounds."""

    def client(msg: Message, context: Context) -> Message:
        config = records_of(msg.content, ConfigRecord).get("config") if msg.has_content() else None
        vanish = _stage(msg) == sp.MASKED_INPUT and config is not None
        vanish = vanish and config.get("server-round") in rounds  # type: ignore[union-attr]
        reply = app(msg, context)  # (the mod takes its record out of msg)
        if vanish:
            raise ConnectionError("device vanished after masking")
        return reply

    return client


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"bits": 5}, "bits 5"), ({"clip": 0.0}, "clip 0.0"), ({"max_dropout": 1.0}, "max_dropout"),
     ({"threshold": 0}, "threshold 0"), ({"min_survivors": 0}, "min_survivors")],
)  # fmt: skip
def test_bad_settings_are_refused_when_built(kwargs: dict, named: str) -> None:
    with pytest.raises(SecAggRefused, match=rf"\(bad_config\): .*{named}"):
        SecAggConfig(**kwargs)
