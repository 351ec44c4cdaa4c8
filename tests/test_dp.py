"""Differential privacy that composes with compression (server/dp.py, docs/privacy.md).

The bound: whatever a device sends (any codec, with error feedback, or a stock
client's plain weights), what the coordinator folds into the mean has L2 norm
at most C. The noise: its standard deviation on the mean is z x C / n. The
accounting: epsilon is dp-accounting's for the same parameters. The budget:
a round that would pass `dp-max-epsilon` is not run, and the last model stays.
"""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedge.client.compression_mod import clip_for_sending, compression_mod
from fedge.common.contract import DP_BELOW_CLIP_KEY, DP_CLIP_KEY, DP_REPLY_KEY
from fedge.common.dp_clip import clip_to_norm, l2_norm
from fedge.common.update_codec import decode_update, encode_update
from fedge.server.compressed_strategy import CompressedStrategy
from fedge.server.dp import (
    DpMean,
    DpSettings,
    PrivacyBudget,
    PrivacyLedger,
    dp_from_config,
    epsilon_for,
    noise_for_epsilon,
)
from fedge.server.inprocess_grid import InProcessGrid, run_server_app_inprocess
from fedge.server.run_config import RunConfigError, validate_run_config
from fedge.server.server_app import RoundEnd, make_server_app

CODECS = ["fp16", "int8", "int4", "int4:block=64", "int8:stochastic", "topk=0.1+int4",
          "topk=0.05+int8:ahead=0.0"]
LAYOUT = {"w": (12, 9), "b": (9,)}
GLOBAL = {"w": np.random.default_rng(1).normal(size=(12, 9)).astype(np.float32),
          "b": np.zeros(9, dtype=np.float32)}
EXPECTED = {k: (v.shape, v.dtype) for k, v in GLOBAL.items()}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


# ------------------------------------------------------------ the clipping bound


def test_clip_to_norm_scales_down_and_leaves_small_updates() -> None:
    big = {"a": np.full(100, 3.0, dtype=np.float32), "n": np.array([7], dtype=np.int64)}
    clipped, norm = clip_to_norm(big, 1.5)
    assert norm == pytest.approx(math.sqrt(100 * 9 + 49))
    assert l2_norm(clipped) <= 1.5 and l2_norm(clipped) == pytest.approx(1.5, rel=1e-5)
    assert clipped["a"].dtype == np.float32 and clipped["n"].dtype == np.float64
    small = {"a": np.full(4, 0.1, dtype=np.float32)}
    same, _ = clip_to_norm(small, 1.0)
    assert np.array_equal(same["a"], small["a"])
    with pytest.raises(ValueError, match="positive"):
        clip_to_norm(small, 0.0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    codec=st.sampled_from(CODECS),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e3),
    clip=st.floats(1e-2, 10.0),
    rounds=st.integers(1, 3),
)
def test_what_the_coordinator_aggregates_is_within_c_for_every_codec(
    codec: str, seed: int, scale: float, clip: float, rounds: int
) -> None:
    """Device: clip(update + residual), quantize, keep the new residual; coordinator: decode
    and fold. Over rounds of error feedback, every folded update has norm <= C, and so has
    the mean of one (no noise)."""
    rng = np.random.default_rng(seed)
    residual: dict[str, np.ndarray] | None = None
    for _ in range(rounds):
        delta = {k: (rng.standard_normal(s) * scale).astype(np.float32)
                 for k, s in LAYOUT.items()}
        sent, _below = clip_for_sending(delta, residual, clip)
        update, residual = encode_update(sent, codec, residual=None, rng=rng, num_examples=3)
        decoded = decode_update(update.SerializeToString(), expected=EXPECTED)
        mean = DpMean(GLOBAL, clip, noise_multiplier=0.0, rng=rng)
        mean.add(decoded.arrays, is_delta=True)
        assert mean.max_folded_norm <= clip
        result = mean.result()
        assert result is not None
        moved = {k: result[k].astype(np.float64) - GLOBAL[k] for k in GLOBAL}
        assert l2_norm(moved) <= clip * (1 + 1e-5)  # float32 rounding of the new model only


