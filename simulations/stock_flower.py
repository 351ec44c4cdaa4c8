"""The peer: plain Flower apps, stock Flower strategies, no fedge code in the message path.

What the benchmark compares fedge against. The ServerApp is Flower's
`FedAvg.start` (or `FedAvgM.start` when the config says `strategy = fedavgm`,
with `server-lr` and `server-momentum`; `FedAdam`/`FedYogi` with `server-lr`
as eta; `lr-decay` shrinks the client lr each round in a four-line subclass,
as a Flower user would write it) with central
evaluation through `evaluate_fn`; the ClientApp is
a plain `ClientApp` with no mods. Neither uses fedge's wrapper, mod, codec or
message helpers. Only what is not on the wire is shared, so that both sides do
the same work: the task's model, data partitions, and fedge's local training
and evaluation functions, with the same shuffling seeds as fedge's ClientApp.

Bytes are counted by `CountingGrid`, which forwards every call to the real
Grid and adds up `len(Array.data)` of the arrays in the messages it passes
(fedge's wrapper counts the same way), so "uplink" and "downlink" mean the
same thing in both reports.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi

from fedge.common.contract import FINAL_ARRAYS_STATE_KEY
from fedge.common.task import resolve_task
from fedge.common.training import evaluate, torch_threads, train
from fedge.server.round_metrics import RoundListener, RoundMetrics


def _array_bytes(message: Message) -> int:
    if not message.has_content():
        return 0
    return sum(len(a.data) for rec in message.content.values()
               if isinstance(rec, ArrayRecord) for a in rec.values())


class CountingGrid(Grid):
    """A Grid that forwards to `inner` and counts the array bytes each way."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self.down = 0
        self.up = 0

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.down += sum(_array_bytes(m) for m in messages)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self.up += sum(_array_bytes(m) for m in replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.down += sum(_array_bytes(m) for m in messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self.up += sum(_array_bytes(m) for m in replies)
        return replies


def stock_server_app(config: Mapping[str, Any], listeners: Sequence[RoundListener] = ()
                     ) -> ServerApp:
    """Flower's FedAvg with the scenario's settings; one RoundMetrics per round to listeners."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = {**dict(config), **dict(context.run_config)}
        random.seed(int(cfg.get("seed", 0)))  # Flower samples nodes with `random`, as fedge
        task = resolve_task(str(cfg.get("task", "digits")))
        test = task.central_test(cfg)
        model = task.make_model()
        counting = CountingGrid(grid)
        strategy = stock_strategy(cfg)
        marks = {"t": time.perf_counter(), "down": 0, "up": 0}

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = evaluate(model, *test) if test is not None else (None, None)
            now = time.perf_counter()
            if server_round > 0:
                record = RoundMetrics(
                    round=server_round, accuracy=acc, loss=loss,
                    uplink_bytes=counting.up - marks["up"],
                    downlink_bytes=counting.down - marks["down"],
                    seconds=now - marks["t"], codec="stock",
                )
                for listener in listeners:
                    listener(record)
            marks.update(t=time.perf_counter(), down=counting.down, up=counting.up)
            return None if loss is None else MetricRecord({"loss": loss, "accuracy": acc})

        train_cfg = {k: task.train_defaults[k] for k in ("lr", "local-epochs", "batch-size")
                     if k in task.train_defaults}
        train_cfg.update({k: cfg[k] for k in ("lr", "local-epochs", "batch-size") if k in cfg})
        result = strategy.start(
            grid=counting,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=int(cfg.get("num-rounds", 3)),
            timeout=float(cfg.get("round-timeout", 3600.0)),
            train_config=ConfigRecord(train_cfg),
            evaluate_fn=evaluate_fn,
        )
        if len(result.arrays) > 0:  # for the scenario's per-client accuracies
            context.state[FINAL_ARRAYS_STATE_KEY] = result.arrays

    return app


def stock_strategy(cfg: Mapping[str, Any]) -> FedAvg:
    """Flower's FedAvg, FedAvgM (the config's server lr and momentum) or FedAdam/FedYogi (its
    server lr as eta, tau as fedge's ServerApp defaults it), with the lr decay."""
    common: dict[str, Any] = {
        "fraction_train": float(cfg.get("fraction-train", 1.0)),
        "fraction_evaluate": 0.0,
        "min_train_nodes": int(cfg.get("min-train-nodes", 2)),
        "min_available_nodes": int(cfg.get("min-train-nodes", 2)),
    }
    name = str(cfg.get("strategy", "fedavg")).lower()
    if name not in ("fedavg", "fedavgm", "fedadam", "fedyogi"):
        raise ValueError(f"the stock peer runs fedavg, fedavgm, fedadam or fedyogi, not {name!r}")
    decay = float(cfg.get("lr-decay", 1.0))
    if name in ("fedadam", "fedyogi"):
        adaptive = FedAdam if name == "fedadam" else FedYogi
        return _Decayed.of(adaptive)(
            **common, eta=float(cfg.get("server-lr", 0.01)), eta_l=float(cfg.get("lr", 0.1)),
            tau=float(cfg.get("server-tau", 1e-3)), lr_decay=decay)
    if name == "fedavgm":
        return _Decayed.of(FedAvgM)(
            **common, server_learning_rate=float(cfg.get("server-lr", 1.0)),
            server_momentum=float(cfg.get("server-momentum", 0.0)), lr_decay=decay)
    return _Decayed.of(FedAvg)(**common, lr_decay=decay)


class _Decayed:
    """The client lr of round r is lr x lr_decay^(r-1): a user's subclass of a Flower strategy."""

    @staticmethod
    def of(base: type[FedAvg]) -> Any:
        class Decayed(base):  # type: ignore[valid-type, misc]
            def __init__(self, *args: Any, lr_decay: float = 1.0, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.lr_decay = lr_decay

            def configure_train(self, server_round: int, arrays: ArrayRecord,
                                config: ConfigRecord, grid: Grid) -> Iterable[Message]:
                if self.lr_decay != 1.0 and "lr" in config:
                    config = ConfigRecord({**config,
                                           "lr": float(config["lr"])
                                           * self.lr_decay ** (server_round - 1)})
                return super().configure_train(server_round, arrays, config, grid)

        Decayed.__name__ = f"{base.__name__}Decayed"
        return Decayed


def stock_client_app(config: Mapping[str, Any]) -> ClientApp:
    """A plain ClientApp training the task's model on its partition (settings from `config`).

    The data settings are closed over, as a user's own ClientApp would hard-code them:
    Flower's Python simulation API gives virtual clients an empty run config.
    """
    settings = dict(config)
    app = ClientApp()

    @app.train()
    def train_fn(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        run = {**settings, **dict(context.run_config)}
        task = resolve_task(str(run.get("task", "digits")))
        model = task.make_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        pid = int(context.node_config.get("partition-id", 0))
        data = task.load_partition(pid, int(context.node_config.get("num-partitions", 1)), run)
        # the same shuffling seed as fedge's ClientApp: (run seed, partition, round)
        seed = int(np.random.SeedSequence(
            [int(run.get("seed", 0)), pid, int(cfg.get("server-round", 0))]
        ).generate_state(1)[0])
        with torch_threads(int(run.get("torch-threads", 1))):
            result = train(model, data.x_train, data.y_train, epochs=int(cfg["local-epochs"]),
                           batch_size=int(cfg["batch-size"]), lr=float(cfg["lr"]), seed=seed)
        content = RecordDict({
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": int(result["num_examples"]),
                                     "train-loss": float(result["train_loss"])}),
        })
        return Message(content, reply_to=msg)

    return app
