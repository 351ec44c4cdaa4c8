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
import hashlib
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

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
from fedge.common.partition import partition_from_config, split_train_test

DEFAULT_TASK = "digits"
DEFAULT_TEST_FRACTION = 0.2

XY = tuple[np.ndarray, np.ndarray]


class TaskError(ValueError):
    """A task reference cannot be resolved, or a task returned something unusable."""


@dataclass(frozen=True)
class ClientData:
    """One client's data: training arrays and a local test split it never trains on."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        return len(self.y_test)


def _config_key(config: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), repr(v)) for k, v in (config or {}).items()))


_MEMO_CONFIGS = 2


def _memo(store: dict[Any, dict[Any, Any]], config: Mapping[str, Any] | None) -> dict[Any, Any]:
    """The memo for one run config, keeping only the `_MEMO_CONFIGS` most recent configs.

    Keyed by the whole config (a user's loader may read any key); the bound stops
    a process that runs several runs in a row (e.g. one per codec) from holding
    one copy of the data per run.
    """
    key = _config_key(config)
    memo = store.pop(key, None)
    if memo is None:
        memo = {}
        while len(store) >= _MEMO_CONFIGS:
            store.pop(next(iter(store)))
    store[key] = memo  # most recent last
    return memo


@dataclass(eq=False)
class Task:
    """A federated learning task, built from three plain functions.

    - `model_fn()` returns a fresh model; it must be deterministic (seeded), since
      the coordinator and every device build it independently.
    - `partition_fn(partition_id, num_partitions, config)` returns `ClientData`;
      `config` is the run config (see the module docstring for the data keys).
    - `central_test_fn(config)` returns a held-out `(x, y)` the server evaluates
      on each round, or None. It must never overlap any client's data.

    `train_defaults` holds the task's own fallbacks for the train config keys
    (`lr`, `local-epochs`, `batch-size`, ...), used when the server's message
    does not set them.

    Loaded partitions and the central test set are memoised per process, so
    a hundred simulated clients sharing a worker load each split once.
    """

    name: str
    model_fn: Callable[[], nn.Module]
    partition_fn: Callable[[int, int, Mapping[str, Any]], ClientData]
    central_test_fn: Callable[[Mapping[str, Any]], XY | None] | None = None
    input_shape: tuple[int, ...] = ()
    labels: Sequence[str] = ()
    train_defaults: Mapping[str, float | int] = field(default_factory=dict)
    # config key -> {(partition_id, num_partitions): data}; see _memo
    _partitions: dict[Any, dict[tuple[int, int], ClientData]] = field(
        default_factory=dict, init=False, repr=False
    )
    _central: dict[Any, dict[tuple[int, int], XY | None]] = field(
        default_factory=dict, init=False, repr=False
    )

    def make_model(self) -> nn.Module:
        """A fresh model with the task's deterministic initial weights."""
        model = self.model_fn()
        if not isinstance(model, nn.Module):
            raise TaskError(f"task {self.name!r}: model_fn returned {type(model).__name__}")
        return model

    def load_partition(
        self, partition_id: int, num_partitions: int, config: Mapping[str, Any] | None = None
    ) -> ClientData:
        """Client `partition_id`'s data out of `num_partitions` (memoised)."""
        partition_id, num_partitions = int(partition_id), int(num_partitions)
        if num_partitions < 1 or not 0 <= partition_id < num_partitions:
            raise ValueError(
                f"partition-id must be in [0, num-partitions); got {partition_id} "
                f"of {num_partitions}"
            )
        memo = _memo(self._partitions, config)
        key = (partition_id, num_partitions)
        if key not in memo:
            data = self.partition_fn(partition_id, num_partitions, dict(config or {}))
            if not isinstance(data, ClientData):
                raise TaskError(
                    f"task {self.name!r}: partition_fn returned {type(data).__name__}, "
                    "not ClientData"
                )
            memo[key] = data
        return memo[key]

    def central_test(self, config: Mapping[str, Any] | None = None) -> XY | None:
        """The centralized test set `(x, y)`, or None when the task has none (memoised)."""
        if self.central_test_fn is None:
            return None
        memo = _memo(self._central, config)
        if (0, 0) not in memo:
            memo[(0, 0)] = self.central_test_fn(dict(config or {}))
        return memo[(0, 0)]


# ------------------------------------------------ helpers for writing tasks

_SPLITS: dict[tuple[Any, ...], list[np.ndarray]] = {}


def _labels_fingerprint(labels: np.ndarray) -> tuple[Any, ...]:
    a = np.ascontiguousarray(labels)
    return (a.shape, str(a.dtype), hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest())


def client_indices(
    labels: np.ndarray, partition_id: int, num_partitions: int, config: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """(train, local test) indices of one client, partitioned as the config says.

    The partitioning of the whole label array is computed once per process and
    per (labels, clients, partition settings); the local split is seeded by
    (`seed`, partition_id), so each client's split differs but is reproducible.
    """
    part_cfg = {k: config.get(k) for k in ("partition", "alpha", "classes-per-client", "seed")}
    key = (_labels_fingerprint(labels), int(num_partitions), _config_key(part_cfg))
    if key not in _SPLITS:
        _SPLITS[key] = partition_from_config(
            labels, num_partitions, {k: v for k, v in part_cfg.items() if v is not None}
        )
    mine = _SPLITS[key][int(partition_id)]
    frac = float(config.get("test-fraction", DEFAULT_TEST_FRACTION))
    seed = int(config.get("seed", 0))
    return split_train_test(mine, frac, seed=(seed, int(partition_id)))


def client_data(
    x: np.ndarray,
    y: np.ndarray,
    partition_id: int,
    num_partitions: int,
    config: Mapping[str, Any],
) -> ClientData:
    """Cut one client's `ClientData` out of a whole dataset `(x, y)` (copies, writable)."""
    tr, te = client_indices(y, partition_id, num_partitions, config)
    return ClientData(x[tr], y[tr], x[te], y[te])


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

# here, not at the top: shakespeare_task builds its Task from this module's classes
from fedge.common.shakespeare_task import SHAKESPEARE  # noqa: E402

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
