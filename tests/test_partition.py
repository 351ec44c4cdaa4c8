"""Partitioners: seeded, disjoint, covering, and as skewed as asked."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.common.partition import (
    dirichlet,
    iid,
    partition_from_config,
    shards,
    split_train_test,
)

LABELS = np.repeat(np.arange(10), 100)  # 1,000 samples, 10 balanced classes
np.random.default_rng(0).shuffle(LABELS)


def assert_disjoint_cover(parts: list[np.ndarray], n: int, *, cover: bool = True) -> None:
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx), "a sample is in two partitions"
    assert allidx.min() >= 0 and allidx.max() < n
    if cover:
        assert len(allidx) == n
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_iid_balanced_deterministic_disjoint() -> None:
    parts = iid(1003, 10, seed=1)
    assert_disjoint_cover(parts, 1003)
    assert {len(p) for p in parts} == {100, 101}
    assert same(parts, iid(1003, 10, seed=1))
    assert not same(parts, iid(1003, 10, seed=2))


def label_skew(parts: list[np.ndarray]) -> float:
    """Mean over clients of the share of the client's largest class (0.1 = IID here)."""
    return float(np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts]))


def test_dirichlet_deterministic_disjoint_covering() -> None:
    parts = dirichlet(LABELS, 20, alpha=0.5, seed=3)
    assert_disjoint_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 10
    assert same(parts, dirichlet(LABELS, 20, alpha=0.5, seed=3))
    assert not same(parts, dirichlet(LABELS, 20, alpha=0.5, seed=4))


def test_dirichlet_skew_follows_alpha() -> None:
    skew = {a: label_skew(dirichlet(LABELS, 20, alpha=a, seed=0)) for a in (0.05, 1.0, 1000.0)}
    assert skew[0.05] > 0.6
    assert skew[0.05] > skew[1.0] > skew[1000.0]
    assert skew[1000.0] < 0.25


def test_dirichlet_never_leaves_a_client_empty() -> None:
    parts = dirichlet(LABELS, 200, alpha=0.01, seed=0, max_tries=3)
    assert_disjoint_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 5  # min(10, 1000 // 200)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(LABELS, 5, alpha=0.0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_give_exactly_k_classes(k: int) -> None:
    parts = shards(LABELS, 20, classes_per_client=k, seed=0)
    assert_disjoint_cover(parts, len(LABELS))
    assert all(len(np.unique(LABELS[p])) == k for p in parts)
    assert same(parts, shards(LABELS, 20, classes_per_client=k, seed=0))
    assert not same(parts, shards(LABELS, 20, classes_per_client=k, seed=1))


def test_shards_with_too_few_slots_leave_classes_out_but_stay_exact() -> None:
    parts = shards(LABELS, 3, classes_per_client=2, seed=0)  # 6 slots, 10 classes
    assert_disjoint_cover(parts, len(LABELS), cover=False)
    assert all(len(np.unique(LABELS[p])) == 2 for p in parts)
    with pytest.raises(ValueError, match="classes_per_client"):
        shards(LABELS, 3, classes_per_client=11)


def test_split_train_test_is_disjoint_and_keeps_both_sides() -> None:
    idx = np.arange(100, 150)
    train, test = split_train_test(idx, 0.2, seed=0)
    assert len(test) == 10 and len(train) == 40
    assert np.array_equal(np.sort(np.concatenate([train, test])), idx)
    assert np.array_equal(test, split_train_test(idx, 0.2, seed=0)[1])
    assert not np.array_equal(test, split_train_test(idx, 0.2, seed=(0, 1))[1])
    tr, te = split_train_test(np.array([5, 9]), 0.1, seed=0)
    assert len(tr) == 1 and len(te) == 1
    tr, te = split_train_test(np.array([5]), 0.5, seed=0)
    assert list(tr) == [5] and len(te) == 0
    assert len(split_train_test(idx, 0.0)[1]) == 0


def test_partition_from_config_dispatches() -> None:
    cfg = {"partition": "shards", "classes-per-client": 1, "seed": 2}
    assert same(partition_from_config(LABELS, 10, cfg), shards(LABELS, 10, 1, seed=2))
    assert same(partition_from_config(LABELS, 4, {}), iid(len(LABELS), 4, seed=0))
    cfg = {"partition": "dirichlet", "alpha": 0.3, "seed": 1}
    assert same(partition_from_config(LABELS, 10, cfg), dirichlet(LABELS, 10, 0.3, seed=1))
    with pytest.raises(ValueError, match="unknown partition 'pathological'"):
        partition_from_config(LABELS, 4, {"partition": "pathological"})
