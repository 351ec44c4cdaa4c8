"""4-bit codebook quantization (the `nf4` codec): 16 levels fitted to each tensor.

value = scale[block] * codebook[index]: `index` is 4 bits (two a byte, low
nibble first), `scale` a float16 per block, `codebook` 16 float32 levels per
tensor. Like NF4 (QLoRA), the levels are not evenly spaced, so more of them sit
where values are dense; unlike NF4 they are not fixed: a few Lloyd-Max
iterations, started from NF4's levels, move them to the centroids of the
tensor's own block-normalised values, weighted by each block's squared scale
(the error that counts is in the tensor's units). The outer levels settle
inside +-1, the clipping an error-minimising scale search would buy, without a
pass per candidate. On a real CNN update (docs/codec.md) the relative L2 error
is 0.084 at block 64, where NF4's fixed levels give 0.093.

Scales are stored relative to the tensor's largest block absmax M (the
codebook carries M), so they lie in [0, 1] and always fit float16: 16 bits per
64 values, 4.25 bits a value in all. The encoder computes its residual with
the kernel the decoder runs, so error feedback sees exactly what the
coordinator will.

Speed, without a search per element: a value is first cut to one of 255 fine
bins (y * 127 truncated to int8, y = x / (scale * M) in [-1, 1]); each bin maps
to one level, so the fit is Lloyd-Max over bins (exact per-bin sums from a
strided sample of at most FIT_SAMPLE values), and encoding reads each *pair*
of int8 bins as one uint16 and looks up the packed byte in a 64 Ki-entry
table: one gather per two values, no separate packing pass. Decoding looks up
both values of a packed byte at once (a 256 x 2 table). Chunks run on
`quantize`'s thread pool.
"""

from __future__ import annotations

import numpy as np

from fedge.common import quantize as qz

LEVELS = 16
CODEBOOK_BYTES = LEVELS * 4  # float32 levels on the wire
# NF4's levels (Dettmers et al., QLoRA, 2023; bitsandbytes' table): quantiles of
# N(0, 1) scaled to [-1, 1], with an exact 0. The fit starts from them.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
# fine bins: a normalised value y falls in trunc(y * GRID), an int8 in [-GRID, GRID]
# (bin 0 spans (-1, 1) / GRID, the others 1 / GRID). Against a grid 16 times finer
# the CNN update's error grows by 0.8 % (0.0838 against 0.0831).
GRID = 127
NBINS = 2 * GRID + 1
# values sampled to fit the levels: runs of FIT_RUN spread evenly over the tensor.
# Lloyd iterations cost ~10 us each per tensor whatever its size; on the CNN update
# 4 / 8 / 12 / 20 of them give 0.0841 / 0.0838 / 0.0837 / 0.0837 (docs/codec.md)
FIT_SAMPLE = 1 << 14
FIT_RUN = 64
FIT_ITERS = 8
_FP32_MAX = float(np.finfo(np.float32).max)
# the int8 bin each byte value stands for (byte 128, int8 -128, never occurs)
_BYTE_BIN = np.arange(256).astype(np.uint8).view(np.int8).astype(np.int64)
# centre of each fine bin (bin t > 0 spans [t, t + 1) / GRID), for bins the sample missed
_BINS = np.arange(-GRID, GRID + 1)
_BIN_CENTER = (_BINS + np.sign(_BINS) * 0.5) / GRID


def tensor_scales(x: np.ndarray, block: int) -> tuple[np.ndarray, float]:
    """(block scales relative to the largest block absmax M, float32 holding float16
    values; M). A block's scale times M is at least its absmax; all-zero blocks get 0.

    Raises ValueError for NaN/Inf in `x`.
    """
    absmax = qz.block_absmax(x, block)
    if absmax.size and not np.isfinite(absmax).all():
        raise ValueError("tensor holds NaN or Inf")
    top = float(absmax.max()) if absmax.size else 0.0
    if top == 0.0:
        return np.zeros(absmax.size, np.float32), 0.0
    rel = np.minimum(absmax / np.float32(top), np.float32(1.0)).astype(np.float32)
    # rounded up, so |x| <= scale * M and every normalised value lies in [-1, 1]
    return qz.round_up_to_fp16(rel), top


