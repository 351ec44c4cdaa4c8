"""The personalization mod: a device fits its own head and keeps it to itself.

`ClientApp(mods=[compression_mod, personal_mod])` (this mod innermost, so it
sees the global model as plain weights after a compressed downlink is
rebuilt). When the run config says `personalize = "head"` (or `"full"`), the
device fits its personal part from a global model on its local training
split (`fedge.common.personal.personalize`, `personal-epochs`, `personal-lr`)
when it will use it:

- after answering a train message, when the node config names
  `personal-path` (`fedge client run` does): the part goes into that file,
  which `fedge predict` uses next to the model file, and into
  `context.state` (`fedge.personal`);
- on an evaluate message, from that message's global model, when no
  personal file is kept (a simulated device: nothing would read a part
  fitted after training, and fitting it there took 71 % of a
  `fashion-mnist-100` run's CPU).

The reply to a train message is the app's, untouched: the head never leaves
the device. An evaluate message is answered by the app, plus
`eval-acc-personal` (and `eval-loss-personal`): the coordinator learns how
well personalization works, not what the head is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MessageType

from fedge.client.flower_compat import ClientAppCallable
from fedge.common.arrays import arrays_to_record, record_to_model
from fedge.common.contract import PERSONAL_PATH_KEY, PERSONAL_STATE_KEY
from fedge.common.personal import DEFAULTS, apply_personal, personalize, save_personal
from fedge.common.task import DEFAULT_TASK, resolve_task
from fedge.common.training import evaluate

log = logging.getLogger(__name__)


def personal_mode(context: Context) -> str:
    """The run config's `personalize` (none|head|full); none when unset."""
    return str(context.run_config.get("personalize", "none") or "none").strip().lower()


def _global_record(message: Message) -> ArrayRecord | None:
    records = message.content.array_records
    if "arrays" in records:
        return records["arrays"]
    return next(iter(records.values())) if len(records) == 1 else None


def _task_and_data(context: Context) -> tuple[Any, Any]:
    task = resolve_task(str(context.run_config.get("task", DEFAULT_TASK) or DEFAULT_TASK))
    node = context.node_config
    data = task.load_partition(int(node.get("partition-id", 0)),
                               int(node.get("num-partitions", 1)), context.run_config)
    return task, data


def fit_personal(message: Message, context: Context) -> dict[str, Any] | None:
    """Fit and keep this device's personal part from the message's global model."""
    mode = personal_mode(context)
    record = _global_record(message)
    if mode == "none" or record is None:
        return None
    task, data = _task_and_data(context)
    model = record_to_model(task.make_model(), record)
    cfg = context.run_config
    arrays = personalize(
        model, data.x_train, data.y_train, mode=mode,
        epochs=int(cfg.get("personal-epochs", DEFAULTS["epochs"])),
        lr=float(cfg.get("personal-lr", DEFAULTS["lr"])),
        batch_size=int(cfg.get("batch-size", DEFAULTS["batch-size"])),
        seed=int(cfg.get("seed", 0)) + int(context.node_config.get("partition-id", 0)),
    )
    context.state[PERSONAL_STATE_KEY] = arrays_to_record(arrays)
    path = context.node_config.get(PERSONAL_PATH_KEY)
    if path:
        save_personal(Path(str(path)), arrays)
    return arrays


def held_personal(context: Context) -> dict[str, Any] | None:
    """The personal part this device keeps in its state, or None."""
    record = context.state.array_records.get(PERSONAL_STATE_KEY)
    return None if record is None else {k: a.numpy() for k, a in record.items()}


def keeps_personal_file(context: Context) -> bool:
    """Whether this device keeps its personal part in a file for `fedge predict`."""
    return bool(context.node_config.get(PERSONAL_PATH_KEY))


def _fit_or_warn(message: Message, context: Context) -> None:
    try:
        fit_personal(message, context)
    except Exception as e:  # a failed personal fit never costs the federation the reply
        log.warning("personal model not updated: %s: %s", type(e).__name__, e)


def personal_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Reply as the app does; fit the personal part when it will be used (module docstring),
    report its accuracy on evaluate."""
    kind = message.metadata.message_type.split(".")[0]
    global_record = _global_record(message) if kind == MessageType.TRAIN else None
    reply = call_next(message, context)
    if reply.has_error() or personal_mode(context) == "none":
        return reply
    if kind == MessageType.TRAIN and global_record is not None:
        if keeps_personal_file(context):
            _fit_or_warn(message, context)
    elif kind == MessageType.EVALUATE:
        record = _global_record(message)
        if record is not None and not keeps_personal_file(context):
            _fit_or_warn(message, context)
        held = held_personal(context)
        if held is not None and record is not None:
            task, data = _task_and_data(context)
            model = apply_personal(record_to_model(task.make_model(), record), held)
            loss, acc = evaluate(model, data.x_test, data.y_test)
            for metrics in reply.content.metric_records.values():
                metrics["eval-acc-personal"] = float(acc)
                metrics["eval-loss-personal"] = float(loss)
                break
    return reply
