"""The task interface: built-ins, user tasks named `module:object`, memoisation."""

from __future__ import annotations

import gzip
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedge.common.datasets import load_digits
from fedge.common.models import DigitsMLP, FedAvgCNN
from fedge.common.task import ClientData, Task, TaskError, client_indices, resolve_task


def write_idx_split(folder: Path, prefix: str, n: int, seed: int = 0) -> None:
    """A tiny MNIST-style split as IDX files (images gzipped, labels plain)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    head = struct.pack(">BBBBIII", 0, 0, 8, 3, n, 28, 28)
    (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + images.tobytes()))
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">BBBBI", 0, 0, 8, 1, n) + labels.tobytes()
    )


USER_MODULE = """
import numpy as np
import torch
from fedge.common.task import ClientData, Task

def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)

def _data(pid, n, config):
    x = np.full((6, 4), pid, np.float32)
    return ClientData(x, np.zeros(6, np.int64), x[:2], np.zeros(2, np.int64))

TASK = Task(name="mine", model_fn=_model, partition_fn=_data, input_shape=(4,), labels=("a", "b"))

def make_task():
    return Task(name="made", model_fn=_model, partition_fn=_data)

def needs_args(x):
    return TASK

def not_a_task():
    return 42

class Holder:
    task = TASK

NUMBER = 3
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"user_task_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_builtins_by_name_and_alias() -> None:
    digits = resolve_task("digits")
    assert digits is resolve_task("Digits") and digits.name == "digits"
    assert isinstance(digits.make_model(), DigitsMLP)
    assert digits.input_shape == (1, 8, 8) and len(digits.labels) == 10
    fm = resolve_task("fmnist")
    assert fm is resolve_task("fashion-mnist")
    assert isinstance(fm.make_model(), FedAvgCNN)
    with pytest.raises(TaskError, match=r"unknown task 'cifar'.*digits"):
        resolve_task("cifar")


def test_user_task_instance_factory_and_dotted(user_module: str) -> None:
    task = resolve_task(f"{user_module}:TASK")
    assert task.name == "mine" and task.labels == ("a", "b")
    data = task.load_partition(3, 5, {})
    assert data.num_train == 6 and data.num_test == 2 and data.x_train[0, 0] == 3
    assert task.central_test() is None
    assert resolve_task(f"{user_module}:make_task").name == "made"
    assert resolve_task(f"{user_module}:Holder.task") is task
    assert resolve_task(task) is task


@pytest.mark.parametrize(
    ("attr", "match"),
    [
        ("missing", "has no attribute 'missing'"),
        ("NUMBER", "is a int, not a Task"),
        ("not_a_task", r"not_a_task\(\) returned int"),
        ("needs_args", "zero-argument factory"),
        ("", "expected 'module:object'"),
    ],
)
def test_bad_user_references_explain_themselves(user_module: str, attr: str, match: str) -> None:
    with pytest.raises(TaskError, match=match):
        resolve_task(f"{user_module}:{attr}")


def test_unimportable_module_is_a_task_error() -> None:
    with pytest.raises(TaskError, match="cannot import module 'no_such_module_xyz'"):
        resolve_task("no_such_module_xyz:TASK")


def test_partition_fn_must_return_client_data() -> None:
    task = Task(name="bad", model_fn=DigitsMLP, partition_fn=lambda *a: (1, 2))
    with pytest.raises(TaskError, match="not ClientData"):
        task.load_partition(0, 1)
    with pytest.raises(ValueError, match="partition-id"):
        task.load_partition(2, 2)


def test_digits_clients_never_see_the_central_test_set() -> None:
    task = resolve_task("digits")
    x_c, y_c = task.central_test()
    n = 10
    parts = [task.load_partition(i, n, {"seed": 1}) for i in range(n)]
    _, y_all = load_digits()
    per_class = np.bincount(y_all)
    assert np.array_equal(np.bincount(y_c), np.round(0.2 * per_class))  # stratified 20%
    assert sum(p.num_train + p.num_test for p in parts) + len(y_c) == 1797
    # the client pool is the complement of the held-out rows, row for row
    pool_rows = {r.tobytes() for p in parts for r in np.concatenate([p.x_train, p.x_test])}
    central_rows = [r.tobytes() for r in x_c]
    overlap = sum(r in pool_rows for r in central_rows)
    assert overlap <= 5  # digits has a handful of duplicate images, nothing more
    for p in parts:
        assert p.x_train.shape[1:] == (1, 8, 8) and p.y_train.dtype == np.int64
        assert abs(p.num_test - 0.2 * (p.num_train + p.num_test)) <= 1


def test_partitions_are_memoised_and_follow_config() -> None:
    task = resolve_task("digits")
    a = task.load_partition(1, 4, {"seed": 0, "partition": "iid"})
    assert task.load_partition(1, 4, {"seed": 0, "partition": "iid"}) is a
    shard = task.load_partition(1, 4, {"seed": 0, "partition": "shards", "classes-per-client": 2})
    both = np.concatenate([shard.y_train, shard.y_test])
    assert len(np.unique(both)) == 2
    assert len(np.unique(np.concatenate([a.y_train, a.y_test]))) == 10


def test_client_indices_local_split_differs_per_client() -> None:
    labels = np.repeat(np.arange(5), 40)
    tr0, te0 = client_indices(labels, 0, 2, {"test-fraction": 0.25})
    tr1, _ = client_indices(labels, 1, 2, {"test-fraction": 0.25})
    assert len(te0) == 25 and len(tr0) == 75
    assert not set(tr0) & set(tr1) and not set(te0) & set(tr0)


def test_fashion_mnist_task_reads_data_dir(tmp_path: Path) -> None:
    write_idx_split(tmp_path, "train", 40)
    write_idx_split(tmp_path, "t10k", 8, seed=3)
    task = resolve_task("fashion-mnist")
    cfg = {"data-dir": str(tmp_path), "seed": 0}
    data = task.load_partition(0, 4, cfg)
    assert data.x_train.shape == (8, 1, 28, 28) and data.x_test.shape == (2, 1, 28, 28)
    assert data.x_train.dtype == np.float32 and data.x_train.max() <= 1.0
    x, y = task.central_test(cfg)
    assert x.shape == (8, 1, 28, 28) and y.shape == (8,)


def test_client_data_sizes() -> None:
    d = ClientData(np.zeros((3, 2)), np.zeros(3), np.zeros((1, 2)), np.zeros(1))
    assert (d.num_train, d.num_test) == (3, 1)


def test_memo_holds_the_two_most_recent_run_configs() -> None:
    task = resolve_task("digits")
    a = task.load_partition(0, 2, {"seed": 11})
    task.load_partition(0, 2, {"seed": 12})
    assert task.load_partition(0, 2, {"seed": 11}) is a  # still held, now most recent
    task.load_partition(0, 2, {"seed": 13})  # evicts seed 12
    task.load_partition(0, 2, {"seed": 12})  # evicts seed 11
    again = task.load_partition(0, 2, {"seed": 11})
    assert again is not a and np.array_equal(again.y_train, a.y_train)
