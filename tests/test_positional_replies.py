"""Stock replies keyed by position, as Flower's quickstart-numpy builds them.

`ArrayRecord(list_of_arrays)` keys the arrays `"0"`..`"n-1"`; stock FedAvg
averages them key by key without complaint. fedge reads them as the global
model's tensors in order and aggregates them to the same mean; a reply with
the wrong number of arrays, or a wrong shape at some position, is still
refused with its reason.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from fedge.common.errors import UpdateRejected
from fedge.server.compressed_strategy import CompressedStrategy
from fedge.server.inprocess_grid import InProcessGrid, run_server_app_inprocess
from fedge.server.reply_decoder import by_position, decode_reply, layout_of
from fedge.server.round_metrics import RoundMetrics
from fedge.server.server_app import make_server_app

RNG = np.random.default_rng(7)
GLOBAL = {
    "fc1.weight": RNG.normal(size=(16, 8)).astype(np.float32),
    "fc1.bias": RNG.normal(size=16).astype(np.float32),
    "fc2.weight": RNG.normal(size=(4, 16)).astype(np.float32),
}
LAYOUT = layout_of(GLOBAL)
NODES = 4
WEIGHTS = [5, 10, 20, 40]


def numpy_app(i: int, arrays_of=lambda local: list(local.values())) -> ClientApp:
    """Flower's quickstart-numpy shape: reply `ArrayRecord(list_of_arrays)` and num-examples."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        record = next(iter(message.content.array_records.values()))
        local = {k: a.numpy() + np.float32(0.01 * (i + 1)) for k, a in record.items()}
        content = RecordDict({"arrays": ArrayRecord(arrays_of(local)),
                              "metrics": MetricRecord({"num-examples": WEIGHTS[i]})})
        return Message(content, reply_to=message)

    return app


def _fedavg() -> FedAvg:
    return FedAvg(min_train_nodes=NODES, min_available_nodes=NODES, fraction_evaluate=0.0)


def _reply(arrays: list[np.ndarray]) -> Message:
    from flwr.app import Metadata

    meta = Metadata(run_id=1, message_id="m", src_node_id=3, dst_node_id=1,
                    reply_to_message_id="q", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(
        {"num-examples": 3})})
    return Message(metadata=meta, content=content)


def _decode(message: Message):
    return decode_reply(message, layout=LAYOUT, base_version="v", run_id="r", server_round=1,
                        weighted_by_key="num-examples", max_update_bytes=1 << 20)


def test_flowers_list_record_is_keyed_by_position() -> None:
    assert list(ArrayRecord(list(GLOBAL.values())).keys()) == ["0", "1", "2"]


def test_positional_arrays_are_the_models_tensors_in_order() -> None:
    decoded = _decode(_reply(list(GLOBAL.values())))
    assert list(decoded.arrays) == list(GLOBAL)
    for name, a in GLOBAL.items():
        np.testing.assert_array_equal(decoded.arrays[name], a)
    assert not decoded.compressed and not decoded.is_delta
    named = {k: Array(v) for k, v in GLOBAL.items()}
    assert list(by_position({k: a.numpy() for k, a in named.items()}, LAYOUT)) == list(GLOBAL)


@pytest.mark.parametrize(
    ("arrays", "reason", "words"),
    [
        (list(GLOBAL.values())[:2], "missing_tensor", "2 arrays keyed by position"),
        ([*GLOBAL.values(), np.zeros(3, np.float32)], "unexpected_tensor", "4 arrays"),
        ([GLOBAL["fc1.weight"], GLOBAL["fc1.weight"], GLOBAL["fc2.weight"]], "shape_mismatch",
         "array 1 (fc1.bias)"),
        ([GLOBAL["fc1.weight"], GLOBAL["fc1.bias"].astype(np.int32), GLOBAL["fc2.weight"]],
         "dtype_mismatch", "fc1.bias"),
    ],
)
def test_a_wrong_positional_reply_is_refused_with_its_reason(arrays, reason, words) -> None:
    with pytest.raises(UpdateRejected) as info:
        _decode(_reply(arrays))
    assert info.value.reason == reason and words in str(info.value)


def test_positional_replies_aggregate_as_stock_fedavg() -> None:
    random.seed(0)
    grid = InProcessGrid([numpy_app(i) for i in range(NODES)])
    wrapper = CompressedStrategy(_fedavg(), "int8", run_id="r1")
    global_record = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    messages = wrapper.configure_train(1, global_record, ConfigRecord(), grid)
    replies = list(grid.send_and_receive(messages))
    stock, _ = _fedavg().aggregate_train(1, replies)  # stock FedAvg, keys "0".."2"
    ours, metrics = wrapper.aggregate_train(1, replies)
    stats = wrapper.traffic(1)
    assert stats.accepted == NODES and stats.rejected == 0
    assert stats.wire_codec == "none"  # what arrived: plain arrays, whatever was asked
    assert stock is not None and ours is not None and metrics is not None
    assert list(ours.keys()) == list(GLOBAL)  # the model keeps its names
    for position, name in enumerate(GLOBAL):
        np.testing.assert_allclose(ours[name].numpy(), stock[str(position)].numpy(),
                                   rtol=1e-5, atol=1e-6)  # float32 sums vs float64
    expected = np.average([GLOBAL["fc1.bias"] + 0.01 * (i + 1) for i in range(NODES)],
                          axis=0, weights=WEIGHTS)
    np.testing.assert_allclose(ours["fc1.bias"].numpy(), expected, rtol=1e-5)


def test_fedges_server_app_trains_with_quickstart_numpy_style_clients() -> None:
    """Digits through fedge's ServerApp: positional replies of the right shapes are
    aggregated; one client one array short is dropped, naming why, and the round goes on."""
    short = numpy_app(3, arrays_of=lambda local: list(local.values())[:-1])
    rounds: list[RoundMetrics] = []
    app = make_server_app(listeners=[rounds.append])
    grid = InProcessGrid([numpy_app(0), numpy_app(1), numpy_app(2), short], None,
                         run_config={"task": "digits", "num-rounds": 1, "min-train-nodes": 4,
                                     "codec": "int8", "seed": 1})
    run_server_app_inprocess(app, grid)
    (record,) = rounds
    assert record.accepted == 3 and record.rejected_reasons == {"missing_tensor": 1}
    assert record.codec == "none" and record.accuracy is not None
