"""Seeded, deterministic partitioners: which sample indices each client holds.

Every partitioner returns `list[np.ndarray]` of sorted int64 indices, one per
client; each sample appears at most once, and partitions are never empty when
there are at least as many samples as clients. The same arguments give the same
partitions on every machine (numpy's PCG64 `default_rng`), so a device can
compute its own share without asking anyone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PARTITIONERS = ("iid", "dirichlet", "shards")


def _check_parts(n_samples: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(n_samples: int, num_partitions: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle and cut into equal shares (sizes differ by at most one)."""
    _check_parts(n_samples, num_partitions)
    perm = np.random.default_rng(seed).permutation(n_samples)
    return _finish(np.array_split(perm, num_partitions))


def _refill_small(parts: list[list[int]], min_size: int, rng: np.random.Generator) -> None:
    """Move samples from the largest partitions into those below `min_size`."""
    for i in range(len(parts)):
        while len(parts[i]) < min_size:
            donor = max(range(len(parts)), key=lambda j: len(parts[j]))
            if donor == i or len(parts[donor]) <= min_size:
                return
            k = int(rng.integers(len(parts[donor])))
            parts[i].append(parts[donor].pop(k))


def dirichlet(
    labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int = 0,
    min_size: int | None = None,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label skew: each class is split across clients by proportions ~ Dirichlet(alpha).

    Small alpha (0.1) gives clients a few dominant classes; large alpha (100)
    approaches IID. As in Hsu et al. 2019 / NIID-Bench, a client already holding
    its fair share gets no more of the next class, and the draw is repeated until
    every client has `min_size` samples (default min(10, N // clients)); after
    `max_tries` the best draw is topped up from the largest clients, so no client
    is ever left empty when N >= clients. All samples are assigned.
    """
    labels = np.asarray(labels)
    n = len(labels)
    _check_parts(n, num_partitions)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size is None:
        min_size = min(10, n // num_partitions)
    min_size = min(min_size, n // num_partitions)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    fair = n / num_partitions

    best: list[list[np.ndarray]] | None = None
    best_smallest = -1
    for _ in range(max(1, max_tries)):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        sizes = np.zeros(num_partitions, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_partitions, alpha))
            p = np.where(sizes < fair, p, 0.0)
            total = p.sum()
            p = p / total if total > 0 else np.full(num_partitions, 1.0 / num_partitions)
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for j, chunk in enumerate(np.split(idx, cuts)):
                parts[j].append(chunk)
                sizes[j] += len(chunk)
        smallest = int(sizes.min())
        if smallest > best_smallest:
            best, best_smallest = parts, smallest
        if smallest >= min_size:
            break
    assert best is not None
    flat = [np.concatenate(q).tolist() if q else [] for q in best]
    _refill_small(flat, min_size, rng)
    return _finish([np.array(q, dtype=np.int64) for q in flat])


def shards(
    labels: np.ndarray, num_partitions: int, classes_per_client: int, seed: int = 0
) -> list[np.ndarray]:
    """Pathological non-IID: every client holds exactly `classes_per_client` classes.

    Client slots are dealt from a shuffled cyclic sequence of the classes, so
    each client's k classes are distinct and each class goes to about
    clients*k/C clients; a class's samples are then shuffled and split evenly
    among its holders. Unlike the FedAvg paper's random shards (where a client
    can draw two shards of one class) the class count is exact. All samples are
    assigned.
    """
    labels = np.asarray(labels)
    _check_parts(len(labels), num_partitions)
    classes = np.unique(labels)
    k = int(classes_per_client)
    if not 1 <= k <= len(classes):
        raise ValueError(
            f"classes_per_client must be in 1..{len(classes)} (classes present), got {k}"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    slots = [order[i % len(order)] for i in range(num_partitions * k)]
    clients = rng.permutation(num_partitions)  # which client takes which window
    holders: dict[Any, list[int]] = {c: [] for c in classes}
    for w, client in enumerate(clients):
        for c in slots[w * k : (w + 1) * k]:
            holders[c].append(int(client))
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for c in classes:
        if not holders[c]:
            continue  # fewer slots than classes: this class is left out
        idx = rng.permutation(np.flatnonzero(labels == c))
        for client, chunk in zip(holders[c], np.array_split(idx, len(holders[c])), strict=True):
            parts[client].append(chunk)
    return _finish([np.concatenate(p) if p else np.empty(0, np.int64) for p in parts])


def split_train_test(
    indices: np.ndarray, test_fraction: float, seed: int | Sequence[int] = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's indices into (train, local test), both sorted.

    The test share is round(n * fraction) but at least 1 and at most n - 1 when
    n >= 2 and fraction > 0, so a small client can both train and evaluate.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    n_test = round(n * test_fraction)
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(indices)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def partition_from_config(
    labels: np.ndarray, num_partitions: int, config: Mapping[str, Any]
) -> list[np.ndarray]:
    """Partition by run config: `partition` (iid|dirichlet|shards), `alpha`,
    `classes-per-client`, `seed`. Defaults: iid, alpha 0.5, 2 classes, seed 0."""
    kind = str(config.get("partition", "iid") or "iid").lower()
    seed = int(config.get("seed", 0))
    if kind == "iid":
        return iid(len(labels), num_partitions, seed)
    if kind == "dirichlet":
        return dirichlet(labels, num_partitions, float(config.get("alpha", 0.5)), seed)
    if kind == "shards":
        return shards(labels, num_partitions, int(config.get("classes-per-client", 2)), seed)
    raise ValueError(f"unknown partition {kind!r}; choose one of {', '.join(PARTITIONERS)}")
