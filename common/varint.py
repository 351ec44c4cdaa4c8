"""Vectorised unsigned LEB128 varints, as protobuf writes them.

Sparse indices travel as delta-coded varints: small gaps take one byte. Both
directions loop only over byte positions (at most 10), never over values.
The decoder is written for untrusted input: it rejects truncated, overlong and
oversized streams with `UpdateRejected("bad_indices", ...)`.
"""

from __future__ import annotations

import numpy as np

from fedge.common.errors import UpdateRejected

_MAX_LEN = 10  # 64 bits / 7 bits a byte


def encode_uvarints(values: np.ndarray) -> bytes:
    """LEB128 bytes of non-negative integers (any integer dtype, < 2**64)."""
    v = np.ascontiguousarray(values, dtype=np.uint64)
    if v.size == 0:
        return b""
    lens = np.ones(v.size, np.int64)
    for j in range(1, _MAX_LEN):
        lens += v >= np.uint64(1 << (7 * j))
    starts = np.cumsum(lens) - lens
    out = np.empty(int(lens.sum()), np.uint8)
    for j in range(int(lens.max())):
        sel = np.flatnonzero(lens > j) if j else slice(None)
        byte = (v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        byte |= np.where(lens[sel] > j + 1, np.uint64(0x80), np.uint64(0))
        out[starts[sel] + j] = byte
    return out.tobytes()


def decode_uvarints(data: bytes, count: int, max_value: int) -> np.ndarray:
    """Exactly `count` varints from `data` (nothing left over), each <= max_value, as uint64."""
    buf = np.frombuffer(data, np.uint8)
    if count < 0 or count > buf.size:
        raise UpdateRejected("bad_indices", f"{count} varints cannot fit in {buf.size} bytes")
    if count == 0:
        if buf.size:
            raise UpdateRejected("bad_indices", f"{buf.size} index bytes for 0 indices")
        return np.zeros(0, np.uint64)
    ends = np.flatnonzero(buf < 0x80)
    if ends.size != count:
        raise UpdateRejected("bad_indices", f"{ends.size} varints in stream, count says {count}")
    if ends[-1] != buf.size - 1:
        raise UpdateRejected("bad_indices", "index stream ends inside a varint")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lens = ends - starts + 1
    limit = max(1, -(-max(max_value, 1).bit_length() // 7))
    longest = int(lens.max())
    if longest > min(limit, _MAX_LEN - 1):
        raise UpdateRejected("bad_indices", f"varint of {longest} bytes exceeds the tensor size")
    if longest > 1 and np.any((lens > 1) & (buf[ends] == 0)):
        raise UpdateRejected("bad_indices", "overlong varint (trailing zero byte)")
    out = np.zeros(count, np.uint64)
    for j in range(longest):
        sel = np.flatnonzero(lens > j) if j else slice(None)
        out[sel] |= (buf[starts[sel] + j] & np.uint8(0x7F)).astype(np.uint64) << np.uint64(7 * j)
    if int(out.max()) > max_value:
        raise UpdateRejected("bad_indices", f"varint value {int(out.max())} exceeds {max_value}")
    return out
