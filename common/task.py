"""The task interface: what a user supplies so fedge can train their model.

A `Task` bundles a model factory, a loader for one client's data and an
optional centralized test set. The ClientApp, the ServerApp and `fedge
simulate` only ever talk to a Task, so the built-ins (`digits`,
`fashion-mnist`) are written against the same interface as a user's own task,
which they name as `module:object` (see docs/tasks.md).

Data config keys (the run config): `partition` (iid|dirichlet|shards),
`alpha`, `classes-per-client`, `seed`, `test-fraction` (local test share,
default 0.2), `data-dir`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedge.common.datasets import (
    DEFAULT_FASHION_MNIST_DIR,
    DIGIT_LABELS,
    FASHION_MNIST_LABELS,
    images_to_float,
    load_digits,
    load_idx,
    load_idx_raw,
)
from fedge.common.models import DigitsMLP, FedAvgCNN
from fedge.common.shakespeare_task import SHAKESPEARE
from fedge.common.task_base import (  # the types, re-exported: tasks import them from here
    DEFAULT_TEST_FRACTION,
    XY,
    ClientData,
    Task,
    TaskError,
    client_data,
    client_indices,
)

__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_TASK",
    "DEFAULT_TEST_FRACTION",
    "XY",
    "ClientData",
    "Task",
    "TaskError",
    "client_data",
    "client_indices",
    "resolve_task",
]

DEFAULT_TASK = "digits"

# ------------------------------------------------ built-in: digits

_DIGITS_HOLDOUT = 0.2
_DIGITS_HOLDOUT_SEED = 20240601  # fixed: the central test set is the same in every run


@functools.cache
def _digits_split() -> tuple[XY, XY]:
    """(client pool, central test): a stratified 20% of digits never given to clients."""
    x, y = load_digits()
    rng = np.random.default_rng(_DIGITS_HOLDOUT_SEED)
    test = np.concatenate(
        [
            rng.permutation(np.flatnonzero(y == c))[: round(_DIGITS_HOLDOUT * np.sum(y == c))]
            for c in np.unique(y)
        ]
    )
    mask = np.zeros(len(y), dtype=bool)
    mask[test] = True
    pool = (_readonly(x[~mask]), _readonly(y[~mask]))
    return pool, (_readonly(x[mask]), _readonly(y[mask]))


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _digits_partition(partition_id: int, num_partitions: int, config: Mapping[str, Any]):
    (x, y), _ = _digits_split()
    return client_data(x, y, partition_id, num_partitions, config)


def _digits_central(config: Mapping[str, Any]) -> XY:
    return _digits_split()[1]


DIGITS = Task(
    name="digits",
    model_fn=lambda: DigitsMLP(seed=0),
    partition_fn=_digits_partition,
    central_test_fn=_digits_central,
    input_shape=(1, 8, 8),
    labels=DIGIT_LABELS,
    # plain SGD on this 4.8 k-parameter MLP needs a large step: 20 IID clients reach
    # ~0.95 central accuracy in 10 FedAvg rounds with these (0.25 at lr 0.05, E=1)
    # one thread: for a model this small, thread hand-off costs more than it saves
    train_defaults={"lr": 0.3, "local-epochs": 5, "batch-size": 16, "torch-threads": 1},
)


# ------------------------------------------------ built-in: Fashion-MNIST


def _data_dir(config: Mapping[str, Any]) -> Path:
    d = config.get("data-dir")
    return Path(str(d)) if d else DEFAULT_FASHION_MNIST_DIR


def _fmnist_partition(partition_id: int, num_partitions: int, config: Mapping[str, Any]):
    images, labels = load_idx_raw(_data_dir(config), "train")
    tr, te = client_indices(labels, partition_id, num_partitions, config)
    x_tr, x_te = images_to_float(images[tr]), images_to_float(images[te])
    return ClientData(x_tr, labels[tr], x_te, labels[te])


def _fmnist_central(config: Mapping[str, Any]) -> XY:
    return load_idx(_data_dir(config), "test")


FASHION_MNIST = Task(
    name="fashion-mnist",
    model_fn=lambda: FedAvgCNN(seed=0),
    partition_fn=_fmnist_partition,
    central_test_fn=_fmnist_central,
    input_shape=(1, 28, 28),
    labels=FASHION_MNIST_LABELS,
    train_defaults={"lr": 0.05, "local-epochs": 1, "batch-size": 32},
)


BUILTIN_TASKS: dict[str, Task] = {
    "digits": DIGITS, "fashion-mnist": FASHION_MNIST, "shakespeare": SHAKESPEARE,
}
_ALIASES = {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist"}


# ------------------------------------------------ resolution

_RESOLVED: dict[str, Task] = {}


def _load_reference(ref: str) -> Task:
    module_name, _, attr_path = ref.partition(":")
    if not module_name or not attr_path:
        raise TaskError(f"bad task reference {ref!r}: expected 'module:object'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TaskError(f"task {ref!r}: cannot import module {module_name!r} ({e})") from e
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise TaskError(f"task {ref!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if isinstance(obj, Task):
        return obj
    if callable(obj):
        try:
            made = obj()
        except TypeError as e:
            raise TaskError(
                f"task {ref!r}: {attr_path} is neither a Task nor a zero-argument "
                f"factory returning one ({e})"
            ) from e
        if isinstance(made, Task):
            return made
        raise TaskError(f"task {ref!r}: {attr_path}() returned {type(made).__name__}, not a Task")
    raise TaskError(f"task {ref!r}: {attr_path} is a {type(obj).__name__}, not a Task")


def resolve_task(name_or_ref: str | Task) -> Task:
    """A built-in task by name (`digits`, `fashion-mnist`) or a user's `module:object`.

    `object` may be a `Task` or a zero-argument factory returning one; dotted
    attributes (`module:holder.task`) work. Results are memoised per process so
    a task's data caches survive between rounds.
    """
    if isinstance(name_or_ref, Task):
        return name_or_ref
    ref = str(name_or_ref).strip()
    if ref in _RESOLVED:
        return _RESOLVED[ref]
    name = _ALIASES.get(ref.lower(), ref.lower())
    if name in BUILTIN_TASKS:
        task = BUILTIN_TASKS[name]
    elif ":" in ref:
        task = _load_reference(ref)
    else:
        known = ", ".join(sorted(BUILTIN_TASKS))
        raise TaskError(
            f"unknown task {ref!r}: use a built-in ({known}) or 'module:object' naming a fedge Task"
        )
    _RESOLVED[ref] = task
    return task
