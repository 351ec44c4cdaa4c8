"""Issue 18's server side: FedAvgM, FedAdam's settings, a client lr schedule, parallel nodes."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM

from fedge.server.compressed_strategy import uses_fedavg_mean
from fedge.server.inprocess_grid import InProcessGrid, run_server_app_inprocess
from fedge.server.run_config import RunConfigError, validate_run_config
from fedge.server.server_app import ServerConfig, build_strategy, make_server_app


def _strategy(**keys: object):  # type: ignore[no-untyped-def]
    return build_strategy(ServerConfig.from_mapping(keys))


def test_fedavgm_and_fedopt_take_their_settings() -> None:
    m = _strategy(strategy="fedavgm", **{"server-momentum": 0.9, "server-lr": 0.2})
    assert isinstance(m, FedAvgM) and (m.server_momentum, m.server_learning_rate) == (0.9, 0.2)
    assert _strategy(strategy="fedavgm").server_learning_rate == 1.0  # FedAvgM's own default
    adam = _strategy(strategy="fedadam", **{"server-tau": 0.01})
    assert isinstance(adam, FedAdam) and (adam.eta, adam.tau) == (0.01, 0.01)
    decayed = _strategy(strategy="fedavg", **{"lr-decay": 0.9})
    assert isinstance(decayed, FedAvg) and decayed.lr_decay == 0.9
    assert uses_fedavg_mean(decayed)  # the schedule keeps FedAvg's streaming mean


@pytest.mark.parametrize(("key", "value"), [("lr-decay", 0.0), ("lr-decay", 1.5),
                                            ("server-momentum", 1.0), ("personalize", "brain")])
def test_bad_settings_are_refused_by_name(key: str, value: object) -> None:
    with pytest.raises(RunConfigError, match=key):
        validate_run_config({"task": "digits", key: value}, load_task=False)


def _lr_recorder(seen: list[tuple[int, float]]):  # type: ignore[no-untyped-def]
    def app(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        seen.append((int(cfg["server-round"]), float(cfg["lr"])))
        content = RecordDict({"arrays": msg.content["arrays"],
                              "metrics": MetricRecord({"num-examples": 10})})
        return Message(content, reply_to=msg)

    return app


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm"])
def test_the_client_lr_shrinks_each_round(strategy: str) -> None:
    seen: list[tuple[int, float]] = []
    config = {"task": "digits", "strategy": strategy, "num-rounds": 3, "min-train-nodes": 2,
              "lr": 0.2, "lr-decay": 0.5}
    grid = InProcessGrid(_lr_recorder(seen), 2, run_config=config)
    run_server_app_inprocess(make_server_app(config), grid)
    assert sorted(set(seen)) == [(1, 0.2), (2, 0.1), (3, 0.05)] and len(seen) == 6


def test_stock_peer_schedules_the_same_lr() -> None:
    from fedge.simulations.stock_flower import stock_server_app

    seen: list[tuple[int, float]] = []
    config = {"task": "digits", "strategy": "fedavgm", "num-rounds": 2, "min-train-nodes": 2,
              "lr": 0.2, "lr-decay": 0.5, "server-momentum": 0.9, "server-lr": 0.5}
    grid = InProcessGrid(_lr_recorder(seen), 2, run_config=config)
    run_server_app_inprocess(stock_server_app(config), grid)
    assert sorted(set(seen)) == [(1, 0.2), (2, 0.1)]


def _echo(msg: Message, context: Context) -> Message:
    counter = context.state.config_records.get("n", ConfigRecord({"n": 0}))
    counter["n"] = int(counter["n"]) + 1
    context.state["n"] = counter
    arrays = ArrayRecord([np.full(3, float(context.node_config["partition-id"]))])
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(
        {"calls": int(counter["n"])})}), reply_to=msg)


def test_parallel_nodes_give_the_replies_in_order_and_keep_their_state() -> None:
    replies = {}
    for workers in (1, 4):
        grid = InProcessGrid(_echo, 6, workers=workers, stream_replies=True)
        for _ in range(2):  # the second round sees the state the first one left
            messages = [Message(RecordDict({"config": ConfigRecord({"a": 1})}), n, "train")
                        for n in grid.node_ids]
            out = list(grid.send_and_receive(messages))
        replies[workers] = [
            (int(next(iter(m.content["arrays"].values())).numpy()[0]),
             int(m.content["metrics"]["calls"]), m.metadata.src_node_id)
            for m in out
        ]
    assert replies[4] == replies[1]
    assert [r[:2] for r in replies[4]] == [(i, 2) for i in range(6)]