def test_quantizing_can_leave_c_so_the_coordinator_clips_again() -> None:
    """Why the coordinator re-clips: Q(clip(v)) is not always within C (stochastic rounding
    moves values up); the folded update still is."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(50):
        delta = {k: rng.standard_normal(s).astype(np.float32) for k, s in LAYOUT.items()}
        sent, _ = clip_for_sending(delta, None, 1.0)
        update, _ = encode_update(sent, "int4:stochastic", rng=rng)
        decoded = decode_update(update.SerializeToString(), expected=EXPECTED)
        worst = max(worst, l2_norm(decoded.arrays))
        mean = DpMean(GLOBAL, 1.0, 0.0, rng)
        mean.add(decoded.arrays, is_delta=True)
        assert mean.max_folded_norm <= 1.0
    assert worst > 1.0


def _app(step: float, compressed: bool) -> ClientApp:
    """A train handler that moves every weight by `step` (a huge update), with or without
    fedge's mod (without: a stock Flower ClientApp's plain reply)."""
    app = ClientApp(mods=[compression_mod] if compressed else [])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        arrays = {k: a.numpy() + step for k, a in message.content["arrays"].items()}
        content = RecordDict({"arrays": _record(arrays),
                              "metrics": MetricRecord({"num-examples": 10})})
        return Message(content, reply_to=message)

    return app


@pytest.mark.parametrize("codec", ["none", "int8", "int4", "topk=0.1+int4"])
def test_stock_and_fedge_replies_are_clipped_on_the_coordinator(codec: str) -> None:
    """Two stock ClientApps (plain full weights, no clipping of their own) and two fedge
    devices, all sending updates of norm ~100 x C: the new model moves by at most C
    (+ the tiny noise), and fedge devices report that they were above C."""
    random.seed(0)
    clip = 0.5
    apps = [_app(5.0, compressed=False), _app(5.0, compressed=False),
            _app(5.0, compressed=True), _app(-5.0, compressed=True)]
    grid = InProcessGrid(apps)
    dp = DpSettings(noise_multiplier=1e-6, clip=clip, delta=1e-3)
    wrapper = CompressedStrategy(FedAvg(min_train_nodes=4, min_available_nodes=4,
                                        fraction_evaluate=0.0), codec, run_id="r", dp=dp)
    messages = list(wrapper.configure_train(1, _record(GLOBAL), ConfigRecord(), grid))
    assert all(m.content["config"][DP_CLIP_KEY] == clip for m in messages)
    replies = list(grid.send_and_receive(messages))
    tags = [r.content[DP_REPLY_KEY][DP_BELOW_CLIP_KEY] for r in replies
            if DP_REPLY_KEY in r.content]
    assert tags == [False, False]  # the two fedge devices clipped and said so
    arrays, _ = wrapper.aggregate_train(1, iter(replies))
    assert arrays is not None
    moved = {k: a.numpy().astype(np.float64) - GLOBAL[k] for k, a in arrays.items()}
    # each folded update has norm <= C, so their mean does too
    assert l2_norm(moved) <= clip * (1 + 1e-4)
    stats = wrapper.traffic(1)
    assert stats.accepted == 4 and stats.dp is not None
    assert stats.dp.clip == clip and stats.dp.aggregated == 4
    assert stats.dp.noise_std == pytest.approx(1e-6 * clip / 4)


# ------------------------------------------------------------ the noise


def test_noise_std_on_the_mean_is_z_c_over_n() -> None:
    z, clip, n, runs = 1.3, 0.7, 5, 25
    base = {"w": np.zeros(4000, dtype=np.float64)}
    rng = np.random.default_rng(7)
    samples = []
    for _ in range(runs):
        mean = DpMean(base, clip, z, rng)
        for _ in range(n):
            mean.add({"w": np.zeros(4000)}, is_delta=True)
        result = mean.result()
        assert result is not None
        samples.append(result["w"])
    values = np.concatenate(samples)  # 100,000 draws: the std is known to ~0.3%
    assert float(np.std(values)) == pytest.approx(z * clip / n, rel=0.02)
    assert abs(float(np.mean(values))) < 4 * (z * clip / n) / math.sqrt(values.size)


# ------------------------------------------------------------ the accounting


@pytest.mark.parametrize(("z", "sampled", "population", "rounds", "delta"), [
    (1.1, 50, 1000, 100, 1e-3), (0.64, 50, 1000, 100, 1e-3), (2.0, 4, 4, 3, 1e-5),
])
def test_epsilon_matches_dp_accounting(z: float, sampled: int, population: int, rounds: int,
                                       delta: float) -> None:
    ledger = PrivacyLedger(z, delta, population)
    for _ in range(rounds):
        ours = ledger.compose(sampled)
    reference = rdp.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(sampled / population, dp_event.GaussianDpEvent(z))
    reference.compose(event, rounds)
    assert ours == pytest.approx(reference.get_epsilon(delta), rel=1e-9)
    assert epsilon_for(z, sampled, population, rounds, delta) == pytest.approx(ours, rel=1e-9)


def test_noise_for_epsilon_lands_on_the_target() -> None:
    z = noise_for_epsilon(3.0, 50, 1000, 100, 1e-3)
    assert epsilon_for(z, 50, 1000, 100, 1e-3) <= 3.0
    assert epsilon_for(z - 0.01, 50, 1000, 100, 1e-3) > 3.0


def test_adaptive_clipping_splits_the_budget_and_moves_c() -> None:
    settings_ = DpSettings(noise_multiplier=0.8, clip=1.0, adaptive=True, count_noise=1.0)
    z_u = settings_.update_noise_multiplier(40)
    assert z_u ** -2 + (2 * 1.0) ** -2 == pytest.approx(0.8 ** -2)
    assert z_u > 0.8  # the count's noise costs some of the budget
    rng = np.random.default_rng(0)
    base = {"w": np.zeros(10)}
    for size, moves in ((1e-3, "down"), (1e3, "up")):
        budget = PrivacyBudget(settings_, rng=rng)
        assert budget.allows(1, 40, 1000)
        mean = budget.mean(base, 40)
        assert mean.noise_multiplier == pytest.approx(z_u)
        for _ in range(40):
            mean.add({"w": np.full(10, size)}, is_delta=True)
        mean.result()
        record = budget.finish(1, mean, 40)
        assert record.clip == 1.0
        assert (budget.clip < 1.0) if moves == "down" else (budget.clip > 1.0)
        # the accountant composes the total z: adaptive clipping is inside the same epsilon
        assert record.epsilon == pytest.approx(epsilon_for(0.8, 40, 1000, 1, 1e-5), rel=1e-9)
    with pytest.raises(ValueError, match="dp-count-noise"):
        DpSettings(noise_multiplier=2.0, clip=1.0, adaptive=True, count_noise=0.5)


# ------------------------------------------------------------ the budget stop


def test_budget_stops_before_a_round_would_pass_it(caplog: pytest.LogCaptureFixture) -> None:
    """All 4 of 4 devices each round (q = 1): epsilon after rounds 1, 2, 3 is known; with the
    budget between rounds 2 and 3 the run stops after round 2 and keeps its model."""
    z, delta = 1.0, 1e-3
    eps = [epsilon_for(z, 4, 4, r, delta) for r in (1, 2, 3)]
    budget = (eps[1] + eps[2]) / 2
    ends: list[RoundEnd] = []
    config = {"task": "digits", "num-rounds": 5, "min-train-nodes": 4, "local-epochs": 1,
              "codec": "int8", "dp-noise": z, "dp-clip": 1.0, "dp-delta": delta,
              "dp-max-epsilon": budget}
    app = make_server_app(config, on_round_end=[ends.append])
    grid = InProcessGrid(_fedge_client(), 4, run_config=config)
    with caplog.at_level(logging.WARNING, logger="fedge.server.dp"):
        context = run_server_app_inprocess(app, grid)
    assert [e.metrics.round for e in ends] == [1, 2]
    assert [e.metrics.epsilon for e in ends] == pytest.approx(eps[:2], rel=1e-9)
    assert all(e.metrics.delta == delta and e.metrics.dp_clip == 1.0 for e in ends)
    lines = [r.getMessage() for r in caplog.records if "DP budget" in r.getMessage()]
    assert len(lines) == 1 and "before round 3" in lines[0] and "round 2" in lines[0]
    final = context.state["fedge.final-arrays"]
    kept = ends[-1].arrays
    assert all(np.array_equal(final[k].numpy(), kept[k].numpy()) for k in kept)


def _fedge_client() -> ClientApp:
    from fedge.client.client_app import make_client_app

    return make_client_app(mods=[compression_mod])


# ------------------------------------------------------------ run config


@pytest.mark.parametrize(("config", "key"), [
    ({"dp-clip": 1.0}, "dp-clip"),
    ({"dp-noise": 1.0}, "dp-clip"),
    ({"dp-noise": 1.0, "dp-clip": 0}, "dp-clip"),
    ({"dp-noise": 1.0, "dp-clip": 1.0, "dp-delta": 1.5}, "dp-delta"),
    ({"dp-noise": 1.0, "dp-clip": 1.0, "strategy": "fedmedian"}, "strategy"),
    ({"dp-noise": 2.0, "dp-clip": 1.0, "dp-adaptive": True, "dp-count-noise": 0.5},
     "dp-count-noise"),
])
def test_run_config_refuses_dp_that_cannot_run(config: dict, key: str) -> None:
    with pytest.raises(RunConfigError) as caught:
        validate_run_config({"task": "digits", **config}, load_task=False)
    assert caught.value.key == key and "\n" not in str(caught.value)


def test_dp_settings_from_run_config() -> None:
    assert dp_from_config({"codec": "int8"}) is None
    got = dp_from_config({"dp-noise": 0.9, "dp-clip": 0.3, "dp-delta": 1e-3,
                          "dp-max-epsilon": 8, "dp-adaptive": "true", "dp-population": 1000})
    assert got == DpSettings(0.9, 0.3, 1e-3, 8.0, True, population=1000)


# ------------------------------------------------------------ the public Flower-app API


def test_a_flower_app_gets_dp_from_fedge_flower() -> None:
    """`from fedge.flower import Compressed, DifferentialPrivacy, compression_mod`: a stock
    FedAvg started through the wrapper reports epsilon per round, and a device behind the
    mod sends plain weights within C of the global model when the codec is `none`."""
    from fedge.flower import Compressed, DifferentialPrivacy
    from fedge.flower import compression_mod as public_mod

    assert public_mod is compression_mod
    random.seed(0)
    grid = InProcessGrid([_app(3.0, compressed=True) for _ in range(3)], stream_replies=True)
    strategy = Compressed(FedAvg(min_train_nodes=3, min_available_nodes=3,
                                 fraction_evaluate=0.0), codec="none",
                          dp=DifferentialPrivacy(noise_multiplier=1e-6, clip=0.25, delta=1e-3))
    result = strategy.start(grid=grid, initial_arrays=_record(GLOBAL), num_rounds=2)
    for rnd in (1, 2):
        assert strategy.traffic(rnd).dp.epsilon == pytest.approx(
            epsilon_for(1e-6, 3, 3, rnd, 1e-3), rel=1e-9)
    final = {k: a.numpy().astype(np.float64) for k, a in result.arrays.items()}
    # two rounds, each moving the model by at most C
    assert l2_norm({k: final[k] - GLOBAL[k] for k in GLOBAL}) <= 2 * 0.25 * (1 + 1e-4)
    # what one device sends: global + clip(local - global)
    messages = list(strategy.configure_train(3, _record(GLOBAL), ConfigRecord(), grid))
    reply = next(iter(grid.send_and_receive(messages[:1])))
    sent = {k: a.numpy().astype(np.float64) - GLOBAL[k] for k, a in reply.content["arrays"].items()}
    assert l2_norm(sent) <= 0.25 * (1 + 1e-5)
    assert reply.content[DP_REPLY_KEY][DP_BELOW_CLIP_KEY] is False


def test_noise_seed_reproduces_the_noise_and_none_does_not() -> None:
    base = {"w": np.zeros(50)}

    def noised(settings_: DpSettings) -> np.ndarray:
        budget = PrivacyBudget(settings_)
        mean = budget.mean(base, 2)
        mean.add({"w": np.ones(50)}, is_delta=True)
        result = mean.result()
        assert result is not None
        return result["w"]

    seeded = DpSettings(1.0, 1.0, noise_seed=5)
    assert np.array_equal(noised(seeded), noised(seeded))
    fresh = DpSettings(1.0, 1.0)
    assert not np.array_equal(noised(fresh), noised(fresh))
    assert dp_from_config({"dp-noise": 1, "dp-clip": 1, "dp-noise-seed": 5}) == seeded
