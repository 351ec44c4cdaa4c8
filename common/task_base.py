"""The task types every task module builds on: `Task`, `ClientData`, `TaskError`.

Kept apart from `fedge.common.task` (which holds the built-in tasks and the
registry) so that a built-in task living in its own module, such as
`fedge.common.shakespeare_task`, imports these without an import cycle.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from fedge.common.partition import partition_from_config, split_train_test

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
_MEMO_LOCK = threading.Lock()  # the in-process grid may run clients in threads


def _memo(store: dict[Any, dict[Any, Any]], config: Mapping[str, Any] | None) -> dict[Any, Any]:
    """The memo for one run config, keeping only the `_MEMO_CONFIGS` most recent configs.

    Keyed by the whole config (a user's loader may read any key); the bound stops
    a process that runs several runs in a row (e.g. one per codec) from holding
    one copy of the data per run.
    """
    key = _config_key(config)
    with _MEMO_LOCK:
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