def inverse_steps(scales: np.ndarray, top: float) -> np.ndarray:
    """GRID / (scale * M) per block as float32, 0 for zero scales, never infinite."""
    eff = scales.astype(np.float64) * top
    inv = np.zeros(scales.size, np.float64)
    np.divide(GRID, eff, out=inv, where=eff > 0)
    # only a tensor of subnormal magnitude reaches the cap: its bins come out coarser
    return np.minimum(inv, _FP32_MAX).astype(np.float32)


def _sample_positions(n: int) -> np.ndarray:
    if n <= FIT_SAMPLE:
        return np.arange(n)
    runs = FIT_SAMPLE // FIT_RUN
    starts = (np.arange(runs, dtype=np.int64) * (n // runs)) // FIT_RUN * FIT_RUN
    return (starts[:, None] + np.arange(FIT_RUN)).reshape(-1)


def fit_levels(
    x: np.ndarray, scales: np.ndarray, inv: np.ndarray, block: int, top: float
) -> tuple[np.ndarray, np.ndarray]:
    """(16 ascending levels in [-1, 1], uint8 level of each of the NBINS fine bins).

    Weighted Lloyd-Max over the fine bins of a strided sample: each value
    weighs its block's squared scale (error in the tensor's units); a bin goes
    to the level nearest its weighted mean, which is the best any level choice
    per bin can do. `inv` is `inverse_steps(scales, M)`, `top` is M.
    """
    levels = NF4_LEVELS.astype(np.float64)
    pos = _sample_positions(x.size)
    blk = pos // block if 0 < block < x.size else np.zeros(pos.size, np.intp)
    y = x[pos] * inv[blk]
    bins = y.astype(np.int8).astype(np.intp) + GRID  # truncation, as the encoder cuts
    w = np.square(scales[blk].astype(np.float64))
    # y / GRID is the value in units of its block's scale, except where inverse_steps
    # capped the step (a block of near-subnormal magnitude): there y is that much smaller,
    # and a level fitted to it would shrink the block's values by the same factor
    weighted = w * y / GRID
    capped = inv[blk] == np.float32(_FP32_MAX)
    weighted[capped] = w[capped] * x[pos][capped] / (scales[blk][capped].astype(np.float64) * top)
    hw = np.bincount(bins, weights=w, minlength=NBINS)
    hy = np.bincount(bins, weights=weighted, minlength=NBINS)
    occupied = hw > 0
    # ascending: each bin's mean lies inside the bin (an empty bin keeps its centre)
    means = np.divide(hy, hw, out=_BIN_CENTER.copy(), where=occupied)
    if occupied.any():
        for _ in range(FIT_ITERS):
            level_of = np.searchsorted((levels[1:] + levels[:-1]) * 0.5, means)
            sw = np.bincount(level_of, weights=hw, minlength=LEVELS)
            sy = np.bincount(level_of, weights=hy, minlength=LEVELS)
            new = np.divide(sy, sw, out=levels.copy(), where=sw > 0)
            new[np.argmin(np.abs(new))] = 0.0  # zeros (dead units, frozen weights) stay zeros
            new.sort()
            levels = new
    levels = np.clip(levels, -1.0, 1.0)
    level_of = np.searchsorted((levels[1:] + levels[:-1]) * 0.5, means).astype(np.uint8)
    return levels.astype(np.float32), level_of


def pair_codes(level_of: np.ndarray) -> np.ndarray:
    """uint8[65536]: the packed byte for two int8 bins read as one little-endian uint16."""
    by_byte = level_of[_BYTE_BIN.clip(-GRID, GRID) + GRID]
    return np.bitwise_or.outer(by_byte << np.uint8(4), by_byte).reshape(-1)


def pair_values(codebook: np.ndarray) -> np.ndarray:
    """uint64[256]: the two float32 levels a packed byte holds (low nibble first), as the
    8 bytes one gather copies (numpy gathers 8-byte items faster than rows of two)."""
    b = np.arange(256)
    two = np.stack([codebook[b & 0x0F], codebook[b >> 4]], axis=1).astype(np.float32)
    return two.view(np.uint64).reshape(-1)


def _decode_chunk(
    packed: np.ndarray,
    pairs: np.ndarray,
    spread: np.ndarray,
    kb: int,
    n: int,
    c0: int,
    c1: int,
    out: np.ndarray,
    base: int,
    scratch: np.ndarray,
) -> None:
    """Values c0..c1 (c0 even) into out[c0 - base : c1 - base]: level times block scale.

    `scratch` is uint64 with room for the chunk's (c1 - c0 + 1) // 2 bytes.
    """
    src = packed[c0 // 2 : (c1 + 1) // 2]
    # mode="clip" (a no-op: every byte indexes the table) skips numpy's bounds-check
    # pass, which also converts the indices to a fresh intp array first
    vals = np.take(pairs, src, mode="clip", out=scratch[: src.size]).view(np.float32)
    for sl, b0, rows in qz._row_views(n, kb, c0, c1):
        v = vals[sl.start - c0 : sl.stop - c0].reshape(rows, -1)
        dst = out[sl.start - base : sl.stop - base].reshape(rows, -1)
        np.multiply(v, spread[b0 : b0 + rows, None], out=dst)


def encode(
    x: np.ndarray, block: int, residual_out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize 1-d float32 `x`: (float16 scales, float32 codebook, packed uint8 indices).

    With `residual_out` (may be `x` itself) writes x - decoded into it, decoded
    exactly as `decode` will. Raises ValueError for NaN/Inf.
    """
    n = x.size
    scales, top = tensor_scales(x, block)
    inv_blocks = inverse_steps(scales, top)
    levels, level_of = fit_levels(x, scales, inv_blocks, block, top)
    codebook = (levels * np.float32(top)).astype(np.float32)
    packed = np.empty((n + 1) // 2, np.uint8)
    if n == 0:
        return scales.astype(np.float16), codebook, packed
    by_pair = pair_codes(level_of)
    kb = qz._kernel_block(n, block)
    inv = qz._expand(inv_blocks, n, block)
    spread = qz._expand(scales, n, block)
    pairs = pair_values(codebook)
    chunk = qz._chunk_size(kb)

    def work(lo: int, hi: int) -> None:
        size = min(chunk, max(hi - lo, 1))
        y = np.empty(size, np.float32)
        bins = np.empty(size + 1, np.int8)
        dec = np.empty(size, np.float32) if residual_out is not None else None
        scratch = np.empty(size // 2 + 1, np.uint64)
        for c0 in range(lo, hi, chunk):
            c1 = min(c0 + chunk, hi)
            m = c1 - c0
            for sl, b0, rows in qz._row_views(n, kb, c0, c1):
                np.multiply(
                    x[sl].reshape(rows, -1),
                    inv[b0 : b0 + rows, None],
                    out=y[sl.start - c0 : sl.stop - c0].reshape(rows, -1),
                )
            # |y| <= GRID (1 + a few ulp) < 128: the int8 cast truncates, never wraps
            np.copyto(bins[:m], y[:m], casting="unsafe")
            if m % 2:  # only a tensor's last value can be unpaired: pair it with bin 0
                bins[m] = 0
            np.take(
                by_pair,
                bins[: m + m % 2].view("<u2"),
                mode="wrap",  # a no-op (64 Ki entries), skipping the bounds-check pass
                out=packed[c0 // 2 : (c1 + 1) // 2],
            )
            if m % 2:
                packed[(c1 - 1) // 2] &= np.uint8(0x0F)
            if dec is not None and residual_out is not None:
                _decode_chunk(packed, pairs, spread, kb, n, c0, c1, dec, c0, scratch)
                np.subtract(x[c0:c1], dec[:m], out=residual_out[c0:c1])

    qz._run_chunks(n, chunk, work)
    return scales.astype(np.float16), codebook, packed


def decode(
    packed: np.ndarray, n: int, scales: np.ndarray, codebook: np.ndarray, block: int
) -> np.ndarray:
    """float32 array of n values from packed indices, float32 block scales and codebook.

    Sizes are the caller's to validate; every index is valid (16 levels, 4 bits).
    """
    out = np.empty(n, np.float32)
    if n == 0:
        return out
    kb = qz._kernel_block(n, block)
    spread = qz._expand(scales.astype(np.float32), n, block)
    pairs = pair_values(codebook)
    chunk = qz._chunk_size(kb)

    def work(lo: int, hi: int) -> None:
        scratch = np.empty(min(chunk, hi - lo) // 2 + 1, np.uint64)
        for c0 in range(lo, hi, chunk):
            c1 = min(c0 + chunk, hi)
            _decode_chunk(packed, pairs, spread, kb, n, c0, c1, out, 0, scratch)

    qz._run_chunks(n, chunk, work)
    return out
