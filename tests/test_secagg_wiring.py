"""Secure aggregation inside fedge's own apps: the ServerApp's switch, `fedge simulate`'s flags,
and DP on top (docs/secure-aggregation.md, docs/privacy.md).

Everything runs for real: fedge's ClientApp (or a small one with the real mods) on digits
over the in-process Grid, every stage through Flower's protobuf, the real accountant.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from fedge.client.client_app import FEDGE_MODS, app, handle_train, make_client_app
from fedge.client.compression_mod import compression_mod
from fedge.client.secagg_device import secagg_mod
from fedge.common.arrays import arrays_to_record, model_to_record
from fedge.common.contract import DP_CLIP_KEY, DP_REPLY_KEY
from fedge.common.records import records_of
from fedge.common.secagg_ring import RingSpec, quantize_to_ring
from fedge.common.task import resolve_task
from fedge.server.compressed_strategy import CompressedStrategy
from fedge.server.dp import DpSettings, epsilon_for
from fedge.server.inprocess_grid import InProcessGrid, run_server_app_inprocess
from fedge.server.round_metrics import RoundMetrics
from fedge.server.secagg_server import SecAggConfig, SecAggGrid, run_secagg_round
from fedge.server.server_app import make_server_app
from fedge.simulations.cli import _secagg_keys
from fedge.simulations.report import load_report
from fedge.simulations.runner import SimulationOptions, simulate, summary_rows

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
RUN = {"task": "digits", "lr": 0.1, "seed": 3}


def test_fedges_client_app_carries_secagg_outermost() -> None:
    assert FEDGE_MODS[:2] == (secagg_mod, compression_mod)
    import fedge.flower as public  # the public Flower-app API names the same objects

    assert public.secagg_mod is secagg_mod and public.SecAggGrid is SecAggGrid


def test_server_app_switch_runs_secure_rounds_and_says_so() -> None:
    """`secure-aggregation = true`: every round's label and bytes come from the masked
    exchange (4 devices: 8 + 2 ring bits), uplink = the stages' upload."""
    config = {**RUN, "num-rounds": 2, "min-train-nodes": 4, "secure-aggregation": True,
              "secagg-clip": 0.1}
    rounds: list[RoundMetrics] = []
    grid = InProcessGrid(app, 4, run_config=config)
    run_server_app_inprocess(make_server_app(listeners=[rounds.append]), grid)
    assert [r.round for r in rounds] == [1, 2]
    model_words = sum(a.numpy().size for a in model_to_record(
        resolve_task("digits").make_model()).values())  # all float tensors
    for r in rounds:
        assert r.codec == "secagg-int8" and r.accepted == 4 and r.rejected == 0
        s = r.secagg
        assert s is not None and (s["bits"], s["ring_bits"], s["survivors"]) == (8, 10, 4)
        assert r.uplink_bytes == sum(s["up_bytes"].values())
        assert set(s["up_bytes"]) == {"advertise", "share-keys", "masked-input", "unmask"}
        # each masked input: the model's words at 10 bits, plus a small envelope
        words = 4 * RingSpec(8, 4).packed_bytes(model_words)
        assert words <= s["up_bytes"]["masked-input"] <= words * 1.05
        assert r.accuracy is not None
    assert rounds[1].accuracy is not None and rounds[1].accuracy >= 0.8


def test_simulate_flags_run_secure_aggregation_and_the_report_says_the_bytes(
        tmp_path: Path) -> None:
    """`fedge simulate --secure-aggregation --secagg-clip 0.1`'s run config, run in-process
    (the command itself starts Ray): the report's rounds carry the secure exchange."""

    def inprocess(config, clients, listeners) -> None:  # type: ignore[no-untyped-def]
        grid = InProcessGrid(app, clients, run_config=config)
        run_server_app_inprocess(make_server_app(config, listeners=listeners), grid)

    options = SimulationOptions(task="digits", clients=4, rounds=2, min_clients=4, lr=0.1,
                                seed=3, out=tmp_path / "out",
                                secagg=_secagg_keys(True, None, 0.1, None))
    assert options.run_config("none")["secure-aggregation"] is True
    report = load_report(simulate(options, runner=inprocess))
    run = report["runs"][0]
    assert run["uplink_codec"] == "secagg-int8"
    for r in run["rounds"]:
        assert r["secagg"]["ring_bits"] == 10 and r["uplink_bytes"] == sum(
            r["secagg"]["up_bytes"].values())
    assert summary_rows(report)[0][0] == "none (sent: secagg-int8)"


