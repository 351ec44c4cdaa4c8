"""Top-k sparsification: which elements a sparse update keeps, and their positions.

By default k is a fraction of the whole update, chosen across its tensors at
once: a small layer whose update is large keeps most of it, and a huge, diffuse
layer gives up what matters least (a per-tensor k starves the small layers; see
docs/codec.md). Ties at the k-th magnitude go to the lowest positions (in
tensor order, then position), so the same input always keeps the same elements.
Positions travel ascending, delta-coded from -1 (so every delta is >= 1), as
LEB128 varints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from fedge.common.errors import UpdateRejected
from fedge.common.varint import decode_uvarints, encode_uvarints


def topk_count(n: int, fraction: float) -> int:
    """k = max(1, round(fraction * n)), rounding halves up; 0 for an empty tensor."""
    if n == 0:
        return 0
    return min(n, max(1, math.floor(fraction * n + 0.5)))


class TopkShare(NamedTuple):
    """One tensor's part of an update-wide top k: how many it keeps, and the k-th magnitude."""

    kept: int
    threshold: float


def select_topk(x: np.ndarray, k: int, threshold: float | None = None) -> np.ndarray:
    """Ascending int64 positions of the k largest |x| (1-d, finite), ties to low positions.

    `threshold`, when given, is the k-th largest magnitude (or one that keeps
    exactly k, as `split_topk` gives): it saves finding it again.
    """
    n = x.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, np.int64)
    mag = np.abs(x)
    if threshold is None:
        threshold = np.partition(mag, n - k)[n - k]
    above = np.flatnonzero(mag > threshold)
    ties = np.flatnonzero(mag == threshold)[: k - above.size]
    idx = np.concatenate([above, ties])
    idx.sort()
    return idx.astype(np.int64, copy=False)


def split_topk(values: Mapping[str, np.ndarray], fraction: float) -> dict[str, TopkShare]:
    """Each tensor's share when `fraction` of all the tensors' elements are kept.

    `select_topk(x, share.kept, share.threshold)` per tensor then keeps the
    update-wide top k: every element above the k-th magnitude, ties to earlier
    tensors.
    """
    sizes = {name: int(v.size) for name, v in values.items()}
    k = topk_count(sum(sizes.values()), fraction)
    if k == 0:
        return {name: TopkShare(0, 0.0) for name in values}
    mags = np.concatenate([np.abs(v.reshape(-1)) for v in values.values()])
    threshold = mags.dtype.type(np.partition(mags, mags.size - k)[mags.size - k])
    counts: dict[str, TopkShare] = {}
    ties_left = k - int(np.count_nonzero(mags > threshold))
    start = 0
    for name, size in sizes.items():
        chunk = mags[start : start + size]
        start += size
        ties = min(ties_left, int(np.count_nonzero(chunk == threshold)))
        ties_left -= ties
        counts[name] = TopkShare(int(np.count_nonzero(chunk > threshold)) + ties, threshold)
    return counts


def encode_positions(positions: np.ndarray) -> bytes:
    """Varint bytes of ascending positions, delta-coded from -1."""
    if positions.size == 0:
        return b""
    deltas = np.diff(positions.astype(np.int64), prepend=np.int64(-1))
    return encode_uvarints(deltas)


def decode_positions(data: bytes, count: int, n: int) -> np.ndarray:
    """int64 positions from untrusted varint bytes: exactly `count`, strictly ascending, < n."""
    if count > n:
        raise UpdateRejected("bad_indices", f"{count} indices for a tensor of {n} elements")
    deltas = decode_uvarints(data, count, max_value=n)
    if count == 0:
        return np.zeros(0, np.int64)
    if int(deltas.min()) < 1:
        raise UpdateRejected("bad_indices", "indices not strictly ascending (zero delta)")
    # An approximate float total first, so the int64 running sum below cannot wrap;
    # the exact bound is checked on the last position.
    if float(deltas.sum(dtype=np.float64)) > n + count:
        raise UpdateRejected("bad_indices", f"index beyond the tensor's {n} elements")
    positions = np.cumsum(deltas.astype(np.int64)) - 1
    if int(positions[-1]) >= n:
        raise UpdateRejected(
            "bad_indices", f"index {int(positions[-1])} out of range for {n} elements"
        )
    return positions
