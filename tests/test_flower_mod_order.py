"""Where fedge's compression mod goes next to Flower's DP mods (what docs/flower.md says).

`mods=[compression_mod, fixedclipping_mod]`: clipping runs inside compression,
on the full weights it expects, and the clipped update is then compressed.
The reverse fails Flower's key check: the clipping mod finds the encoded
update (`fedge.update`) where it expects the model's keys. And a mod that
must not see evaluate messages (fixedclipping_mod wants a clipping norm in
every message it sees) goes on the train handler: `@app.train(mods=[...])`.
"""

from __future__ import annotations

import logging
import random

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.strategy import FedAvg

from fedge.flower import Compressed, compression_mod
from fedge.server.inprocess_grid import InProcessGrid

RNG = np.random.default_rng(11)
GLOBAL = {"w": RNG.normal(size=(40, 20)).astype(np.float32),
          "b": RNG.normal(size=20).astype(np.float32)}
NODES = 3
CLIP = 0.5
CLIPPING_NORM_KEY = "clipping_norm"  # what Flower's DP strategy wrappers send (flwr 1.42)


def _train(message: Message, context: Context) -> Message:
    """A big step (norm far above CLIP), full weights back, as a stock ClientApp replies."""
    record = next(iter(message.content.array_records.values()))
    local = {k: Array(a.numpy() + np.float32(0.3)) for k, a in record.items()}
    content = RecordDict({"arrays": ArrayRecord(local),
                          "metrics": MetricRecord({"num-examples": 10})})
    return Message(content, reply_to=message)


def _evaluate(message: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 10, "acc": 1.0})}),
                   reply_to=message)


def app_level(mods: list) -> ClientApp:
    app = ClientApp(mods=mods)
    app.train()(_train)
    app.evaluate()(_evaluate)
    return app


def train_only(mods: list) -> ClientApp:
    app = ClientApp()
    app.train(mods=mods)(_train)
    app.evaluate()(_evaluate)
    return app


def _round(client: ClientApp):
    random.seed(0)
    grid = InProcessGrid([client] * NODES)
    strategy = Compressed(FedAvg(min_train_nodes=NODES, min_available_nodes=NODES,
                                 min_evaluate_nodes=NODES, fraction_evaluate=1.0), "int8")
    global_record = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    config = ConfigRecord({CLIPPING_NORM_KEY: CLIP})
    train = strategy.configure_train(1, global_record, config, grid)
    replies = list(grid.send_and_receive(train))
    arrays, _ = strategy.aggregate_train(1, replies)
    evaluate = strategy.configure_evaluate(1, global_record, ConfigRecord(), grid)
    evaluated = list(grid.send_and_receive(evaluate))
    return arrays, strategy.traffic(1), replies, evaluated


def _norm(arrays: ArrayRecord) -> float:
    return float(np.sqrt(sum(np.sum((arrays[k].numpy() - g) ** 2) for k, g in GLOBAL.items())))


def test_clipping_inside_compression_works() -> None:
    arrays, stats, _, evaluated = _round(train_only([compression_mod, fixedclipping_mod]))
    assert stats.accepted == NODES and stats.rejected == 0
    assert stats.wire_codec == "int8"  # compressed after clipping
    assert stats.uplink_bytes < 0.3 * stats.downlink_bytes
    assert arrays is not None
    unclipped = 0.3 * np.sqrt(sum(g.size for g in GLOBAL.values()))
    assert _norm(arrays) <= CLIP * 1.02 < unclipped  # every update was clipped to CLIP
    assert not any(m.has_error() for m in evaluated)  # evaluate never met the clipping mod


def test_compression_inside_clipping_fails_flowers_key_check(caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="flwr"):
        arrays, stats, replies, _ = _round(train_only([fixedclipping_mod, compression_mod]))
    assert arrays is None and stats.accepted == 0
    assert stats.rejected_reasons == {"client_error": NODES}
    assert all(m.has_error() for m in replies)
    key_check = [r for r in caplog.records if r.name == "flwr"
                 and "fixedclipping_mod expects the keys in the ArrayRecord" in r.getMessage()]
    assert len(key_check) == NODES  # Flower's own check refused every reply


def test_a_train_only_mod_registered_for_the_whole_app_breaks_evaluate() -> None:
    _, stats, _, evaluated = _round(app_level([compression_mod, fixedclipping_mod]))
    assert stats.accepted == NODES  # train still works ...
    assert all(m.has_error() for m in evaluated)  # ... but evaluate has no clipping norm
    assert CLIPPING_NORM_KEY in evaluated[0].error.reason
