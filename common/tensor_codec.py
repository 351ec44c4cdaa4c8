"""One tensor to and from its wire form (`tensor_pb2.EncodedTensor`).

Encoding follows a `CodecSpec`: non-float tensors (and all under a lossless
spec) go dense and exact; small float tensors go fp16; other float tensors go
fp16, or int8/int4 with block scales, optionally sparse (top-k). Error
feedback adds the previous residual first and returns the new one.

Decoding trusts nothing: every length is checked against the bytes actually
present and against a caller's budget *before* anything is allocated, and any
disagreement raises `UpdateRejected(reason, detail)`.
"""

from __future__ import annotations

import warnings

import numpy as np

from fedge.common import codebook as cb
from fedge.common import quantize as qz
from fedge.common.codec_spec import CodecSpec
from fedge.common.errors import UpdateRejected
from fedge.common.topk import (
    TopkShare,
    decode_positions,
    encode_positions,
    select_topk,
    topk_count,
)
from fedge.v1 import tensor_pb2

# wire dtype -> little-endian numpy dtype
WIRE_TO_NUMPY: dict[int, np.dtype] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DTYPE_UINT8: np.dtype("u1"),
    tensor_pb2.DTYPE_INT8: np.dtype("i1"),
    tensor_pb2.DTYPE_BOOL: np.dtype("?"),
}
_KIND_SIZE_TO_WIRE = {(dt.kind, dt.itemsize): wire for wire, dt in WIRE_TO_NUMPY.items()}
_FLOAT_WIRE = (tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_FLOAT16, tensor_pb2.DTYPE_FLOAT64)
_SCALE_WIRE = (tensor_pb2.DTYPE_FLOAT16, tensor_pb2.DTYPE_FLOAT32)

MAX_NDIM = 32
MAX_DIM = 1 << 40

Expected = tuple[tuple[int, ...], np.dtype]


def wire_dtype(dtype: np.dtype) -> int:
    """The wire enum for a numpy dtype; ValueError for types the wire cannot carry."""
    wire = _KIND_SIZE_TO_WIRE.get((dtype.kind, dtype.itemsize))
    if wire is None:
        raise ValueError(
            f"dtype {dtype} cannot be sent (supported: float16/32/64, int64/32/8, uint8, bool)"
        )
    return wire


