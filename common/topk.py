"""Top-k sparsification: which elements a sparse update keeps, and their positions.

Ties at the k-th magnitude go to the lowest positions, so the same input always
keeps the same elements. Positions travel ascending, delta-coded from -1 (so
every delta is >= 1), as LEB128 varints.
"""

from __future__ import annotations

import math

import numpy as np

from fedge.common.errors import UpdateRejected
from fedge.common.varint import decode_uvarints, encode_uvarints


def topk_count(n: int, fraction: float) -> int:
    """k = max(1, round(fraction * n)), rounding halves up; 0 for an empty tensor."""
    if n == 0:
        return 0
    return min(n, max(1, math.floor(fraction * n + 0.5)))


def select_topk(x: np.ndarray, k: int) -> np.ndarray:
    """Ascending int64 positions of the k largest |x| (1-d, finite), ties to low positions."""
    n = x.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, np.int64)
    mag = np.abs(x)
    threshold = np.partition(mag, n - k)[n - k]
    above = np.flatnonzero(mag > threshold)
    ties = np.flatnonzero(mag == threshold)[: k - above.size]
    idx = np.concatenate([above, ties])
    idx.sort()
    return idx.astype(np.int64, copy=False)


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
