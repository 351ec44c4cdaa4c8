"""Block-wise symmetric absmax quantization (int8 / int4) at memory speed.

value = scale[block] * q, |q| <= QMAX[bits]. Scales are stored as float16 when
that keeps them accurate, else float32 for the whole tensor. The stored scale
is rounded *up* to a float16, so |x| / scale never exceeds QMAX and the
deterministic error stays within half a step of the scale actually stored.

Speed: one read of the tensor computes all block absmaxes, a second quantizes,
both chunk by chunk so float temporaries stay in cache, on a small thread pool.
The per-chunk work uses torch ops (vectorised even when a per-block scale is
broadcast, where numpy falls back to scalar loops; they release the GIL). Chunks
stay under torch's parallel grain size, so torch never starts its own OpenMP
workers, which would fight these threads for the cores. Python loops run over
chunks, never over elements.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from threading import Lock

import numpy as np
import torch

QMAX = {8: 127, 4: 7}
# elements per chunk: in cache, and below torch's intra-op grain size (32768)
CHUNK = 1 << 14
# below this many elements threads cost more than they save
PARALLEL_MIN = 1 << 18
FP16_MAX = float(np.finfo(np.float16).max)
FP32_MIN_NORMAL = float(np.finfo(np.float32).tiny)
# Round-up to a subnormal float16 inflates the step; beyond this we use float32.
FP16_MAX_INFLATION = 1.0 + 2.0**-5

_pool: ThreadPoolExecutor | None = None
_pool_lock = Lock()


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy torch view of an array, read-only ones included (never written)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


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
    """max |x| per block of a 1-d float32 array (NaN propagates), one read of x."""
    n = x.size
    if n == 0:
        return np.zeros(0, np.float32)
    kb = _kernel_block(n, block)
    chunk = _chunk_size(kb)
    out = np.empty(num_blocks(n, kb), np.float32)
    xt, ot = as_tensor(x), torch.from_numpy(out)

    def work(lo: int, hi: int) -> None:
        tmp = torch.empty(chunk)
        for c0 in range(lo, hi, chunk):
            for sl, b0, rows in _row_views(n, kb, c0, min(c0 + chunk, hi)):
                tv = tmp[: sl.stop - sl.start]
                torch.abs(xt[sl], out=tv)
                torch.amax(tv.view(rows, -1), dim=1, out=ot[b0 : b0 + rows])

    _run_chunks(n, chunk, work)
    if kb != block:
        # per-tensor scale: reduce the per-chunk maxima
        return np.array([out.max()], np.float32)
    return out


def choose_scales(absmax: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(scales as stored: float16 or float32, the same scales as float32).

    Raises ValueError for non-finite input (NaN/Inf in the tensor).
    """
    if absmax.size and not np.isfinite(absmax).all():
        raise ValueError("tensor holds NaN or Inf")
    qmax = QMAX[bits]
    exact = absmax / np.float32(qmax)
    s16 = exact.astype(np.float16)
    low = s16.astype(np.float32) < exact
    if low.any():
        s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    s16f = s16.astype(np.float32)
    ok = np.isfinite(s16f).all() and bool(np.all(s16f <= exact * np.float32(FP16_MAX_INFLATION)))
    if ok:
        return s16, s16f
    s32 = np.where(absmax > 0, np.maximum(exact, np.float32(FP32_MIN_NORMAL)), np.float32(0))
    s32 = s32.astype(np.float32)
    return s32, s32


def _inverse(scales: np.ndarray) -> np.ndarray:
    inv = np.zeros_like(scales)
    np.divide(np.float32(1), scales, out=inv, where=scales > 0)
    return inv


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


def pack_int4(q: torch.Tensor, out: torch.Tensor) -> None:
    """Pack int8 values in [-8, 7] two per byte, low nibble first (odd tail: high nibble 0).

    `q` int8 of n values, `out` uint8 of ceil(n / 2) bytes.
    """
    u = q.view(torch.uint8)
    pairs = u.numel() // 2
    dst = out[:pairs]
    torch.bitwise_and(u[0 : 2 * pairs : 2], 0x0F, out=dst)
    dst.bitwise_or_(torch.bitwise_left_shift(u[1 : 2 * pairs : 2], 4))
    if u.numel() % 2:
        out[pairs] = u[-1] & 0x0F


