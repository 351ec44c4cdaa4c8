"""ClientApps for device tests against the real coordinator (importable by device processes).

Light on purpose (Flower and numpy only): a device process started with
`--app edge_test_apps:echo_app` loads nothing else. `held_app` keeps a task in
training until a test releases it: in-process through `RELEASE`; in a device
process (one with node config `data-dir`) for good while the environment
variable `FEDGE_TEST_HOLD` is set (the test kills that process), else not at all.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

REPLY_BYTES = 30_000
"""Size of the reply's one array: several upload chunks at the tests' 4 KiB chunk size."""

ENTERED = threading.Event()
RELEASE = threading.Event()

echo_app = ClientApp()
"""Replies at once with `REPLY_BYTES` bytes derived from the task's own array."""

held_app = ClientApp()
"""Like `echo_app`, after waiting for `RELEASE` (or forever under `FEDGE_TEST_HOLD`)."""


def _reply(msg: Message) -> Message:
    task_bytes = next(iter(msg.content["arrays"].values())).numpy().view(np.uint8).ravel()
    values = np.resize(task_bytes + 1, REPLY_BYTES).astype(np.uint8)
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(values)}),
            "metrics": MetricRecord({"num-examples": 10}),
        }
    )
    return Message(content, reply_to=msg)


big_app = ClientApp()
"""Replies with `BIG_REPLY_BYTES`: more than gRPC's flow-control windows hold in flight."""
BIG_REPLY_BYTES = 24 << 20


@big_app.train()
def _big(msg: Message, context: Context) -> Message:
    values = np.arange(BIG_REPLY_BYTES, dtype=np.uint32).astype(np.uint8)
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(values)}),
            "metrics": MetricRecord({"num-examples": 10}),
        }
    )
    return Message(content, reply_to=msg)


@echo_app.train()
def _echo(msg: Message, context: Context) -> Message:
    return _reply(msg)


@held_app.train()
def _held(msg: Message, context: Context) -> Message:
    ENTERED.set()
    data_dir = context.node_config.get("data-dir")
    if data_dir:  # a device process: tell the test it is training
        (Path(str(data_dir)) / "entered").write_text("training")
    if os.environ.get("FEDGE_TEST_HOLD"):
        while True:
            time.sleep(3600)
    if data_dir:  # a device process without the hold answers at once
        return _reply(msg)
    if not RELEASE.wait(120):
        raise RuntimeError("never released")
    return _reply(msg)
