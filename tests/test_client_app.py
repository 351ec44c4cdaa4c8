"""The ClientApp called in-process, as fedge's edge runtime calls it: `app(message, context)`.

Messages are built with the public `flwr.app.Metadata` (an instruction `Message`
built with `dst_node_id=` needs Flower's process-wide task identity, which only
Flower's runtimes set).
"""

from __future__ import annotations

import importlib
import itertools
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    DEFAULT_TTL,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedge.client.client_app import app, make_client_app
from fedge.common.arrays import (
    arrays_to_record,
    model_to_arrays,
    model_to_record,
    record_to_arrays,
    record_to_model,
)
from fedge.common.task import resolve_task
from fedge.common.training import evaluate

_ids = itertools.count(1)


def make_message(content: RecordDict, message_type: str, group: str = "1") -> Message:
    metadata = Metadata(
        run_id=7,
        message_id=f"msg-{next(_ids)}",
        src_node_id=1,
        dst_node_id=42,
        reply_to_message_id="",
        group_id=group,
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=message_type,
    )
    return Message(content, metadata=metadata)


def make_context(pid: int = 0, n: int = 4, **run_config: Any) -> Context:
    return Context(
        run_id=7,
        node_id=42,
        node_config={"partition-id": pid, "num-partitions": n},
        state=RecordDict(),
        run_config={"task": "digits", "seed": 0, **run_config},
    )


def train_message(arrays: ArrayRecord, **config: Any) -> Message:
    cfg = ConfigRecord(
        {"server-round": 1, "lr": 0.3, "local-epochs": 3, "batch-size": 16, **config}
    )
    return make_message(RecordDict({"arrays": arrays, "config": cfg}), "train")


def eval_message(arrays: ArrayRecord) -> Message:
    return make_message(RecordDict({"arrays": arrays, "config": ConfigRecord({})}), "evaluate")


@pytest.fixture
def global_arrays() -> ArrayRecord:
    return model_to_record(resolve_task("digits").make_model())


def test_train_reply_holds_full_weights_and_metrics(global_arrays: ArrayRecord) -> None:
    msg = train_message(global_arrays)
    reply = app(msg, make_context(pid=1))
    assert not reply.has_error()
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert reply.metadata.message_type == "train"
    content = reply.content
    assert list(content.array_records) == ["arrays"]
    assert list(content.metric_records) == ["metrics"]
    sent = record_to_arrays(global_arrays)
    got = record_to_arrays(content["arrays"])
    assert list(got) == list(sent)
    assert all(got[k].shape == v.shape and got[k].dtype == np.float32 for k, v in sent.items())
    assert not np.array_equal(got["fc1.weight"], sent["fc1.weight"])  # trained: not a delta
    metrics = content["metrics"]
    assert set(metrics) == {"num-examples", "train-loss"}
    expected_n = resolve_task("digits").load_partition(1, 4, make_context().run_config).num_train
    assert metrics["num-examples"] == expected_n and isinstance(metrics["num-examples"], int)
    assert 0.0 < metrics["train-loss"] < 2.3


def test_training_rounds_lower_the_central_loss(global_arrays: ArrayRecord) -> None:
    task = resolve_task("digits")
    x, y = task.central_test()
    loss0, _ = evaluate(task.make_model(), x, y)
    arrays, losses = global_arrays, []
    for rnd in (1, 2, 3):
        reply = app(train_message(arrays, **{"server-round": rnd}), make_context(pid=0, n=2))
        arrays = reply.content["arrays"]
        losses.append(reply.content["metrics"]["train-loss"])
    loss3, acc3 = evaluate(record_to_model(task.make_model(), arrays), x, y)
    assert losses[2] < losses[0]
    assert loss3 < 0.3 * loss0
    assert acc3 > 0.85


def test_evaluate_reply_on_local_test_split(global_arrays: ArrayRecord) -> None:
    trained = app(train_message(global_arrays), make_context(pid=2)).content["arrays"]
    msg = eval_message(trained)
    reply = app(msg, make_context(pid=2))
    assert reply.metadata.message_type == "evaluate"
    assert list(reply.content.array_records) == []
    metrics = reply.content["metrics"]
    assert set(metrics) == {"num-examples", "eval-loss", "eval-acc"}
    local = resolve_task("digits").load_partition(2, 4, make_context().run_config)
    assert metrics["num-examples"] == local.num_test
    assert metrics["eval-acc"] > 0.7
    before = app(eval_message(global_arrays), make_context(pid=2)).content["metrics"]
    assert metrics["eval-loss"] < before["eval-loss"]


