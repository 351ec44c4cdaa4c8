"""Apps and a task the end-to-end tests load by `module:attr` in device and coordinator processes.

- `stock_app`: a ClientApp written the way a Flower user writes one: plain
  torch and scikit-learn, no fedge import, full weights in a plain ArrayRecord.
- `stalling_app`: fedge's ClientApp (with the compression mod) that hangs from
  round 2 on, like a device that loses power mid-round.
- `BIG_TASK`: digits with a 4096-wide MLP (307 k parameters, 1.2 MB of fp32),
  so an uncompressed update is large enough to be cut off mid-upload.
"""

from __future__ import annotations

import os
import time

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from sklearn.datasets import load_digits
from torch import nn

# ------------------------------------------------------------------ stock Flower app

stock_app = ClientApp()


class Net(nn.Module):
    """Same layout as the server's digits model (fc1 64->64, fc2 64->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _my_data(context: Context) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    pid = int(context.node_config.get("partition-id", 0))
    n = int(context.node_config.get("num-partitions", 1))
    x, y = x[pid::n] / 16.0, y[pid::n]
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


@stock_app.train()
def stock_train(msg: Message, context: Context) -> Message:
    net = Net()
    state = {k: torch.tensor(a.numpy()) for k, a in msg.content["arrays"].items()}
    net.load_state_dict(state)
    x, y = _my_data(context)
    opt = torch.optim.SGD(net.parameters(), lr=float(msg.content["config"].get("lr", 0.1)))
    gen = torch.Generator().manual_seed(int(msg.content["config"]["server-round"]))
    for _ in range(2):
        for idx in torch.randperm(len(y), generator=gen).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    arrays = ArrayRecord({k: Array(v.detach().numpy()) for k, v in net.state_dict().items()})
    metrics = MetricRecord({"num-examples": len(y), "train-loss": 0.0})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


# ------------------------------------------------------------------ a device that hangs


def stalling_app(msg: Message, context: Context) -> Message:
    """fedge's app, except that from round `E2E_STALL_FROM` (default 2) on it never answers."""
    from fedge.client.client_app import make_client_app
    from fedge.client.compression_mod import compression_mod

    config = msg.content.config_records.get("config")
    stall_from = int(os.environ.get("E2E_STALL_FROM", "2"))
    if config is not None and int(config.get("server-round", 1)) >= stall_from:
        time.sleep(600)
    return make_client_app(mods=[compression_mod])(msg, context)


# ------------------------------------------------------------------ a big update


def _big_task():  # built lazily: coordinator and devices import this module by name
    from fedge.common.models import DigitsMLP
    from fedge.common.task import DIGITS, Task

    return Task(
        name="digits-wide",
        model_fn=lambda: DigitsMLP(hidden=4096, seed=0),
        partition_fn=DIGITS.partition_fn,
        central_test_fn=DIGITS.central_test_fn,
        input_shape=(1, 8, 8),
        labels=DIGITS.labels,
        train_defaults={"lr": 0.1, "local-epochs": 1, "batch-size": 32, "torch-threads": 1},
    )


BIG_TASK = _big_task
BIG_PARAMS = 64 * 4096 + 4096 + 4096 * 10 + 10
"""Parameters of BIG_TASK's model: its fp32 update is 4 x this many bytes."""

