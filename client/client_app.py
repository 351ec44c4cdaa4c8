"""fedge's Flower ClientApp: local training and evaluation on a device's own data.

There is one fedge ClientApp, `app`, and it compresses wherever it runs:
Flower's simulation engine (`fedge simulate`, `flwr run .`), Flower's
deployment engine and fedge's edge runtime (`app(message, context)`). Its
handlers reply with full local weights; the compression mod it carries turns
them into an encoded delta on the way out when the server asks for a codec
(and lets them through as they are when it does not, as a stock client would);
its secure-aggregation mod answers the stages of a securely aggregated round
(docs/secure-aggregation.md) and lets every other message through.
`make_client_app(mods)` builds the same handlers behind other mods (tests, the
simulation's run-config mod); `FEDGE_MODS` are the mods `app` carries.

What it reads (see docs/CONTRACTS.md):
- message ConfigRecord "config": `lr`, `local-epochs`, `batch-size`,
  `proximal-mu`, `torch-threads`, `server-round` (optional `momentum`); a key
  the message leaves out falls back to the task's `train_defaults`, then to
  `DEFAULTS` here. `torch-threads` applies for the call only (restored after);
- message ArrayRecord "arrays" (or the message's only ArrayRecord): global weights;
- `context.run_config`: `task` (default `digits`) and the data keys `partition`,
  `alpha`, `classes-per-client`, `seed`, `test-fraction`, `data-dir`;
- `context.node_config`: `partition-id`, `num-partitions` (default 0 of 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedge.client.compression_mod import compression_mod
from fedge.client.flower_compat import Mod
from fedge.client.personal import personal_mod
from fedge.client.secagg_device import secagg_mod
from fedge.common.arrays import arrays_to_record, model_to_arrays, record_to_model
from fedge.common.task import DEFAULT_TASK, ClientData, Task, resolve_task
from fedge.common.training import evaluate, torch_threads, train

# used when neither the message config nor the task's `train_defaults` set a key
DEFAULTS: dict[str, float | int] = {
    "lr": 0.05,
    "local-epochs": 1,
    "batch-size": 32,
    "proximal-mu": 0.0,
    "momentum": 0.0,
}
EVAL_BATCH_SIZE = 256


def _config(message: Message) -> Mapping[str, Any]:
    records = message.content.config_records
    record: ConfigRecord | None = records.get("config")
    return record if record is not None else {}


def _number(cfg: Mapping[str, Any], task: Task, key: str, kind: type[int] | type[float]) -> Any:
    """`key` from the message config, else the task's default, else fedge's."""
    value = cfg.get(key, task.train_defaults.get(key, DEFAULTS.get(key)))
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"config {key!r} must be a number, got {value!r}") from None


def _global_weights(message: Message) -> ArrayRecord:
    records = message.content.array_records
    if "arrays" in records:
        return records["arrays"]
    if len(records) == 1:
        return next(iter(records.values()))
    raise ValueError(
        f"expected the global model in ArrayRecord 'arrays', found {sorted(records) or 'none'}"
    )


def _task(context: Context) -> Task:
    return resolve_task(str(context.run_config.get("task", DEFAULT_TASK) or DEFAULT_TASK))


def _setup(message: Message, context: Context) -> tuple[Task, nn.Module, ClientData]:
    """Resolve the task, load the global weights into its model, and load our partition."""
    task = _task(context)
    model = record_to_model(task.make_model(), _global_weights(message))
    node = context.node_config
    data = task.load_partition(
        int(node.get("partition-id", 0)), int(node.get("num-partitions", 1)), context.run_config
    )
    return task, model, data


def _threads(message: Message, context: Context) -> int | None:
    """`torch-threads` from the message config, else the task's default, else unchanged."""
    task = _task(context)
    value = _config(message).get("torch-threads", task.train_defaults.get("torch-threads"))
    return int(value) if value is not None else None


def _train_seed(context: Context, cfg: Mapping[str, Any]) -> int:
    """Shuffling seed from (run seed, partition, round): reproducible, different per round."""
    parts = [
        int(context.run_config.get("seed", 0)),
        int(context.node_config.get("partition-id", 0)),
        int(cfg.get("server-round", 0)),
    ]
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


def handle_train(message: Message, context: Context) -> Message:
    """Fine-tune the global model on the local training split; reply with full weights."""
    with torch_threads(_threads(message, context)):
        return _train(message, context)


def handle_evaluate(message: Message, context: Context) -> Message:
    """Evaluate the global model on the local test split (never trained on)."""
    with torch_threads(_threads(message, context)):
        return _evaluate(message, context)


def _train(message: Message, context: Context) -> Message:
    cfg = _config(message)
    task, model, data = _setup(message, context)
    result = train(
        model,
        data.x_train,
        data.y_train,
        epochs=_number(cfg, task, "local-epochs", int),
        batch_size=_number(cfg, task, "batch-size", int),
        lr=_number(cfg, task, "lr", float),
        proximal_mu=_number(cfg, task, "proximal-mu", float),
        momentum=_number(cfg, task, "momentum", float),
        seed=_train_seed(context, cfg),
    )
    content = RecordDict(
        {
            "arrays": arrays_to_record(model_to_arrays(model)),
            "metrics": MetricRecord(
                {
                    "num-examples": int(result["num_examples"]),
                    "train-loss": float(result["train_loss"]),
                }
            ),
        }
    )
    return Message(content, reply_to=message)


def _evaluate(message: Message, context: Context) -> Message:
    _, model, data = _setup(message, context)
    loss, acc = evaluate(model, data.x_test, data.y_test, batch_size=EVAL_BATCH_SIZE)
    metrics = MetricRecord(
        {"num-examples": int(data.num_test), "eval-loss": float(loss), "eval-acc": float(acc)}
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


def make_client_app(mods: Sequence[Mod] = ()) -> ClientApp:
    """A fresh ClientApp with fedge's train/evaluate handlers behind `mods` (outermost first).

    Flower binds mods when a handler is registered, so each call builds a new app.
    """
    client_app = ClientApp(mods=list(mods))
    client_app.train()(handle_train)
    client_app.evaluate()(handle_evaluate)
    return client_app


#: what fedge's own ClientApp carries, outermost first: secure aggregation (it answers its key
#: and share stages itself and passes every other message through, so it is always on), then
#: compression (which rebuilds a compressed downlink first), then the personal mod (it acts
#: only when the run sets `personalize`)
FEDGE_MODS: tuple[Mod, ...] = (secagg_mod, compression_mod, personal_mod)

#: fedge's ClientApp, as `flwr run .`, `fedge simulate` and `fedge client run` load it
app = make_client_app(mods=FEDGE_MODS)
