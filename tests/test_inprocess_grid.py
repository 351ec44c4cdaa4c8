"""The in-process Grid: Flower's Grid contract, persistent contexts, failures, no Ray."""

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
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg

from fedge.common.flower_compat import ErrorCode
from fedge.server.flower_compat import SERVER_NODE_ID
from fedge.server.inprocess_grid import InProcessGrid, run_server_app_inprocess


def echo(message: Message, context: Context) -> Message:
    """Counts its calls in context.state and echoes the partition it holds."""
    counter = context.state.config_records.get("counter", ConfigRecord({"n": 0}))
    counter["n"] = int(counter["n"]) + 1
    context.state["counter"] = counter
    metrics = MetricRecord(
        {"partition": int(context.node_config["partition-id"]), "calls": int(counter["n"])}
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


def _train_messages(grid: InProcessGrid, content: RecordDict | None = None) -> list[Message]:
    content = content if content is not None else RecordDict({"config": ConfigRecord({"x": 1})})
    return [Message(content, node_id, MessageType.TRAIN) for node_id in grid.get_node_ids()]


def test_nodes_have_partitions_and_run_config() -> None:
    grid = InProcessGrid(echo, 4, run_config={"task": "digits"}, run_id=77)
    ids = list(grid.get_node_ids())
    assert len(set(ids)) == 4 and SERVER_NODE_ID not in ids
    for i, node_id in enumerate(ids):
        ctx = grid.context(node_id)
        assert ctx.node_config == {"partition-id": i, "num-partitions": 4}
        assert ctx.run_config == {"task": "digits"}
        assert ctx.run_id == 77 and ctx.node_id == node_id
    assert grid.run.run_id == 77


def test_replies_carry_proper_metadata_and_state_persists() -> None:
    grid = InProcessGrid(echo, 3)
    for round_ in (1, 2):
        sent = _train_messages(grid)
        replies = list(grid.send_and_receive(sent))
        assert len(replies) == 3
        by_id = {m.metadata.message_id: m for m in sent}
        for reply in replies:
            assert reply.metadata.message_id
            request = by_id[reply.metadata.reply_to_message_id]
            assert reply.metadata.src_node_id == request.metadata.dst_node_id
            assert reply.metadata.dst_node_id == SERVER_NODE_ID
            assert reply.metadata.message_type == MessageType.TRAIN
            metrics = reply.content["metrics"]
            assert metrics["calls"] == round_  # the state RecordDict survived the round
            node = grid.node(reply.metadata.src_node_id)
            assert metrics["partition"] == node.context.node_config["partition-id"]
    assert grid.wire.messages_down == 6 and grid.wire.messages_up == 6
    assert grid.wire.bytes_down > 0 and grid.wire.bytes_up > 0


def test_client_cannot_touch_server_objects() -> None:
    def vandal(message: Message, context: Context) -> Message:
        message.content["arrays"]["w"] = Array(np.full(3, 99.0, dtype=np.float32))
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=message)

    grid = InProcessGrid(vandal, 2)
    record = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    grid.send_and_receive(_train_messages(grid, RecordDict({"arrays": record})))
    np.testing.assert_array_equal(record["w"].numpy(), np.zeros(3, dtype=np.float32))


def test_failures_raise_and_no_reply() -> None:
    def broken(message: Message, context: Context) -> Message:
        raise RuntimeError("disk full")

    grid = InProcessGrid([echo, echo, echo, broken], 4)
    a, b, _, _ = grid.node_ids
    grid.set_failure(a, "raise")
    grid.set_failure(b, "no-reply")
    replies = list(grid.send_and_receive(_train_messages(grid)))
    assert len(replies) == 3  # b vanished
    errors = {m.metadata.src_node_id: m.error for m in replies if m.has_error()}
    assert set(errors) == {a, grid.node_ids[3]}
    assert all(e.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION for e in errors.values())
    assert "disk full" in errors[grid.node_ids[3]].reason
    grid.set_failure(a, None)
    grid.set_failure(b, None)
    assert sum(not m.has_error() for m in grid.send_and_receive(_train_messages(grid))) == 3


def test_stream_replies_runs_nodes_lazily() -> None:
    grid = InProcessGrid(echo, 3, stream_replies=True)
    replies = grid.send_and_receive(_train_messages(grid))
    assert sum(n.messages_handled for n in grid.nodes) == 0
    first = next(iter(replies))
    assert first.content["metrics"]["calls"] == 1
    assert sum(n.messages_handled for n in grid.nodes) == 1
    assert len(list(replies)) == 2


def test_push_pull_and_unknown_node() -> None:
    grid = InProcessGrid(echo, 2)
    messages = _train_messages(grid)
    messages.append(Message(RecordDict(), 123456789, MessageType.TRAIN))
    ids = list(grid.push_messages(messages))
    assert len(ids) == 2
    assert len(list(grid.pull_messages(ids[:1]))) == 1
    assert len(list(grid.pull_messages(ids))) == 1  # the first was already delivered
    assert list(grid.pull_messages(ids)) == []


def test_stock_fedavg_serverapp_runs_without_ray() -> None:
    """A plain Flower ServerApp + strategy over the grid; a stock client with plain replies."""
    target = np.arange(4, dtype=np.float32)

    def stock_client(message: Message, context: Context) -> Message:
        w = message.content["arrays"]["w"].numpy()
        new = w + 0.5 * (target - w)
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(new)}),
                "metrics": MetricRecord({"num-examples": 10, "train-loss": float(np.sum(new))}),
            }
        )
        return Message(content, reply_to=message)

    app = ServerApp()
    seen: dict[int, np.ndarray] = {}

    @app.main()
    def main(grid, context: Context) -> None:
        result = FedAvg(fraction_evaluate=0.0).start(
            grid=grid,
            initial_arrays=ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))}),
            num_rounds=2,
            evaluate_fn=lambda r, a: seen.__setitem__(r, a["w"].numpy()),
        )
        context.state["final"] = result.arrays

    grid = InProcessGrid(stock_client, 3, run_config={"k": 1})
    ctx = run_server_app_inprocess(app, grid)
    assert ctx.run_config == {"k": 1}
    np.testing.assert_allclose(seen[2], 0.75 * target, rtol=1e-6)
    np.testing.assert_allclose(ctx.state["final"]["w"].numpy(), 0.75 * target, rtol=1e-6)


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        InProcessGrid(echo)
    with pytest.raises(ValueError):
        InProcessGrid([echo], 2)
    grid = InProcessGrid([echo, echo])
    assert len(grid.nodes) == 2
