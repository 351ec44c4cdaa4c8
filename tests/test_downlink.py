"""Compressed downlink: deltas against the device's anchor, rebuilt bit for bit."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

import fedge.server.server_app as server_app_module
from fedge.client.client_app import make_client_app
from fedge.client.compression_mod import compression_mod
from fedge.client.downlink_cache import DownlinkError, held_version, receive
from fedge.common.arrays import arrays_to_record
from fedge.common.contract import (
    ANCHOR_STATE_KEY,
    DOWNLINK_ANCHOR_KEY,
    DOWNLINK_ARRAY_KEY,
    DOWNLINK_CODEC_KEY,
    DOWNLINK_TARGET_KEY,
    ZERO_ANCHOR,
)
from fedge.common.downlink import (
    DownlinkFields,
    apply_model_delta,
    encode_model_delta,
    held_of,
    tag_held,
)
from fedge.common.model_version import model_version
from fedge.server.downlink import DownlinkCompressor, downlink_from_config
from fedge.server.flower_compat import set_task_identity
from fedge.server.inprocess_grid import InProcessGrid, run_server_app_inprocess
from fedge.server.round_metrics import RoundMetrics
from fedge.server.server_app import make_server_app

RNG = np.random.default_rng(7)
ANCHOR = {
    "w": RNG.normal(size=(40, 64)).astype(np.float32),
    "b": RNG.normal(size=40).astype(np.float32),
    "n": np.array([3], dtype=np.int64),
}
TARGET = {
    "w": ANCHOR["w"] + RNG.normal(scale=0.05, size=(40, 64)).astype(np.float32),
    "b": ANCHOR["b"] + 0.01,
    "n": np.array([5], dtype=np.int64),
}


def test_model_version_is_pinned_on_the_wire() -> None:
    # devices and coordinators of different fedge versions must name a model alike:
    # names, dtypes, shapes and bytes in order, 128 bits of SHA-256 (docs/CONTRACTS.md)
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    n = np.array([3], dtype=np.int64)
    assert model_version({"w": w, "n": n}) == "23cb3e507305cff75b2505745e54145c"
    assert model_version({"n": n, "w": w}) == "0093162e3df22e29b801199f28f262d2"
    assert model_version({"w": np.asfortranarray(w)}) == model_version({"w": w})
    assert model_version(TARGET) != model_version(ANCHOR)


def test_downlink_fields_are_written_and_read_by_one_pair_of_functions() -> None:
    fields = DownlinkFields("int8", "a" * 32, "b" * 32)
    config = fields.to_config()
    # the wire names are pinned: a device and a coordinator of other fedge versions read them
    assert config == {"fedge.downlink-codec": "int8", "fedge.downlink-anchor": "a" * 32,
                      "fedge.downlink-target": "b" * 32}
    assert DownlinkFields.read({**config, "server-round": 3}) == fields
    assert DownlinkFields("int8", "a" * 32).to_config().keys() == {
        DOWNLINK_CODEC_KEY, DOWNLINK_ANCHOR_KEY}
    assert DownlinkFields.read({DOWNLINK_CODEC_KEY: "none", DOWNLINK_ANCHOR_KEY: "x"}) is None
    assert DownlinkFields.read({}) is None
    reply = RecordDict()
    assert held_of(reply) == ""
    tag_held(reply, "c" * 32)
    assert held_of(reply) == "c" * 32 and list(reply.keys()) == ["fedge.downlink"]


def test_delta_rebuilds_close_to_target_and_deterministically() -> None:
    packed = encode_model_delta(TARGET, ANCHOR, "int8", anchor_version="a1", round=2)
    rebuilt = apply_model_delta(ANCHOR, packed)
    again = apply_model_delta({k: v.copy() for k, v in ANCHOR.items()}, packed)
    assert model_version(rebuilt) == model_version(again)
    assert rebuilt["n"] == 5 and rebuilt["w"].dtype == np.float32
    step = np.abs(TARGET["w"] - ANCHOR["w"]).max() / 127
    assert np.abs(rebuilt["w"] - TARGET["w"]).max() <= step  # one rounding, no more
    assert len(packed.data) < 0.3 * sum(a.nbytes for a in TARGET.values())


def _train_message(arrays: ArrayRecord, **config: Any) -> Message:
    set_task_identity(run_id=1)
    cfg = ConfigRecord({"server-round": 2, **config})
    return Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=1,
                   message_type="train")


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_device_keeps_anchor_and_refuses_a_delta_it_cannot_apply() -> None:
    ctx = _context()
    anchor_v = model_version(ANCHOR)
    full = _train_message(arrays_to_record(ANCHOR), **{DOWNLINK_CODEC_KEY: "int8",
                                                       DOWNLINK_ANCHOR_KEY: anchor_v})
    receive(full, ctx)
    assert held_version(ctx) == anchor_v and ANCHOR_STATE_KEY in ctx.state

    packed = encode_model_delta(TARGET, ANCHOR, "int8", anchor_version=anchor_v)
    target_v = model_version(apply_model_delta(ANCHOR, packed))
    delta = _train_message(ArrayRecord({DOWNLINK_ARRAY_KEY: packed}), **{
        DOWNLINK_CODEC_KEY: "int8", DOWNLINK_ANCHOR_KEY: anchor_v, DOWNLINK_TARGET_KEY: target_v})
    receive(delta, ctx)
    got = {k: a.numpy() for k, a in delta.content["arrays"].items()}
    assert model_version(got) == target_v
    assert held_version(ctx) == anchor_v  # a delta does not move the anchor

    wrong_target = _train_message(ArrayRecord({DOWNLINK_ARRAY_KEY: packed}), **{
        DOWNLINK_CODEC_KEY: "int8", DOWNLINK_ANCHOR_KEY: anchor_v, DOWNLINK_TARGET_KEY: "0" * 32})
    with pytest.raises(DownlinkError, match="differs"):
        receive(wrong_target, ctx)
    assert held_version(ctx) == ""  # a device that cannot trust its anchor drops it
    again = _train_message(ArrayRecord({DOWNLINK_ARRAY_KEY: packed}), **{
        DOWNLINK_CODEC_KEY: "int8", DOWNLINK_ANCHOR_KEY: anchor_v, DOWNLINK_TARGET_KEY: target_v})
    with pytest.raises(DownlinkError, match="holds none"):
        receive(again, _context())


def test_compressed_first_contact_becomes_the_devices_anchor() -> None:
    packed = encode_model_delta(TARGET, None, "int8", anchor_version=ZERO_ANCHOR)
    rebuilt = apply_model_delta(None, packed)
    assert list(rebuilt) == list(TARGET)  # the layout comes from the update itself
    assert rebuilt["n"].dtype == np.int64 and rebuilt["n"] == 5  # integers exact
    step = np.abs(TARGET["w"]).max() / 127
    assert np.abs(rebuilt["w"] - TARGET["w"]).max() <= step
    assert len(packed.data) < 0.3 * sum(a.nbytes for a in TARGET.values())
    target_v = model_version(rebuilt)

    ctx = _context()
    first = _train_message(ArrayRecord({DOWNLINK_ARRAY_KEY: packed}), **{
        DOWNLINK_CODEC_KEY: "int8", DOWNLINK_ANCHOR_KEY: ZERO_ANCHOR,
        DOWNLINK_TARGET_KEY: target_v})
    receive(first, ctx)
    got = {k: a.numpy() for k, a in first.content["arrays"].items()}
    assert model_version(got) == target_v and held_version(ctx) == target_v
    # the next delta is taken against the rebuilt model, which both sides hold exactly
    nxt = {k: v + 0.01 if v.dtype == np.float32 else v for k, v in TARGET.items()}
    delta = encode_model_delta(nxt, rebuilt, "int8", anchor_version=target_v)
    nxt_v = model_version(apply_model_delta(rebuilt, delta))
    msg = _train_message(ArrayRecord({DOWNLINK_ARRAY_KEY: delta}), **{
        DOWNLINK_CODEC_KEY: "int8", DOWNLINK_ANCHOR_KEY: target_v, DOWNLINK_TARGET_KEY: nxt_v})
    receive(msg, ctx)
    assert model_version({k: a.numpy() for k, a in msg.content["arrays"].items()}) == nxt_v


def test_config_turns_it_on_and_checks_the_codec() -> None:
    assert downlink_from_config({}) is None
    assert downlink_from_config({"downlink-codec": "none"}) is None
    made = downlink_from_config({"downlink-codec": "int8", "downlink-keep": 3})
    assert isinstance(made, DownlinkCompressor) and made.keep == 3
    with pytest.raises(ValueError, match="lossless"):
        DownlinkCompressor("none")
    assert downlink_from_config({"downlink-codec": "int8"}).first_contact == "full"
    made = downlink_from_config({"downlink-codec": "int8", "downlink-first-contact": "compressed"})
    assert made.first_contact == "compressed"
    with pytest.raises(ValueError, match="first contact"):
        downlink_from_config({"downlink-codec": "int8", "downlink-first-contact": "int8"})


# ------------------------------------------------------------ whole runs on digits

RUN = {"task": "digits", "codec": "int8", "num-rounds": 3, "min-train-nodes": 5,
       "lr": 0.3, "local-epochs": 2, "seed": 1}
ONE_TEST_IMAGE = 1 / 359 + 1e-9  # the digits test set
DOWNLINK_LOSS_TOLERANCE = 1e-3


class _Seen:
    """An inner client mod recording the version of the model the app trains from."""

    def __init__(self) -> None:
        self.versions: dict[tuple[int, int], str] = {}

    def __call__(self, message: Message, context: Context, call_next: Any) -> Message:
        arrays = {k: a.numpy() for k, a in message.content["arrays"].items()}
        rnd = int(message.content["config"]["server-round"])
        self.versions[(context.node_id, rnd)] = model_version(arrays)
        return call_next(message, context)


def _run(monkeypatch: pytest.MonkeyPatch, config: dict[str, Any], nodes: int = 5,
         stock: int = 0) -> tuple[list[RoundMetrics], list[DownlinkCompressor], _Seen,
                                  InProcessGrid]:
    made: list[DownlinkCompressor] = []

    def capture(run_config: Any, **kw: Any) -> DownlinkCompressor | None:
        found = downlink_from_config(run_config, **kw)
        if found is not None:
            made.append(found)
        return found

    monkeypatch.setattr(server_app_module, "downlink_from_config", capture)
    seen = _Seen()
    rounds: list[RoundMetrics] = []
    grid = InProcessGrid(make_client_app(mods=[compression_mod, seen]), nodes,
                         run_config=config)
    for node_id in grid.node_ids[:stock]:
        grid.set_client(node_id, make_client_app())  # a stock ClientApp, no fedge mod
    run_server_app_inprocess(make_server_app(listeners=[rounds.append]), grid)
    return rounds, made, seen, grid


def test_three_rounds_on_digits_devices_hold_the_servers_model(monkeypatch) -> None:
    rounds, (downlink,), seen, grid = _run(monkeypatch, {**RUN, "downlink-codec": "int8"})
    plain, _, _, _ = _run(monkeypatch, RUN)
    assert all(r.rejected == 0 and r.accepted == 5 for r in rounds)
    # every device trained from exactly the model the server rebuilt for it
    for rnd in (1, 2, 3):
        targets = downlink.history[rnd].targets
        assert {n: seen.versions[(n, rnd)] for n in grid.node_ids} == targets
    first, later = downlink.history[1], [downlink.history[2], downlink.history[3]]
    assert first.full_messages == 5 and first.delta_messages == 0
    assert all(h.delta_messages == 5 and h.full_messages == 0 for h in later)
    assert all(h.returning == 5 for h in later)
    per_message_first = rounds[0].downlink_bytes / 5
    for r in rounds[1:]:
        assert per_message_first / (r.downlink_bytes / 5) >= 3.5, r.downlink_bytes
    # the downlink's rounding costs (next to) nothing: measured, the same final accuracy
    # (0.9248) and 3.2e-4 of loss (an int4 downlink is 2 images and 2.4e-3 of loss off)
    assert abs(rounds[-1].accuracy - plain[-1].accuracy) <= ONE_TEST_IMAGE
    assert abs(rounds[-1].loss - plain[-1].loss) <= DOWNLINK_LOSS_TOLERANCE
    assert rounds[-1].accuracy > 0.9


def test_stock_clients_always_get_the_plain_model(monkeypatch) -> None:
    rounds, (downlink,), _, grid = _run(monkeypatch, {**RUN, "num-rounds": 2,
                                                      "downlink-codec": "int8"}, stock=2)
    assert all(r.rejected == 0 and r.accepted == 5 for r in rounds)
    assert downlink.history[2].full_messages == 2 and downlink.history[2].delta_messages == 3
    assert set(grid.node_ids[:2]).isdisjoint(downlink.holders)


def test_compressed_first_contact_shrinks_every_message_at_the_same_accuracy(monkeypatch) -> None:
    config = {**RUN, "downlink-codec": "int8", "downlink-first-contact": "compressed"}
    rounds, (downlink,), seen, grid = _run(monkeypatch, config)
    plain, _, _, _ = _run(monkeypatch, RUN)
    assert all(r.rejected == 0 and r.accepted == 5 for r in rounds)
    for rnd in (1, 2, 3):
        assert {n: seen.versions[(n, rnd)] for n in grid.node_ids} == \
            downlink.history[rnd].targets
    first = downlink.history[1]
    assert first.first_messages == 5 and first.full_messages == 0
    assert [r.downlink_messages for r in rounds] == [
        {"full": 0, "first": 5, "delta": 0, "returning": 0},
        {"full": 0, "first": 0, "delta": 5, "returning": 5},
        {"full": 0, "first": 0, "delta": 5, "returning": 5}]
    assert all(r.downlink_messages == {} for r in plain)  # plain downlink: nothing to count
    assert all(downlink.history[r].delta_messages == 5 for r in (2, 3))
    for mine, theirs in zip(rounds, plain, strict=True):  # every round, the first one too
        assert theirs.downlink_bytes / mine.downlink_bytes >= 3.5, mine.downlink_bytes
    # measured: the same final accuracy (0.9248), 1.6e-4 of loss
    assert abs(rounds[-1].accuracy - plain[-1].accuracy) <= ONE_TEST_IMAGE
    assert abs(rounds[-1].loss - plain[-1].loss) <= DOWNLINK_LOSS_TOLERANCE


def test_stock_client_under_compressed_first_contact_loses_one_round_once(monkeypatch) -> None:
    config = {**RUN, "downlink-codec": "int8", "downlink-first-contact": "compressed"}
    rounds, (downlink,), _, grid = _run(monkeypatch, config, stock=2)
    # round 1: the stock ClientApps cannot read the quantized model and answer with errors
    assert rounds[0].accepted == 3 and rounds[0].rejected_reasons == {"client_error": 2}
    # from round 2 they get the plain model, the fedge devices deltas
    for rnd in (2, 3):
        assert downlink.history[rnd].full_messages == 2
        assert downlink.history[rnd].delta_messages == 3
    assert all(r.accepted == 5 and r.rejected == 0 for r in rounds[1:])
    assert set(grid.node_ids[:2]) <= downlink.plain_only


def test_a_device_that_lost_its_anchor_costs_one_round_then_gets_the_full_model(
    monkeypatch,
) -> None:
    made: list[DownlinkCompressor] = []
    real = downlink_from_config
    monkeypatch.setattr(server_app_module, "downlink_from_config",
                        lambda cfg, **kw: made.append(real(cfg, **kw)) or made[-1])
    rounds: list[RoundMetrics] = []
    grid = InProcessGrid(make_client_app(mods=[compression_mod]), 4,
                         run_config={**RUN, "num-rounds": 3, "min-train-nodes": 4,
                                     "downlink-codec": "int8"})
    victim = grid.node_ids[0]

    def wipe(record: RoundMetrics) -> None:
        rounds.append(record)
        if record.round == 1:
            grid.context(victim).state = RecordDict()  # the device lost its state

    run_server_app_inprocess(make_server_app(listeners=[wipe]), grid)
    assert rounds[1].rejected_reasons == {"client_error": 1} and rounds[1].accepted == 3
    assert made[0].history[3].full_messages == 1 and rounds[2].rejected == 0


def _edge_fleet_rounds(tmp_path, *run_config: str) -> list[Any]:
    """3 rounds on a coordinator and 3 device processes (the third a stock ClientApp),
    real gRPC with TLS, downlink int8; `run_config` adds KEY=VALUE pairs (TOML values). Returns the
    completed rounds as the store has them."""
    from test_coordinator_e2e import _completed, fleet_of

    extra = [arg for pair in run_config for arg in ("--run-config", pair)]
    with fleet_of(tmp_path) as fleet:
        fleet.start_coordinator("--rounds", "3", "--min-devices", "3", "--min-train-nodes", "3",
                                "--codec", "int8", "--round-timeout", "90",
                                "--run-config", 'downlink-codec="int8"', *extra)
        for i, app in enumerate(["fedge.client.client_app:app"] * 2 + ["e2e_apps:stock_app"]):
            fleet.start_device(f"dev{i}", "--partition-id", str(i), "--num-partitions", "3",
                               "--app", app)
        assert fleet.wait_coordinator(200) == 0
        rounds, _ = fleet.rounds()
    assert _completed(rounds) == [1, 2, 3]
    return rounds


@pytest.mark.timeout(240)
def test_edge_fleet_over_grpc_sends_deltas_to_fedge_devices_only(tmp_path) -> None:
    rounds = _edge_fleet_rounds(tmp_path)
    assert all(r.metrics.accepted == 3 and r.metrics.rejected == 0 for r in rounds)
    full = rounds[0].metrics.downlink_bytes / 3  # round 1: the plain model to everyone
    for r in rounds[1:]:  # then: 2 deltas (fedge devices) + 1 plain model (stock device)
        delta = (r.metrics.downlink_bytes - full) / 2
        assert full / delta >= 3.5, r.metrics
    assert rounds[-1].metrics.accuracy > 0.8


@pytest.mark.timeout(240)
def test_edge_fleet_compressed_first_contact_stock_device_recovers(tmp_path) -> None:
    """With `downlink-first-contact=compressed` every message is small; the stock device
    cannot read the quantized model in round 1 and gets plain models after."""
    rounds = _edge_fleet_rounds(tmp_path, 'downlink-first-contact="compressed"')
    first, later = rounds[0].metrics, [r.metrics for r in rounds[1:]]
    assert first.accepted == 2 and first.rejected_reasons == {"client_error": 1}
    assert first.downlink_messages == {"full": 0, "first": 3, "delta": 0, "returning": 0}
    assert all(m.accepted == 3 and m.rejected == 0 for m in later)
    assert all(m.downlink_messages["full"] == 1 and m.downlink_messages["delta"] == 2
               for m in later)
    quantized = first.downlink_bytes / 3
    for m in later:  # 1 plain model (the stock device) + 2 deltas the size of `quantized`
        full = m.downlink_bytes - 2 * quantized
        assert full / quantized >= 3.5, m
    assert rounds[-1].metrics.accuracy > 0.8