def _flaky_app() -> ClientApp:
    """fedge's mods and training; partition 0 fails after sharing its keys (drops out)."""
    client = ClientApp(mods=[secagg_mod, compression_mod])

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) == 0:
            raise RuntimeError("device lost power")
        return handle_train(msg, context)

    return client


def test_dp_noise_goes_once_on_the_unmasked_sum_divided_by_the_survivors() -> None:
    z, clip, delta = 1.0, 1.0, 1e-3
    task = resolve_task("digits")
    initial = model_to_record(task.make_model())
    grid = InProcessGrid(_flaky_app(), 4, run_config=RUN)
    secure = SecAggGrid(grid, SecAggConfig(clip=0.05, error_feedback=True))
    strategy = CompressedStrategy(
        FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=4), "none",
        dp=DpSettings(noise_multiplier=z, clip=clip, delta=delta, noise_seed=7))
    result = strategy.start(grid=secure, initial_arrays=initial, num_rounds=1)
    secured = secure.results[1]
    assert len(secured.survivors) == 3 and len(secured.dropped) == 1
    stats = strategy.traffic(1)
    assert stats.accepted == 3 and stats.rejected_reasons == {"secagg_dropped": 1}
    assert stats.dp is not None and (stats.dp.sampled, stats.dp.aggregated) == (4, 3)
    assert stats.dp.noise_std == pytest.approx(z * clip / 3)
    assert stats.dp.epsilon == pytest.approx(epsilon_for(z, 4, 4, 1, delta))
    # the released model minus (initial + exact mean of the survivors) is the noise: std z C / 3
    start = {k: a.numpy().astype(np.float64) for k, a in initial.items()}
    sums = secured.delta_sum_by_tensor({k: a.numpy() for k, a in initial.items()})
    noise = np.concatenate([
        (result.arrays[k].numpy().astype(np.float64) - start[k] - sums[k] / 3).ravel()
        for k in start if np.issubdtype(start[k].dtype, np.floating)])
    assert noise.size > 1000
    assert float(np.std(noise)) == pytest.approx(z * clip / 3, rel=0.1)  # not / 4, not / 1
    assert abs(float(np.mean(noise))) < 0.05


def test_dp_with_secure_aggregation_runs_in_the_server_app() -> None:
    config = {**RUN, "num-rounds": 2, "min-train-nodes": 4, "secure-aggregation": True,
              "dp-noise": 0.5, "dp-clip": 1.0, "dp-delta": 1e-3}
    rounds: list[RoundMetrics] = []
    run_server_app_inprocess(make_server_app(listeners=[rounds.append]),
                             InProcessGrid(app, 4, run_config=config))
    for r in rounds:
        assert r.codec == "secagg-int8" and r.dp_noise_std == pytest.approx(0.5 / 4)
        assert r.epsilon == pytest.approx(epsilon_for(0.5, 4, 4, r.round, 1e-3))


