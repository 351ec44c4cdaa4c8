"""Block-wise symmetric absmax quantization (int8 / int4) at memory speed.

value = scale[block] * q, |q| <= QMAX[bits]. Scales are stored as float16 when
that keeps them accurate, else float32 for the whole tensor. The stored scale
is rounded *up* to a float16, so |x| / scale never exceeds QMAX and the
deterministic error stays within half a step of the scale actually stored.

Speed: one read of the tensor computes all block absmaxes, a second quantizes,
both chunk by chunk so float temporaries stay in cache, on a small thread pool
(numpy releases the GIL inside ufuncs). Plain numpy: measured faster here than
per-chunk torch ops, and torch's own OpenMP workers would fight these threads
for the cores. Python loops run over chunks, never over elements.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from threading import Lock

import numpy as np

QMAX = {8: 127, 4: 7}
# elements per chunk: a float32 chunk and its temporaries stay in a 512 KiB L2
CHUNK = 1 << 16
# below this many elements threads cost more than they save
PARALLEL_MIN = 1 << 18
FP16_MAX = float(np.finfo(np.float16).max)
FP32_MIN_NORMAL = float(np.finfo(np.float32).tiny)
# Round-up to a subnormal float16 inflates the step; beyond this we use float32.
FP16_MAX_INFLATION = 1.0 + 2.0**-5

_pool: ThreadPoolExecutor | None = None
_pool_lock = Lock()


def _forget_pool() -> None:
    # a forked child (Ray, multiprocessing) inherits the pool object but not its threads
    global _pool, _pool_lock
    _pool, _pool_lock = None, Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _workers() -> int:
    try:
        return max(1, min(4, len(os.sched_getaffinity(0))))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, min(4, os.cpu_count() or 1))


def _run_chunks(n: int, chunk: int, fn: Callable[[int, int], None], parallel: bool = True) -> None:
    """Call fn(lo, hi) over [0, n) in pieces aligned to `chunk`, on threads if it pays."""
    global _pool
    workers = _workers()
    if not parallel or workers == 1 or n < PARALLEL_MIN:
        fn(0, n)
        return
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedge-codec")
    nchunks = -(-n // chunk)
    bounds = [min(n, (nchunks * i // workers) * chunk) for i in range(workers + 1)]
    futures = [_pool.submit(fn, lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]
    for f in futures:
        f.result()


def num_blocks(n: int, block: int) -> int:
    """Scales needed for n values: one per block, one per tensor when block is 0."""
    if n == 0:
        return 0
    return 1 if block == 0 else -(-n // block)


def _kernel_block(n: int, block: int) -> int:
    """The block the kernels iterate by: a per-tensor scale is repeated per chunk."""
    return CHUNK if block == 0 or block >= n else block


def _chunk_size(kblock: int) -> int:
    # a multiple of the block, and even so int4 pairs never straddle chunks
    c = max(1, CHUNK // kblock) * kblock
    return c if c % 2 == 0 else 2 * c


def _expand(per_block: np.ndarray, n: int, block: int) -> np.ndarray:
    """Per-block values at kernel-block granularity (repeats a per-tensor scale)."""
    kb = _kernel_block(n, block)
    if kb == block:
        return per_block
    return np.full(num_blocks(n, kb), per_block[0] if per_block.size else 0, per_block.dtype)


def block_absmax(x: np.ndarray, block: int) -> np.ndarray:
    """max |x| per block of a 1-d float32 array, one read of x.

    Works on the bit patterns: clearing the sign bit gives |x|, and for
    non-negative floats integer order is float order, so an int32 max is the
    float max (NaN and Inf patterns sort above every finite value and survive).
    """
    n = x.size
    if n == 0:
        return np.zeros(0, np.float32)
    kb = _kernel_block(n, block)
    chunk = _chunk_size(kb)
    out = np.empty(num_blocks(n, kb), np.int32)
    bits = x.view(np.int32)

    def work(lo: int, hi: int) -> None:
        tmp = np.empty(min(chunk, hi - lo), np.int32)
        for c0 in range(lo, hi, chunk):
            for sl, b0, rows in _row_views(n, kb, c0, min(c0 + chunk, hi)):
                tv = tmp[: sl.stop - sl.start]
                np.bitwise_and(bits[sl], 0x7FFFFFFF, out=tv)
                np.max(tv.reshape(rows, -1), axis=1, out=out[b0 : b0 + rows])

    _run_chunks(n, chunk, work)
    result = out.view(np.float32)
    if kb != block:
        # per-tensor scale: reduce the per-chunk maxima
        return np.array([out.max()], np.int32).view(np.float32)
    return result


def round_up_to_fp16(v: np.ndarray) -> np.ndarray:
    """Smallest float16-representable value >= v, as float32 (v >= 0, finite).

    Done on float32 bit patterns (numpy's float16 casts are slow software loops):
    a normal float16 keeps the top 10 of float32's 23 mantissa bits, so rounding
    up means carrying into bit 13 and clearing below; the subnormal float16
    range is a fixed grid of 2**-24. Results above 65504 do not fit float16.
    """
    bits = v.view(np.uint32)
    up = ((bits + np.uint32(0x1FFF)) & np.uint32(0xFFFFE000)).view(np.float32)
    sub = v < np.float32(2.0**-14)
    if sub.any():
        up[sub] = np.ceil(v[sub] * np.float32(2.0**24)) * np.float32(2.0**-24)
    return up


def choose_scales(absmax: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(scales as stored: float16 or float32, the same scales as float32).

    float16 when every scale fits it (rounded up, so no value exceeds QMAX steps)
    without losing more than 1/32 of its precision in the subnormal range; else
    float32 for the whole tensor. Raises ValueError for NaN/Inf in the tensor.
    """
    if absmax.size and not np.isfinite(absmax).all():
        raise ValueError("tensor holds NaN or Inf")
    exact = absmax / np.float32(QMAX[bits])
    up = round_up_to_fp16(exact)
    if np.all(up <= np.float32(FP16_MAX)) and np.all(
        up <= exact * np.float32(FP16_MAX_INFLATION)
    ):
        return up.astype(np.float16), up
    s32 = np.where(absmax > 0, np.maximum(exact, np.float32(FP32_MIN_NORMAL)), np.float32(0))
    s32 = s32.astype(np.float32)
    return s32, s32


def _row_views(n: int, kblock: int, lo: int, hi: int) -> list[tuple[slice, int, int]]:
    """Split [lo, hi) into (element slice, first block, rows) with rows * kblock elements,
    plus a one-row tail of fewer elements at the very end of the tensor."""
    rows = (hi - lo) // kblock
    parts = []
    if rows:
        parts.append((slice(lo, lo + rows * kblock), lo // kblock, rows))
    if lo + rows * kblock < hi:
        parts.append((slice(lo + rows * kblock, hi), lo // kblock + rows, 1))
    return parts


def pack_int4(q: np.ndarray, out: np.ndarray) -> None:
    """Pack int8 values in [-8, 7] two per byte, low nibble first (odd tail: high nibble 0).

    `q` int8 of n values, `out` uint8 of ceil(n / 2) bytes.
    """
    u = q.view(np.uint8)
    pairs = u.size // 2
    dst = out[:pairs]
    np.bitwise_and(u[0 : 2 * pairs : 2], np.uint8(0x0F), out=dst)
    dst |= np.left_shift(u[1 : 2 * pairs : 2], np.uint8(4))
    if u.size % 2:
        out[pairs] = u[-1] & 0x0F


def unpack_int4(packed: np.ndarray, n: int, out: np.ndarray) -> None:
    """Inverse of `pack_int4`: n sign-extended nibbles from uint8 `packed` into int8 `out`."""
    s = packed.view(np.int8)
    pairs = n // 2
    body = s[:pairs]
    four = np.int8(4)
    np.right_shift(np.left_shift(body, four), four, out=out[0 : 2 * pairs : 2])
    np.right_shift(body, four, out=out[1 : 2 * pairs : 2])
    if n % 2:
        out[n - 1] = np.right_shift(np.left_shift(s[pairs : pairs + 1], four), four)[0]


def quantize(
    x: np.ndarray,
    scales: np.ndarray,
    block: int,
    bits: int,
    *,
    rng: np.random.Generator | None = None,
    residual_out: np.ndarray | None = None,
) -> np.ndarray:
    """Quantize 1-d float32 `x` with float32 per-block `scales`.

    Returns int8 values (bits=8) or packed int4 bytes as uint8 (bits=4). With `rng`,
    rounds stochastically (floor(x/s + u), u ~ U[0, 1): unbiased). With
    `residual_out` (may be `x` itself), writes x - dequantized into it.

    Per chunk the block scales are first spread to one per element: numpy
    multiplies contiguous arrays with SIMD but broadcasts a per-row scale with a
    slow strided loop, and the spread scale serves both the division and the
    residual. A zero scale (all-zero block) divides by 1 instead: q = 0 either way.
    """
    n = x.size
    qmax = QMAX[bits]
    kb = _kernel_block(n, block)
    safe = _expand(np.where(scales > 0, scales, np.float32(1)).astype(np.float32), n, block)
    chunk = _chunk_size(kb)
    q_out = np.empty(n if bits == 8 else (n + 1) // 2, np.int8 if bits == 8 else np.uint8)

    def work(lo: int, hi: int) -> None:
        size = min(chunk, max(hi - lo, 1))
        tmp = np.empty(size, np.float32)
        spread = np.empty(size, np.float32)
        qtmp = np.empty(size, np.int8) if bits == 4 else None
        for c0 in range(lo, hi, chunk):
            c1 = min(c0 + chunk, hi)
            m = c1 - c0
            for sl, b0, rows in _row_views(n, kb, c0, c1):
                np.copyto(
                    spread[sl.start - c0 : sl.stop - c0].reshape(rows, -1),
                    safe[b0 : b0 + rows, None],
                )
            xv, tv, sv = x[c0:c1], tmp[:m], spread[:m]
            np.divide(xv, sv, out=tv)
            if rng is None:
                np.rint(tv, out=tv)
            else:
                tv += rng.random(m, dtype=np.float32)
                np.floor(tv, out=tv)
                np.clip(tv, -qmax, qmax, out=tv)
            if qtmp is None:
                np.copyto(q_out[c0:c1], tv, casting="unsafe")
            else:
                np.copyto(qtmp[:m], tv, casting="unsafe")
                pack_int4(qtmp[:m], q_out[c0 // 2 : (c1 + 1) // 2])
            if residual_out is not None:
                np.multiply(tv, sv, out=tv)
                np.subtract(xv, tv, out=residual_out[c0:c1])

    # a shared Generator is not thread-safe, and its draws must not depend on threads
    _run_chunks(n, chunk, work, parallel=rng is None)
    return q_out


def dequantize(values: np.ndarray, n: int, scales: np.ndarray, block: int, bits: int) -> np.ndarray:
    """float32 array of n values from int8 `values` or packed int4 bytes (sizes validated).

    Raises ValueError if a value is outside the symmetric range (-128 or a -8 nibble).
    """
    out = np.empty(n, np.float32)
    if n == 0:
        return out
    qmax = QMAX[bits]
    kb = _kernel_block(n, block)
    sc = _expand(scales, n, block)
    chunk = _chunk_size(kb)
    bad: list[int] = []

    def work(lo: int, hi: int) -> None:
        qtmp = np.empty(min(chunk, hi - lo), np.int8) if bits == 4 else None
        for c0 in range(lo, hi, chunk):
            c1 = min(c0 + chunk, hi)
            if qtmp is None:
                qc = values[c0:c1]
            else:
                qc = qtmp[: c1 - c0]
                unpack_int4(values[c0 // 2 : (c1 + 1) // 2], c1 - c0, qc)
            if qc.min() < -qmax:
                bad.append(c0)
            for sl, b0, rows in _row_views(n, kb, c0, c1):
                qv = qc[sl.start - c0 : sl.stop - c0].reshape(rows, -1)
                np.multiply(qv, sc[b0 : b0 + rows, None], out=out[sl].reshape(rows, -1))

    _run_chunks(n, chunk, work)
    if bad:
        raise ValueError(f"int{bits} value outside [-{qmax}, {qmax}]")
    return out


def dequantize_accumulate(
    values: np.ndarray, n: int, scales: np.ndarray, block: int, bits: int,
    acc: np.ndarray, weight: float,
) -> None:
    """`acc += weight * dequantize(values, ...)` without the model-sized float32 tensor.

    The coordinator's running sum (server/streaming_mean.py) takes each update
    this way: per cache-sized chunk the same float32 products as `dequantize`,
    widened to `acc`'s dtype, times `weight`, added in place, so the sum is
    bit for bit what decoding first and adding after gives, at one read of
    the int8 values and one read-modify-write of `acc`. `acc` is 1-d of n
    floats; values are assumed range-checked (`check_range`).
    """
    if n == 0:
        return
    kb = _kernel_block(n, block)
    sc = _expand(scales, n, block)
    chunk = _chunk_size(kb)
    weight = float(weight)

    def work(lo: int, hi: int) -> None:
        size = min(chunk, hi - lo)
        qtmp = np.empty(size, np.int8) if bits == 4 else None
        f32 = np.empty(size, np.float32)
        wide = np.empty(size, acc.dtype)
        for c0 in range(lo, hi, chunk):
            c1 = min(c0 + chunk, hi)
            if qtmp is None:
                qc = values[c0:c1]
            else:
                qc = qtmp[: c1 - c0]
                unpack_int4(values[c0 // 2 : (c1 + 1) // 2], c1 - c0, qc)
            for sl, b0, rows in _row_views(n, kb, c0, c1):
                a, b = sl.start - c0, sl.stop - c0
                qv = qc[a:b].reshape(rows, -1)
                np.multiply(qv, sc[b0 : b0 + rows, None], out=f32[a:b].reshape(rows, -1))
            np.multiply(f32[: c1 - c0], weight, out=wide[: c1 - c0], dtype=acc.dtype)
            acc[c0:c1] += wide[: c1 - c0]

    # one thread: the sum's memory traffic bounds it (a second thread measured no faster
    # here), and the coordinator's other core serves the devices meanwhile
    _run_chunks(n, chunk, work, parallel=False)


def check_range(values: np.ndarray, bits: int) -> None:
    """Raise ValueError if an int8 value is -128 (outside the symmetric range).

    For int8 only: packed int4 is checked as `dequantize` unpacks it.
    """
    if bits != 8:
        raise ValueError("check_range reads int8 values only")
    if values.size and int(values.min()) < -QMAX[8]:
        raise ValueError(f"int8 value outside [-{QMAX[8]}, {QMAX[8]}]")
