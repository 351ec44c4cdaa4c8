"""A ClientApp with the secure-aggregation mod that device processes load by `module:attr`.

Its "training" adds a delta on the quantizer's grid (step 2**-10) that depends only
on the partition, so the test can compute the exact sum the coordinator must find.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedge.client.secagg_device import secagg_mod
from fedge.common.arrays import arrays_to_record
from fedge.common.records import records_of

STEP = 2.0**-10


def partition_delta(pid: int, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng([11, pid])
    return (rng.integers(-127, 128, shape) * STEP).astype(np.float32)


secagg_app = ClientApp(mods=[secagg_mod])


@secagg_app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    record = records_of(msg.content, ArrayRecord)["arrays"]
    out = {k: a.numpy() + partition_delta(pid, a.numpy().shape) for k, a in record.items()}
    metrics = MetricRecord({"num-examples": 1})
    return Message(RecordDict({"arrays": arrays_to_record(out), "metrics": metrics}), reply_to=msg)