def _native(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=")


# ---------------------------------------------------------------- encoding


def _fill_dense(msg: tensor_pb2.Tensor, name: str, array: np.ndarray) -> None:
    msg.name = name
    msg.shape.extend(array.shape)
    msg.dtype = wire_dtype(array.dtype)
    msg.data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def all_finite(x: np.ndarray) -> bool:
    """No NaN or Inf (float16 via its bit patterns: numpy's float16 isfinite is slow)."""
    if x.dtype.kind != "f":
        return True
    if x.dtype.itemsize == 2 and x.dtype.isnative:
        exponent = x.view(np.uint16) & np.uint16(0x7C00)
        return not bool((exponent == np.uint16(0x7C00)).any())
    return bool(np.isfinite(x).all())


def _check_finite(x: np.ndarray, name: str) -> None:
    if not all_finite(x):
        raise ValueError(f"tensor {name!r} holds NaN or Inf")


# numpy converts float16 in a scalar software loop (~40 ms for 10M values); torch
# uses the CPU's conversion instructions (~3 ms). Worth its overhead on big arrays.
_TORCH_CAST_MIN = 1 << 16


def cast(a: np.ndarray, dtype: type | np.dtype) -> np.ndarray:
    """A new contiguous array of `a`'s values in `dtype` (round to nearest even)."""
    out = np.empty(a.shape, dtype)
    simple = a.size < _TORCH_CAST_MIN or not a.dtype.isnative
    if simple or {a.dtype.kind, out.dtype.kind} != {"f"}:
        with np.errstate(over="ignore"):  # to float16: callers handle the infinities
            np.copyto(out, a, casting="unsafe")
        return out
    import torch

    with warnings.catch_warnings():  # read-only input (a wire buffer): torch only reads it
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(np.ascontiguousarray(a))
    torch.from_numpy(out).copy_(src)
    return out


def to_float16(x: np.ndarray) -> np.ndarray:
    """float16 of finite float32 `x`, values beyond the float16 range clipped to ±65504."""
    half = cast(x, np.float16)
    # on the bit patterns: numpy's float16 isinf is another slow software loop
    big = (half.view(np.uint16) & np.uint16(0x7FFF)) == np.uint16(0x7C00)
    if big.any():
        half[big] = np.copysign(np.float16(qz.FP16_MAX), x[big])
    return half


def _fill_quantized(
    msg: tensor_pb2.QuantizedTensor,
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    values: np.ndarray,
    spec: CodecSpec,
    rng: np.random.Generator | None,
    residual_out: np.ndarray | None,
) -> None:
    """Quantize 1-d float32 `values` into `msg`; residual (values - decoded) into residual_out."""
    bits = spec.bits
    assert bits is not None
    if spec.codebook:
        _fill_codebook(msg, name, shape, dtype, values, spec.block, residual_out)
        return
    try:
        stored, scales = qz.choose_scales(qz.block_absmax(values, spec.block), bits)
    except ValueError as e:
        raise ValueError(f"tensor {name!r}: {e}") from None
    q = qz.quantize(values, scales, spec.block, bits, rng=rng, residual_out=residual_out)
    msg.name = name
    msg.shape.extend(shape)
    msg.dtype = wire_dtype(dtype)
    msg.bits = bits
    msg.block_size = spec.block
    msg.scale_dtype = wire_dtype(stored.dtype)
    msg.scales = stored.astype(stored.dtype.newbyteorder("<"), copy=False).tobytes()
    msg.values = q.tobytes()


def _fill_codebook(
    msg: tensor_pb2.QuantizedTensor,
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    values: np.ndarray,
    block: int,
    residual_out: np.ndarray | None,
) -> None:
    """The nf4 form of 1-d float32 `values`: fitted levels, float16 scales, 4-bit indices."""
    try:
        scales, levels, packed = cb.encode(values, block, residual_out)
    except ValueError as e:
        raise ValueError(f"tensor {name!r}: {e}") from None
    msg.name = name
    msg.shape.extend(shape)
    msg.dtype = wire_dtype(dtype)
    msg.bits = 4
    msg.block_size = block
    msg.scale_dtype = tensor_pb2.DTYPE_FLOAT16
    msg.scales = scales.astype("<f2", copy=False).tobytes()
    msg.codebook = levels.astype("<f4", copy=False).tobytes()
    msg.values = packed.tobytes()


def is_sparsified(array: np.ndarray, spec: CodecSpec) -> bool:
    """Whether `fill_encoded` sends `array` as top-k positions and values."""
    a = np.asarray(array)
    return spec.topk is not None and a.dtype.kind == "f" and a.size >= spec.small


def fill_encoded(
    msg: tensor_pb2.EncodedTensor,
    name: str,
    array: np.ndarray,
    spec: CodecSpec,
    residual: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    topk_share: TopkShare | None = None,
) -> np.ndarray | None:
    """Encode `array` (+ `residual`) into `msg` in place; return the new float32 residual.

    `topk_share` is this tensor's part of an update-wide top k (`split_topk`);
    without it a topk spec keeps its fraction of this tensor. Returns None for
    tensors error feedback does not track (non-float, or a lossless spec, or
    error feedback off).
    """
    if not name:
        raise ValueError("tensor names must be non-empty")
    a = np.asarray(array)
    is_float = a.dtype.kind == "f"
    wire_dtype(a.dtype)  # fail early on types the wire cannot carry
    if residual is not None:
        residual = np.asarray(residual)
        if not is_float:
            raise ValueError(f"residual given for non-float tensor {name!r}")
        if residual.shape != a.shape:
            raise ValueError(
                f"residual for {name!r} has shape {residual.shape}, tensor has {a.shape}"
            )
    track = is_float and spec.uses_error_feedback
    if not is_float or not spec.lossy:
        sent = a if residual is None else (a + residual).astype(a.dtype)
        _check_finite(sent, name)
        _fill_dense(msg.dense, name, sent)
        if not track:
            return None
        if residual is None:
            return np.zeros(a.shape, np.float32)
        return (np.asarray(a, np.float32) + residual - sent.astype(np.float32)).astype(np.float32)

    x = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
    owned = not np.may_share_memory(x, a)
    if residual is not None:
        x = x + np.ascontiguousarray(residual, dtype=np.float32).reshape(-1)
        owned = True

    # fp16 for the fp16 codec, and for small tensors (biases, norms) under any lossy
    # codec: a scale per block would cost more than it saves; error feedback keeps
    # what fp16 rounding drops
    if spec.float16 or a.size < spec.small:
        _check_finite(x, name)
        half = to_float16(x)
        msg.dense.name = name
        msg.dense.shape.extend(a.shape)
        msg.dense.dtype = tensor_pb2.DTYPE_FLOAT16
        msg.dense.data = half.astype("<f2", copy=False).tobytes()
        if not track:
            return None
        res = cast(half, np.float32)
        np.subtract(x, res, out=res)
        return res.reshape(a.shape)

    if spec.stochastic and rng is None:
        rng = np.random.default_rng()
    rng_used = rng if spec.stochastic else None
    quant = msg.quantized
    if spec.topk is not None:
        _check_finite(x, name)
        if topk_share is None:
            positions = select_topk(x, topk_count(x.size, spec.topk))
        else:
            positions = select_topk(x, topk_share.kept, topk_share.threshold)
        kept = x[positions]
        kept_res = np.empty_like(kept) if track else None
        _fill_quantized(quant, name, a.shape, a.dtype, kept, spec, rng_used, kept_res)
        quant.indices.count = positions.size
        quant.indices.delta_varint = encode_positions(positions)
        if not track:
            return None
        res = x if owned else x.copy()
        res[positions] = kept_res
        return res.reshape(a.shape)

    if not track:
        _fill_quantized(quant, name, a.shape, a.dtype, x, spec, rng_used, None)
        return None
    res = x if owned else np.empty_like(x)
    _fill_quantized(quant, name, a.shape, a.dtype, x, spec, rng_used, res)
    return res.reshape(a.shape)


# ---------------------------------------------------------------- decoding


def _checked_shape(
    name: str, dims: list[int], expected: Expected | None, budget: int | None
) -> tuple[tuple[int, ...], int]:
    """The declared shape and element count, checked before any allocation."""
    if len(dims) > MAX_NDIM:
        raise UpdateRejected("shape_mismatch", f"{name!r}: {len(dims)} dimensions")
    shape = tuple(int(d) for d in dims)
    if expected is not None and shape != tuple(expected[0]):
        raise UpdateRejected(
            "shape_mismatch", f"{name!r}: shape {shape}, expected {tuple(expected[0])}"
        )
    if any(d > MAX_DIM for d in shape):
        raise UpdateRejected("too_large", f"{name!r}: dimension over {MAX_DIM} in {shape}")
    n = 1
    for d in shape:
        n *= d
    if budget is not None and n > budget:
        raise UpdateRejected("too_large", f"{name!r}: {n} elements exceed the budget {budget}")
    return shape, n


def _check_expected_dtype(name: str, got: np.dtype, expected: Expected | None) -> None:
    if expected is not None and np.dtype(expected[1]) != got:
        raise UpdateRejected("dtype_mismatch", f"{name!r}: dtype {got}, expected {expected[1]}")


def _decode_dense(
    msg: tensor_pb2.Tensor, expected: Expected | None, budget: int | None
) -> tuple[np.ndarray, int]:
    name = msg.name
    wire = WIRE_TO_NUMPY.get(msg.dtype)
    if wire is None:
        raise UpdateRejected("bad_dtype", f"{name!r}: dtype enum {msg.dtype}")
    native = _native(wire)
    if expected is not None:
        want = np.dtype(expected[1])
        # the fp16 codec sends float tensors as float16: widen to the model's float dtype
        widen = wire.kind == "f" and want.kind == "f" and wire.itemsize < want.itemsize
        if want != native and not widen:
            raise UpdateRejected("dtype_mismatch", f"{name!r}: dtype {native}, expected {want}")
    shape, n = _checked_shape(name, list(msg.shape), expected, budget)
    data = msg.data
    if len(data) != n * wire.itemsize:
        raise UpdateRejected(
            "bad_length",
            f"{name!r}: {len(data)} data bytes for {n} x {wire.itemsize}-byte elements",
        )
    raw = np.frombuffer(data, wire)
    if not all_finite(raw):
        raise UpdateRejected("non_finite", f"{name!r}: dense data holds NaN or Inf")
    arr = cast(raw, native).reshape(shape)
    if wire.kind == "b" and n and np.frombuffer(data, np.uint8).max() > 1:
        raise UpdateRejected("bad_values", f"{name!r}: bool bytes other than 0 and 1")
    if expected is not None and arr.dtype != expected[1]:
        arr = cast(arr, expected[1])
    return arr, n


class QuantizedArray:
    """A dense int8 tensor left quantized (`scale[block] * q`), decoded only when asked.

    Decoding a 5 M-parameter update to float32 writes 20 MB that the
    coordinator's running sum reads once and drops: `accumulate_into` folds
    the int8 values straight into the sum instead (the same float32 products).
    Everything else sees a float array: `np.asarray(q)` (and any numpy
    operation) decodes it. Made only after every check `_decode_quantized`
    applies, so a `QuantizedArray` always decodes to finite values.
    """

    __slots__ = ("block", "dtype", "scales", "shape", "values")

    def __init__(
        self, values: np.ndarray, scales: np.ndarray, block: int, shape: tuple[int, ...]
    ) -> None:
        self.values = values
        self.scales = scales
        self.block = block
        self.shape = shape
        self.dtype = np.dtype(np.float32)

    @property
    def size(self) -> int:
        return int(self.values.size)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        out = qz.dequantize(self.values, self.size, self.scales, self.block, 8).reshape(self.shape)
        return out if dtype is None else out.astype(dtype, copy=False)

    def accumulate_into(self, acc: np.ndarray, weight: float) -> None:
        """`acc += weight * decoded` (acc: a float array of the same size, flattened in C order)."""
        flat = acc.reshape(-1)
        if flat.size != self.size:
            raise ValueError(f"accumulator of {flat.size} elements for {self.size}")
        qz.dequantize_accumulate(self.values, self.size, self.scales, self.block, 8, flat, weight)


def _decode_quantized(
    msg: tensor_pb2.QuantizedTensor,
    expected: Expected | None,
    budget: int | None,
    lazy: bool = False,
) -> tuple[np.ndarray | QuantizedArray, int]:
    name = msg.name
    if msg.bits not in qz.QMAX:
        raise UpdateRejected("bad_bits", f"{name!r}: bits={msg.bits}, expected 4 or 8")
    if msg.dtype not in _FLOAT_WIRE:
        raise UpdateRejected("bad_dtype", f"{name!r}: quantized restore dtype enum {msg.dtype}")
    if msg.scale_dtype not in _SCALE_WIRE:
        raise UpdateRejected("bad_scales", f"{name!r}: scale dtype enum {msg.scale_dtype}")
    out_dtype = _native(WIRE_TO_NUMPY[msg.dtype])
    _check_expected_dtype(name, out_dtype, expected)
    shape, n = _checked_shape(name, list(msg.shape), expected, budget)
    bits, block = msg.bits, msg.block_size
    sparse = msg.HasField("indices")
    m = msg.indices.count if sparse else n
    if m > n:
        raise UpdateRejected("bad_indices", f"{name!r}: {m} indices for {n} elements")
    # index bytes are bounded by the message size, so decoding them first is safe
    positions = decode_positions(msg.indices.delta_varint, m, n) if sparse else None
    values = msg.values
    want_len = m if bits == 8 else (m + 1) // 2
    if len(values) != want_len:
        raise UpdateRejected(
            "bad_length", f"{name!r}: {len(values)} value bytes for {m} int{bits} values"
        )
    scale_np = WIRE_TO_NUMPY[msg.scale_dtype]
    scale_bytes = msg.scales
    nb = qz.num_blocks(m, block)
    if len(scale_bytes) != nb * scale_np.itemsize:
        raise UpdateRejected(
            "bad_scales",
            f"{name!r}: {len(scale_bytes)} scale bytes for {nb} blocks of {scale_np}",
        )
    scales = np.frombuffer(scale_bytes, scale_np).astype(np.float32)
    if nb:
        if not np.isfinite(scales).all():
            raise UpdateRejected("non_finite", f"{name!r}: scales hold NaN or Inf")
        if scales.min() < 0:
            raise UpdateRejected("bad_scales", f"{name!r}: negative scale")
        limit = float(np.finfo(out_dtype).max if out_dtype.itemsize < 8 else np.finfo("f4").max)
        if not msg.codebook and float(scales.max()) * qz.QMAX[bits] > limit:
            raise UpdateRejected("non_finite", f"{name!r}: scales overflow {out_dtype}")
    q = np.frombuffer(values, np.int8 if bits == 8 else np.uint8)
    if bits == 4 and m % 2 and q[-1] >> 4:
        raise UpdateRejected("bad_values", f"{name!r}: non-zero padding nibble")
    if msg.codebook:
        decoded = cb.decode(q, m, scales, _checked_codebook(msg, scales, out_dtype), block)
    else:
        if lazy and bits == 8 and positions is None and out_dtype == np.float32:
            try:
                qz.check_range(q, bits)
            except ValueError as e:
                raise UpdateRejected("bad_values", f"{name!r}: {e}") from None
            return QuantizedArray(q, scales, block, shape), n
        try:
            decoded = qz.dequantize(q, m, scales, block, bits)
        except ValueError as e:
            raise UpdateRejected("bad_values", f"{name!r}: {e}") from None
    if positions is not None:
        dense = np.zeros(n, np.float32)
        dense[positions] = decoded
        decoded = dense
    if out_dtype != np.float32:
        decoded = decoded.astype(out_dtype)
    return decoded.reshape(shape), n


def _checked_codebook(
    msg: tensor_pb2.QuantizedTensor, scales: np.ndarray, out_dtype: np.dtype
) -> np.ndarray:
    """The float32 levels of an nf4 tensor, after the checks its decode relies on.

    Its scales were checked finite and non-negative; here the product of the
    largest scale and level must fit the restored dtype.
    """
    name = msg.name
    if msg.bits != 4:
        raise UpdateRejected("bad_codebook", f"{name!r}: a codebook needs bits=4, not {msg.bits}")
    if len(msg.codebook) != cb.CODEBOOK_BYTES:
        raise UpdateRejected(
            "bad_codebook",
            f"{name!r}: {len(msg.codebook)} codebook bytes, expected {cb.CODEBOOK_BYTES}"
            f" ({cb.LEVELS} float32 levels)",
        )
    levels = np.frombuffer(msg.codebook, "<f4").astype(np.float32)
    if not np.isfinite(levels).all():
        raise UpdateRejected("non_finite", f"{name!r}: codebook holds NaN or Inf")
    if scales.size:
        limit = float(np.finfo(out_dtype).max if out_dtype.itemsize < 8 else np.finfo("f4").max)
        if float(scales.max()) * float(np.abs(levels).max()) > limit:
            raise UpdateRejected("non_finite", f"{name!r}: scales x codebook overflow {out_dtype}")
    return levels


def decode_tensor(
    msg: tensor_pb2.EncodedTensor,
    expected: Expected | None = None,
    budget: int | None = None,
    lazy: bool = False,
) -> tuple[str, np.ndarray | QuantizedArray, int]:
    """(name, array, element count) of one wire tensor; `budget` caps the element count.

    `lazy`: a dense int8 tensor restoring to float32 comes back as a checked
    `QuantizedArray` (decoded when used) instead of a float32 array.
    """
    kind = msg.WhichOneof("kind")
    if kind == "dense":
        arr, n = _decode_dense(msg.dense, expected, budget)
        return msg.dense.name, arr, n
    if kind == "quantized":
        q, n = _decode_quantized(msg.quantized, expected, budget, lazy)
        return msg.quantized.name, q, n
    raise UpdateRejected("malformed", "tensor is neither dense nor quantized")


def tensor_name(msg: tensor_pb2.EncodedTensor) -> str:
    """Name of a wire tensor without decoding it ("" if it has no kind)."""
    kind = msg.WhichOneof("kind")
    if kind == "dense":
        return msg.dense.name
    if kind == "quantized":
        return msg.quantized.name
    return ""
