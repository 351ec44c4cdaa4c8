"""The compression mod: encoded deltas out, residual kept in context.state, rest untouched."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedge.client.client_app import make_client_app
from fedge.client.compression_mod import compression_mod, make_compression_mod
from fedge.common.contract import RESIDUAL_STATE_KEY, UPDATE_KEY, UPDATE_STYPE
from fedge.common.update_codec import decode_update
from fedge.server.flower_compat import set_task_identity
from fedge.server.inprocess_grid import InProcessGrid

RNG = np.random.default_rng(7)
GLOBAL = {
    "w": RNG.normal(size=(64, 40)).astype(np.float32),
    "b": RNG.normal(size=40).astype(np.float32),
    "steps": np.array(5, dtype=np.int64),
}
STEP = {
    "w": RNG.normal(scale=0.01, size=(64, 40)).astype(np.float32),
    "b": RNG.normal(scale=0.01, size=40).astype(np.float32),
    "steps": np.array(3, dtype=np.int64),
}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def fixed_step_app(mods=(compression_mod,)) -> ClientApp:
    """A stock-style app: local = global + STEP, full weights back, num-examples 12."""
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(message: Message, context: Context) -> Message:
        arrays = {k: a.numpy() for k, a in message.content["arrays"].items()}
        local = {k: v + STEP[k] for k, v in arrays.items()}
        metrics = MetricRecord({"num-examples": 12, "train-loss": 0.5})
        return Message(RecordDict({"arrays": _record(local), "metrics": metrics}), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": 3, "eval-loss": 1.0, "eval-acc": 0.5})
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    return app


def _message(config: dict, message_type: str = MessageType.TRAIN, arrays=None) -> Message:
    set_task_identity(run_id=1)
    content = RecordDict(
        {
            "arrays": _record(GLOBAL if arrays is None else arrays),
            "config": ConfigRecord(config),
        }
    )
    msg = Message(content, 42, message_type)
    msg.metadata.__dict__["_message_id"] = "m1"  # what a link would assign
    return msg


def _context() -> Context:
    return Context(run_id=1, node_id=42, node_config={"partition-id": 0}, state=RecordDict(),
                   run_config={})


CFG = {
    "server-round": 1,
    "fedge.codec": "int8",
    "fedge.base-version": "v1",
    "fedge.run-id": "run-a",
}


def test_train_reply_becomes_one_encoded_update() -> None:
    ctx = _context()
    reply = fixed_step_app()(_message(CFG), ctx)
    record = reply.content["arrays"]
    assert list(record.keys()) == [UPDATE_KEY]
    packed = record[UPDATE_KEY]
    assert packed.stype == UPDATE_STYPE and packed.dtype == "uint8"
    assert tuple(packed.shape) == (len(packed.data),)
    assert reply.content["metrics"]["num-examples"] == 12  # metrics kept as they were
    update = decode_update(packed.data)
    assert update.is_delta and update.codec.startswith("int8")
    assert update.base_version == "v1" and update.run_id == "run-a" and update.round == 1
    assert update.num_examples == 12
    for k in ("w", "b"):
        tol = np.abs(STEP[k]).max() / 127 + 1e-7
        np.testing.assert_allclose(update.arrays[k], STEP[k], atol=tol)
    assert update.arrays["steps"].dtype == np.int64
    assert int(update.arrays["steps"]) == 3  # integer tensors travel losslessly
    # a full fp32 reply of w would be 64*40*4 bytes alone; int8 is about a quarter
    assert len(packed.data) < 0.4 * sum(v.nbytes for v in GLOBAL.values())


def test_residual_persists_and_feeds_the_next_round() -> None:
    ctx = _context()
    app = fixed_step_app()
    decoded = []
    for round_ in (1, 2):
        msg = _message({**CFG, "server-round": round_})
        reply = app(msg, ctx)
        decoded.append(decode_update(reply.content["arrays"][UPDATE_KEY].data))
        assert RESIDUAL_STATE_KEY in ctx.state.array_records
    residual = ctx.state[RESIDUAL_STATE_KEY]
    r = residual["w"].numpy()
    assert r.shape == STEP["w"].shape and np.abs(r).max() > 0
    # error feedback: what was sent over two rounds + what is still owed == two steps
    sent = decoded[0].arrays["w"] + decoded[1].arrays["w"]
    np.testing.assert_allclose(sent + r, 2 * STEP["w"], atol=1e-5)


def test_reset_residual_starts_the_update_without_the_residual() -> None:
    ctx = _context()
    app = fixed_step_app()
    first = decode_update(app(_message({**CFG, "server-round": 1}), ctx)
                          .content["arrays"][UPDATE_KEY].data)
    owed = ctx.state[RESIDUAL_STATE_KEY]["w"].numpy().copy()
    assert np.abs(owed).max() > 0
    msg = _message({**CFG, "server-round": 2, "fedge.reset-residual": True})
    second = decode_update(app(msg, ctx).content["arrays"][UPDATE_KEY].data)
    # the owed part of round 1 is not added: round 2 sends what round 1 sent, one step
    np.testing.assert_allclose(second.arrays["w"], first.arrays["w"], atol=1e-6)


@pytest.mark.parametrize(
    ("codec", "ahead"),
    [("topk=0.05+int8", 1.0), ("topk=0.05+int8:ahead=0.5", 0.5), ("topk=0.05+int8:ahead=0", 0.0)],
)
def test_ahead_trains_from_the_global_model_plus_the_residual(codec: str, ahead: float) -> None:
    ctx = _context()
    seen: list[np.ndarray] = []

    def remember(message: Message, context: Context, call_next) -> Message:
        seen.append(message.content["arrays"]["w"].numpy().copy())
        return call_next(message, context)

    # the recording mod sits after the compression mod: it sees what the app trains from
    app = fixed_step_app(mods=(compression_mod, remember))
    cfg = {**CFG, "fedge.codec": codec}
    decoded = []
    received = []
    for round_ in (1, 2, 3):
        message = _message({**cfg, "server-round": round_})
        received.append(message.content["arrays"])
        reply = app(message, ctx)
        decoded.append(decode_update(reply.content["arrays"][UPDATE_KEY].data))
        owed = ctx.state[RESIDUAL_STATE_KEY]["w"].numpy().copy()
        if round_ == 1:
            first_owed = owed
    np.testing.assert_array_equal(seen[0], GLOBAL["w"])  # no residual yet
    np.testing.assert_allclose(seen[1], GLOBAL["w"] + ahead * first_owed, atol=1e-6)
    # the record that came in (a downlink anchor may be that record) is not changed
    np.testing.assert_array_equal(received[1]["w"].numpy(), GLOBAL["w"])
    # error feedback still conserves: sent over three rounds + still owed == three steps
    sent = sum(d.arrays["w"] for d in decoded)
    np.testing.assert_allclose(sent + owed, 3 * STEP["w"], atol=1e-5)
    assert np.abs(owed).max() > 0


def test_no_codec_or_none_passes_through() -> None:
    for cfg in ({"server-round": 1}, {**CFG, "fedge.codec": "none"}):
        ctx = _context()
        reply = fixed_step_app()(_message(cfg), ctx)
        assert set(reply.content["arrays"].keys()) == set(GLOBAL)
        np.testing.assert_array_equal(reply.content["arrays"]["w"].numpy(), GLOBAL["w"] + STEP["w"])
        assert RESIDUAL_STATE_KEY not in ctx.state


def test_default_codec_applies_without_config() -> None:
    app = fixed_step_app(mods=[make_compression_mod("int4")])
    ctx = _context()
    reply = app(_message({"server-round": 1}), ctx)
    update = decode_update(reply.content["arrays"][UPDATE_KEY].data)
    assert update.codec.startswith("int4")


def test_evaluate_and_errors_pass_through() -> None:
    ctx = _context()
    reply = fixed_step_app()(_message(CFG, MessageType.EVALUATE), ctx)
    assert reply.content["metrics"]["eval-acc"] == 0.5

    app = ClientApp(mods=[compression_mod])

    @app.train()
    def fail(message: Message, context: Context) -> Message:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        app(_message(CFG), ctx)
    assert RESIDUAL_STATE_KEY not in ctx.state


def test_fedge_client_app_with_mod_keeps_residual_across_rounds_on_the_grid() -> None:
    """The real ClientApp behind the mod, on the grid (contexts cross protobuf each time)."""
    grid = InProcessGrid(make_client_app(mods=[compression_mod]), 2, run_config={"task": "digits"})
    from fedge.common.arrays import model_to_record
    from fedge.common.task import resolve_task

    record = model_to_record(resolve_task("digits").make_model())
    for round_ in (1, 2):
        cfg = ConfigRecord({**CFG, "server-round": round_, "lr": 0.1})
        content = RecordDict({"arrays": record, "config": cfg})
        messages = [Message(content, n, MessageType.TRAIN) for n in grid.node_ids]
        replies = list(grid.send_and_receive(messages))
        assert all(not r.has_error() for r in replies)
        assert all(list(r.content["arrays"].keys()) == [UPDATE_KEY] for r in replies)
        residuals = [grid.context(n).state[RESIDUAL_STATE_KEY] for n in grid.node_ids]
        assert all(set(r.keys()) == set(record.keys()) for r in residuals)
        if round_ == 1:
            first = residuals[0]["fc1.weight"].numpy().copy()
    assert not np.array_equal(first, residuals[0]["fc1.weight"].numpy())


def test_a_reply_that_cannot_be_encoded_goes_out_plain() -> None:
    app = ClientApp(mods=[compression_mod])

    @app.train()
    def diverged(message: Message, context: Context) -> Message:
        local = {k: v + STEP[k] for k, v in GLOBAL.items()}
        local["w"] = local["w"].copy()
        local["w"][0, 0] = np.inf
        metrics = MetricRecord({"num-examples": 12, "train-loss": 0.5})
        return Message(RecordDict({"arrays": _record(local), "metrics": metrics}), reply_to=message)

    ctx = _context()
    reply = app(_message(CFG), ctx)
    assert set(reply.content["arrays"].keys()) == set(GLOBAL)  # the server will reject it
    assert np.isinf(reply.content["arrays"]["w"].numpy()[0, 0])
    assert RESIDUAL_STATE_KEY not in ctx.state