def unpack_int4(packed: torch.Tensor, n: int, out: torch.Tensor) -> None:
    """Inverse of `pack_int4`: n sign-extended nibbles from uint8 `packed` into int8 `out`."""
    s = packed.view(torch.int8)
    pairs = n // 2
    body = s[:pairs]
    torch.bitwise_right_shift(torch.bitwise_left_shift(body, 4), 4, out=out[0 : 2 * pairs : 2])
    torch.bitwise_right_shift(body, 4, out=out[1 : 2 * pairs : 2])
    if n % 2:
        out[n - 1] = torch.bitwise_right_shift(torch.bitwise_left_shift(s[pairs], 4), 4)


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
    """
    n = x.size
    qmax = QMAX[bits]
    kb = _kernel_block(n, block)
    inv = torch.from_numpy(_expand(_inverse(scales), n, block))
    sc = torch.from_numpy(_expand(scales, n, block))
    chunk = _chunk_size(kb)
    q_np = np.empty(n if bits == 8 else (n + 1) // 2, np.int8 if bits == 8 else np.uint8)
    q_out = torch.from_numpy(q_np)
    xt = as_tensor(x)
    rt = None if residual_out is None else torch.from_numpy(residual_out)

    def work(lo: int, hi: int) -> None:
        tmp = torch.empty(min(chunk, max(hi - lo, 1)))
        qtmp = torch.empty(tmp.numel(), dtype=torch.int8) if bits == 4 else None
        for c0 in range(lo, hi, chunk):
            c1 = min(c0 + chunk, hi)
            if rng is not None:
                noise = torch.from_numpy(rng.random(c1 - c0, dtype=np.float32))
            for sl, b0, rows in _row_views(n, kb, c0, c1):
                off, m = sl.start - c0, sl.stop - sl.start
                xv = xt[sl].view(rows, -1)
                tv = tmp[:m].view(rows, -1)
                torch.mul(xv, inv[b0 : b0 + rows, None], out=tv)
                if rng is None:
                    tv.round_()
                else:
                    tv.add_(noise[off : off + m].view(rows, -1)).floor_().clamp_(-qmax, qmax)
                if qtmp is None:
                    q_out[sl].view(rows, -1).copy_(tv)
                else:
                    qtmp[off : off + m].view(rows, -1).copy_(tv)
                if rt is not None:
                    tv.mul_(sc[b0 : b0 + rows, None])
                    torch.sub(xv, tv, out=rt[sl].view(rows, -1))
            if qtmp is not None:
                pack_int4(qtmp[: c1 - c0], q_out[c0 // 2 : (c1 + 1) // 2])

    # a shared Generator is not thread-safe, and its draws must not depend on threads
    _run_chunks(n, chunk, work, parallel=rng is None)
    return q_np


def dequantize(values: np.ndarray, n: int, scales: np.ndarray, block: int, bits: int) -> np.ndarray:
    """float32 array of n values from int8 `values` or packed int4 bytes (sizes validated).

    Raises ValueError if a value is outside the symmetric range (-128 or a -8 nibble).
    """
    out = np.empty(n, np.float32)
    if n == 0:
        return out
    qmax = QMAX[bits]
    kb = _kernel_block(n, block)
    sc = torch.from_numpy(_expand(scales, n, block))
    chunk = _chunk_size(kb)
    vt, ot = as_tensor(values), torch.from_numpy(out)
    bad: list[int] = []

    def work(lo: int, hi: int) -> None:
        qtmp = torch.empty(min(chunk, hi - lo), dtype=torch.int8) if bits == 4 else None
        for c0 in range(lo, hi, chunk):
            c1 = min(c0 + chunk, hi)
            if qtmp is None:
                qc = vt[c0:c1]
            else:
                qc = qtmp[: c1 - c0]
                unpack_int4(vt[c0 // 2 : (c1 + 1) // 2], c1 - c0, qc)
            if int(qc.min()) < -qmax:
                bad.append(c0)
            for sl, b0, rows in _row_views(n, kb, c0, c1):
                qv = qc[sl.start - c0 : sl.stop - c0].view(rows, -1)
                torch.mul(qv, sc[b0 : b0 + rows, None], out=ot[sl].view(rows, -1))

    _run_chunks(n, chunk, work)
    if bad:
        raise ValueError(f"int{bits} value outside [-{qmax}, {qmax}]")
    return out