def test_quantized_contribution_stays_within_the_dp_clip() -> None:
    """Stochastic rounding of an update clipped to C lands above C almost always (by up to
    sqrt(sum s_i^2)); with max_norm=C the dequantized contribution is within C, and the
    residual is still exactly what was not sent."""
    spec = RingSpec(8, 10)
    d, clip_norm = 5000, 1.0
    scales = np.full(d, np.float32(0.2 / spec.qmax))  # no coordinate near the range's end
    above = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=d).astype(np.float32)
        x *= np.float32(clip_norm / np.linalg.norm(x.astype(np.float64)) * (1 - 1e-7))
        plain = quantize_to_ring(x, scales, spec, np.random.default_rng(seed + 100))
        plain_norm = np.linalg.norm((plain.astype(np.int64) - spec.qmax) * scales.astype(
            np.float64))
        above += plain_norm > clip_norm
        residual = np.empty_like(x)
        words = quantize_to_ring(x, scales, spec, np.random.default_rng(seed + 100), residual,
                                 max_norm=clip_norm)
        sent = (words.astype(np.int64) - spec.qmax) * scales
        norm = float(np.linalg.norm(sent.astype(np.float64)))
        assert 0.995 * clip_norm < norm <= clip_norm, (seed, norm)
        assert np.allclose(residual, x - sent.astype(np.float32), atol=1e-7)
    assert above >= 36  # without the bound the rounding leaves C (measured: 39-40 of 40)


def test_a_device_keeps_its_masked_contribution_within_the_dp_clip() -> None:
    """Two devices through secagg_mod, one sending nothing (a zero delta rounds to exactly
    0): the unmasked sum IS the other's decoded contribution, within C every round."""
    clip_norm = 0.5

    client = ClientApp(mods=[secagg_mod])

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        model = next(iter(msg.content.array_records.values()))
        big = int(context.node_config["partition-id"]) == 1
        rng = np.random.default_rng()
        out = {k: a.numpy() + (rng.normal(size=a.shape).astype(np.float32) if big else 0)
               for k, a in model.items()}
        return Message(RecordDict({"arrays": arrays_to_record(out),
                                   "metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=msg)

    grid = InProcessGrid(client, 2)
    model = {"w": np.zeros((40, 50), np.float32), "b": np.zeros(50, np.float32)}
    for rnd in range(1, 16):
        messages = [Message(RecordDict({
            "arrays": arrays_to_record(model),
            "config": ConfigRecord({"server-round": rnd, DP_CLIP_KEY: clip_norm})}),
            node, MessageType.TRAIN) for node in grid.get_node_ids()]
        result = run_secagg_round(grid, messages, SecAggConfig(clip=0.1), server_round=rnd)
        norm = float(np.linalg.norm(result.delta_sum.astype(np.float64)))
        assert 0.99 * clip_norm < norm <= clip_norm, (rnd, norm)


def test_the_masked_reply_leaves_out_the_dp_clipping_bit() -> None:
    """The compression mod's `below-clip` bit would tell the coordinator one device's norm."""
    replies: list[Message] = []

    class Recording(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            got = list(super().send_and_receive(messages, timeout=timeout))
            replies.extend(got)
            return got

    grid = Recording(make_client_app(mods=[secagg_mod, compression_mod]), 3, run_config=RUN)
    model = {k: a.numpy() for k, a in model_to_record(
        resolve_task("digits").make_model()).items()}
    messages = [Message(RecordDict({
        "arrays": arrays_to_record(model),
        "config": ConfigRecord({"server-round": 1, DP_CLIP_KEY: 0.5, "local-epochs": 1})}),
        node, MessageType.TRAIN) for node in grid.get_node_ids()]
    result = run_secagg_round(grid, messages, SecAggConfig(clip=0.05), server_round=1)
    assert len(result.survivors) == 3
    assert replies and not any(DP_REPLY_KEY in records_of(r.content, ConfigRecord)
                               for r in replies if r.has_content())


def test_a_secure_round_that_releases_nothing_says_why_and_keeps_the_model() -> None:
    """4 devices, `secagg-min-survivors` 5: no sum may be released; the round's record names
    the reason for every device sent to, and the model stays as it was."""
    config = {**RUN, "num-rounds": 1, "min-train-nodes": 4, "secure-aggregation": True,
              "secagg-min-survivors": 5}
    rounds: list[RoundMetrics] = []
    context = run_server_app_inprocess(make_server_app(listeners=[rounds.append]),
                                       InProcessGrid(app, 4, run_config=config))
    (only,) = rounds
    assert only.accepted == 0 and only.rejected_reasons == {"secagg_too_few_neighbours": 4}
    assert only.accuracy == context.state["fedge.report"]["initial-accuracy"]
