"""Shared-scale stochastic quantization into the ring Z_{2^b}, and tight word packing.

Secure aggregation sums integers modulo 2**b, so every device must quantize
with the *same* scale per tensor (otherwise integer sums mean nothing): the
coordinator broadcasts a clipping range c per tensor, scale = c / qmax.
Values are clipped to [-c, c], divided by the scale and rounded
stochastically (unbiased), giving q in [-qmax, qmax]; the ring holds
q + qmax in [0, 2 qmax]. With b = bits + ceil(log2 n), n such words sum
below 2**b, so the masked sum modulo 2**b is the exact integer sum.

Words are packed tightly, b bits each, little-endian bit order: int8 with
n = 100 gives b = 15 and 1.875 bytes per coordinate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedge.common.secagg_crypto import word_dtype
from fedge.common.secagg_errors import SecAggRefused

QMAX = {8: 127, 4: 7, 2: 1}
# elements per packing chunk (a multiple of 8, so every chunk ends on a byte)
PACK_CHUNK = 1 << 16


@dataclass(frozen=True)
class RingSpec:
    """bits of the quantizer and the number of devices whose words are summed."""

    bits: int
    clients: int

    def __post_init__(self) -> None:
        if self.bits not in QMAX:
            raise SecAggRefused("bad_config", f"quantizer bits {self.bits}: use 8, 4 or 2")
        if self.clients < 1:
            raise SecAggRefused("bad_config", f"{self.clients} clients")
        if self.word_bits > 32:
            raise SecAggRefused("bad_config", f"{self.word_bits}-bit ring words: too many clients")

    @property
    def qmax(self) -> int:
        return QMAX[self.bits]

    @property
    def word_bits(self) -> int:
        return self.bits + max(0, math.ceil(math.log2(self.clients)))

    @property
    def modulus_mask(self) -> int:
        return (1 << self.word_bits) - 1

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return word_dtype(self.word_bits)

    def packed_bytes(self, n: int) -> int:
        return (n * self.word_bits + 7) // 8


def quantize_to_ring(
    x: np.ndarray,
    scales: np.ndarray,
    spec: RingSpec,
    rng: np.random.Generator,
    residual_out: np.ndarray | None = None,
    max_norm: float | None = None,
) -> np.ndarray:
    """Ring words q + qmax of float32 `x` with per-coordinate float32 `scales` (> 0).

    With `residual_out`, writes x - dequantized (clipping and rounding error)
    into it: what error feedback carries to the next round.

    With `max_norm` (DP: `x` already clipped to L2 norm C), the dequantized
    contribution q * scales is kept within C too: stochastic rounding may move
    it up to |scales| (L2, sqrt(sum s_i^2), s sqrt(d) for one scale) past C, so
    when it does, coordinates that rounded away from zero, in random order, are
    rounded toward zero instead until the norm is within C (rounding all of them
    so gives |q_i s_i| <= |x_i|, norm <= ||x|| <= C). The coordinator cannot
    clip a masked contribution, so this is what bounds one device's influence.
    """
    if x.shape != scales.shape:
        raise SecAggRefused("bad_input", f"{x.size} values for {scales.size} scales")
    if not np.isfinite(x).all():
        raise SecAggRefused("bad_input", "update holds NaN or Inf")
    qmax = spec.qmax
    # float64: in float32, k + u rounds up to k + 1 for u near 1 (a bias of 2**-24 |k|)
    t = x.astype(np.float64)
    t /= scales
    t += rng.random(t.size)
    np.floor(t, out=t)
    np.clip(t, -qmax, qmax, out=t)
    if max_norm is not None:
        _round_within_norm(t, x, scales, float(max_norm), rng)
    if residual_out is not None:
        np.subtract(x, (t * scales).astype(np.float32), out=residual_out)
    t += qmax
    return t.astype(spec.dtype)


def _round_within_norm(
    q: np.ndarray, x: np.ndarray, scales: np.ndarray, max_norm: float, rng: np.random.Generator
) -> None:
    """Round some of `q` (levels) toward zero, in place, until ||q * scales|| <= max_norm."""
    s = scales.astype(np.float64)
    target = (max_norm * (1.0 - 1e-6)) ** 2  # float32 scales on the coordinator's side
    excess = float(np.dot(q * s, q * s)) - target
    if excess <= 0:
        return
    away = np.flatnonzero(np.abs(q * s) > np.abs(x.astype(np.float64)))
    order = away[rng.permutation(away.size)]
    # one level toward zero saves s^2 (q^2 - (|q| - 1)^2) = s^2 (2|q| - 1) of the squared norm
    saved = np.cumsum(s[order] ** 2 * (2.0 * np.abs(q[order]) - 1.0))
    take = min(order.size, int(np.searchsorted(saved, excess)) + 1)
    flip = order[:take]
    q[flip] -= np.sign(q[flip])


def ring_sum_to_float(
    total: np.ndarray, scales: np.ndarray, spec: RingSpec, count: int
) -> np.ndarray:
    """float32 sum of `count` dequantized updates from their (unmasked) ring sum."""
    if count > spec.clients:
        raise SecAggRefused("overflow", f"{count} summands in a ring sized for {spec.clients}")
    centred = total.astype(np.int64) - count * spec.qmax
    return (centred * scales).astype(np.float32)


def pack_words(words: np.ndarray, word_bits: int) -> bytes:
    """`words` (uint16/uint32, each < 2**word_bits) as word_bits bits each, little-endian."""
    dtype = word_dtype(word_bits)
    width = np.dtype(dtype).itemsize * 8
    if width == word_bits:
        return words.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes()
    n = words.size
    out = np.empty((n * word_bits + 7) // 8, np.uint8)
    for lo in range(0, n, PACK_CHUNK):
        hi = min(lo + PACK_CHUNK, n)
        start = lo * word_bits // 8
        stop = (hi * word_bits + 7) // 8
        if word_bits >= 8:
            out[start:stop] = _pack_gather(words[lo:hi], word_bits)
        else:
            out[start:stop] = _pack_bits(words[lo:hi], word_bits)
    return out.tobytes()


def _pack_gather(words: np.ndarray, b: int) -> np.ndarray:
    """Each output byte from the (at most two, as b >= 8) words its 8 bits fall in."""
    w = np.zeros(words.size + 1, np.uint32)
    w[:-1] = words
    bitpos = np.arange((words.size * b + 7) // 8, dtype=np.int64) * 8
    first = bitpos // b
    offset = (bitpos - first * b).astype(np.uint32)
    value = (w[first] >> offset) | (w[first + 1] << (np.uint32(b) - offset))
    return value.astype(np.uint8)


def _pack_bits(words: np.ndarray, b: int) -> np.ndarray:
    raw = words.astype(np.dtype(words.dtype).newbyteorder("<")).view(np.uint8)
    bits = np.unpackbits(raw.reshape(words.size, -1), axis=1, bitorder="little")[:, :b]
    return np.packbits(bits.reshape(-1), bitorder="little")


def unpack_words(data: bytes, n: int, word_bits: int) -> np.ndarray:
    """Inverse of `pack_words`; SecAggRefused("bad_input") when the size disagrees."""
    expected = (n * word_bits + 7) // 8
    if len(data) != expected:
        raise SecAggRefused("bad_input", f"{len(data)} bytes for {n} words of {word_bits} bits")
    dtype = word_dtype(word_bits)
    itemsize = np.dtype(dtype).itemsize
    width = itemsize * 8
    if width == word_bits:
        return np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).astype(dtype)
    buf = np.zeros(len(data) + 4, np.uint32)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    out = np.empty(n, dtype)
    mask = np.uint32((1 << word_bits) - 1)
    for lo in range(0, n, PACK_CHUNK):
        hi = min(lo + PACK_CHUNK, n)
        if word_bits <= 25:
            # a word spans at most 4 bytes from its first: read them, shift, mask
            bitpos = np.arange(lo, hi, dtype=np.int64) * word_bits
            byte = bitpos >> 3
            value = buf[byte] | (buf[byte + 1] << 8) | (buf[byte + 2] << 16) | (buf[byte + 3] << 24)
            out[lo:hi] = (value >> (bitpos & 7).astype(np.uint32)) & mask
        else:
            start = lo * word_bits // 8
            stop = (hi * word_bits + 7) // 8
            raw = buf[start:stop].astype(np.uint8)
            bits = np.unpackbits(raw, bitorder="little", count=(hi - lo) * word_bits)
            full = np.zeros((hi - lo, width), np.uint8)
            full[:, :word_bits] = bits.reshape(hi - lo, word_bits)
            packed = np.packbits(full, axis=1, bitorder="little")
            out[lo:hi] = packed.view(np.dtype(dtype).newbyteorder("<")).ravel()
    return out