def test_config_is_read_from_the_message(global_arrays: ArrayRecord) -> None:
    sent = record_to_arrays(global_arrays)
    # zero local epochs: the weights come back untouched
    reply = app(train_message(global_arrays, **{"local-epochs": 0}), make_context())
    got = record_to_arrays(reply.content["arrays"])
    assert all(np.array_equal(got[k], v) for k, v in sent.items())
    # lr and proximal-mu are honoured: a strong proximal term stays closer to the global model
    free = app(train_message(global_arrays, lr=0.1), make_context())
    prox = app(train_message(global_arrays, lr=0.1, **{"proximal-mu": 2.0}), make_context())

    def dist(r: Message) -> float:
        a = record_to_arrays(r.content["arrays"])
        return float(sum(np.sum((a[k] - v) ** 2) for k, v in sent.items()))

    assert dist(prox) < 0.5 * dist(free)


def test_defaults_when_config_is_empty(global_arrays: ArrayRecord) -> None:
    msg = make_message(RecordDict({"arrays": global_arrays}), "train")
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = app(msg, ctx)  # digits, partition 0 of 1, task's train defaults
    assert reply.content["metrics"]["num-examples"] > 1000


def test_wrong_model_or_missing_weights_fail_loudly(global_arrays: ArrayRecord) -> None:
    arrays = record_to_arrays(global_arrays)
    arrays["fc1.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="shape mismatch"):
        app(train_message(arrays_to_record(arrays)), make_context())
    empty = make_message(RecordDict({"config": ConfigRecord({})}), "train")
    with pytest.raises(ValueError, match="ArrayRecord 'arrays'"):
        app(empty, make_context())


def test_mods_wrap_the_handlers(global_arrays: ArrayRecord) -> None:
    seen: list[str] = []

    def tag_mod(msg: Message, ctx: Context, call: Any) -> Message:
        seen.append(msg.metadata.message_type)
        out = call(msg, ctx)
        metrics: Mapping[str, Any] = out.content["metrics"]
        out.content["metrics"] = MetricRecord({**metrics, "tagged": 1})
        return out

    modded = make_client_app(mods=[tag_mod])
    assert isinstance(modded, ClientApp) and modded is not app
    reply = modded(train_message(global_arrays, **{"local-epochs": 0}), make_context())
    assert reply.content["metrics"]["tagged"] == 1
    modded(eval_message(global_arrays), make_context())
    assert seen == ["train", "evaluate"]
    plain = app(eval_message(global_arrays), make_context())
    assert "tagged" not in plain.content["metrics"]


TINY_TASK_MODULE = """
import numpy as np, torch
from fedge.common.task import ClientData, Task

THREADS_SEEN = []

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        THREADS_SEEN.append(torch.get_num_threads())
        return self.fc(x)

def data(pid, n, cfg):
    x = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]]
    y = np.array([0, 1, 1, 0, 1, 1])
    return ClientData(x, y, x[:3], y[:3])

TASK = Task("tiny", Tiny, data)
"""


@pytest.fixture
def tiny_task_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    name = f"tiny_task_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(TINY_TASK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(name)


def test_user_task_from_run_config(tiny_task_module: ModuleType) -> None:
    ref = f"{tiny_task_module.__name__}:TASK"
    task = resolve_task(ref)
    arrays = model_to_record(task.make_model())
    ctx = make_context(task=ref)
    reply = app(train_message(arrays, lr=0.5, **{"local-epochs": 20}), ctx)
    assert reply.content["metrics"]["num-examples"] == 6
    assert list(reply.content["arrays"]) == list(model_to_arrays(task.make_model()))
    ev = app(eval_message(reply.content["arrays"]), ctx).content["metrics"]
    assert ev["eval-acc"] == 1.0 and ev["num-examples"] == 3


def test_torch_threads_apply_during_the_call_only(tiny_task_module: ModuleType) -> None:
    ref = f"{tiny_task_module.__name__}:TASK"
    arrays = model_to_record(resolve_task(ref).make_model())
    before = torch.get_num_threads()
    want = 3 if before != 3 else 2
    app(train_message(arrays, **{"torch-threads": want}), make_context(task=ref))
    assert tiny_task_module.THREADS_SEEN and set(tiny_task_module.THREADS_SEEN) == {want}
    assert torch.get_num_threads() == before
