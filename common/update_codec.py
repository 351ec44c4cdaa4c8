"""A device's model update to and from `update_pb2.ModelUpdate` bytes.

The device calls `encode_update` with its delta and last round's residual and
keeps the residual it gets back (error feedback). The coordinator calls
`decode_update` on untrusted bytes with the model's expected shapes and dtypes;
anything inconsistent raises `UpdateRejected(reason, detail)` and nothing is
allocated on the word of a length field alone.

Model snapshots reuse `encode_arrays` / `decode_tensors`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError

from fedge.common.alloc import note_payload
from fedge.common.codec_spec import CodecSpec, as_spec, parse_codec
from fedge.common.errors import CodecSpecError, UpdateRejected
from fedge.common.tensor_codec import (
    Expected,
    QuantizedArray,
    decode_tensor,
    fill_encoded,
    is_sparsified,
    tensor_name,
)
from fedge.common.topk import TopkShare, split_topk
from fedge.v1 import tensor_pb2, update_pb2

# A 1.66M-parameter CNN in fp32 is 6.6 MB; 256 MiB leaves room for ~60M-float
# models sent uncompressed while bounding what one reply can make us hold.
DEFAULT_MAX_UPDATE_BYTES = 256 << 20
# Sparse tensors declare their dense size; without `expected`, cap the total
# elements decoded so a tiny message cannot demand a huge dense allocation.
DEFAULT_MAX_ELEMENTS = 64 << 20

ExpectedMap = Mapping[str, Expected]


@dataclass
class DecodedUpdate:
    """A validated update: arrays in wire order plus its metadata."""

    arrays: dict[str, np.ndarray | QuantizedArray]
    """numpy arrays; with `lazy=True` decoding, int8 tensors as `QuantizedArray`s."""
    run_id: str = ""
    round: int = 0
    base_version: str = ""
    codec: str = ""
    is_delta: bool = True
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def _fill_all(
    add: Callable[[], tensor_pb2.EncodedTensor],
    arrays: Mapping[str, np.ndarray],
    spec: CodecSpec,
    residual: Mapping[str, np.ndarray] | None,
    rng: np.random.Generator | None,
) -> dict[str, np.ndarray]:
    residual = residual or {}
    note_payload(sum(getattr(a, "nbytes", 0) for a in arrays.values()))
    unknown = set(residual) - set(arrays)
    if unknown:
        raise ValueError(f"residual for tensors not in the update: {sorted(unknown)}")
    for name in arrays:
        if not isinstance(name, str):
            raise ValueError(f"tensor names must be strings, not {type(name).__name__}")
    keep = _topk_shares(arrays, spec, residual)
    new_residual: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        msg = add()
        res = fill_encoded(msg, name, array, spec, residual.get(name), rng, keep.get(name))
        if res is not None:
            new_residual[name] = res
    return new_residual


def _topk_shares(
    arrays: Mapping[str, np.ndarray], spec: CodecSpec, residual: Mapping[str, np.ndarray]
) -> dict[str, TopkShare]:
    """Each sparsified tensor's share of an update-wide top k ({}: each tensor's own k)."""
    if spec.topk is None or spec.topk_per_tensor:
        return {}
    names = [name for name, array in arrays.items() if is_sparsified(array, spec)]
    if len(names) < 2:  # one tensor's own k is the update's
        return {}
    values: dict[str, np.ndarray] = {}
    for name in names:
        x = np.asarray(arrays[name], np.float32)
        res = residual.get(name)
        values[name] = x if res is None else x + np.asarray(res, np.float32).reshape(x.shape)
    return split_topk(values, spec.topk)


def encode_arrays(
    arrays: Mapping[str, np.ndarray],
    spec: CodecSpec | str,
    residual: Mapping[str, np.ndarray] | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[list[tensor_pb2.EncodedTensor], dict[str, np.ndarray]]:
    """Encode named arrays in order; return the wire tensors and the new residual."""
    spec = as_spec(spec)
    out: list[tensor_pb2.EncodedTensor] = []

    def add() -> tensor_pb2.EncodedTensor:
        out.append(tensor_pb2.EncodedTensor())
        return out[-1]

    new_residual = _fill_all(add, arrays, spec, residual, rng)
    return out, new_residual


def encode_update(
    arrays: Mapping[str, np.ndarray],
    spec: CodecSpec | str,
    *,
    residual: Mapping[str, np.ndarray] | None = None,
    rng: np.random.Generator | None = None,
    run_id: str = "",
    round: int = 0,
    base_version: str = "",
    num_examples: int = 0,
    metrics: Mapping[str, float] | None = None,
    is_delta: bool = True,
) -> tuple[update_pb2.ModelUpdate, dict[str, np.ndarray]]:
    """Encode an update; return it and the new residual.

    The residual is ``(array + old residual) - decoded`` per float tensor, float32;
    empty when the spec is lossless or has error feedback off. Raises ValueError
    for NaN/Inf in the arrays or metrics, unsupported dtypes or mismatched
    residuals: it never builds an update that `decode_update` would reject.
    """
    spec = as_spec(spec)
    update = update_pb2.ModelUpdate(
        run_id=run_id,
        round=round,
        base_model_version=base_version,
        codec=spec.canonical,
        is_delta=is_delta,
        num_examples=num_examples,
    )
    for key, value in (metrics or {}).items():
        if not math.isfinite(float(value)):
            raise ValueError(f"metric {key!r} is {value}: decode_update would reject it")
        update.metrics[key] = float(value)
    # fill submessages in place: building them apart and appending would copy every payload
    new_residual = _fill_all(update.tensors.add, arrays, spec, residual, rng)
    return update, new_residual


def decode_tensors(
    tensors: Iterable[tensor_pb2.EncodedTensor],
    expected: ExpectedMap | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    lazy: bool = False,
) -> dict[str, np.ndarray | QuantizedArray]:
    """Validate and decode wire tensors, keeping their order.

    With `expected`, names must match exactly and each shape/dtype must agree
    (a float16 dense tensor widens to an expected float32/float64). Without it,
    the total element count is capped by `max_elements`.
    """
    out: dict[str, np.ndarray | QuantizedArray] = {}
    budget = None if expected is not None else max_elements
    if isinstance(tensors, list | tuple):
        note_payload(sum(t.ByteSize() for t in tensors))
    for msg in tensors:
        name = tensor_name(msg)
        if not name:
            raise UpdateRejected("malformed", "tensor without a name or kind")
        if name in out:
            raise UpdateRejected("duplicate_tensor", f"{name!r} appears twice")
        want = None
        if expected is not None:
            if name not in expected:
                raise UpdateRejected("unexpected_tensor", f"{name!r} is not in the model")
            want = expected[name]
        _, array, n = decode_tensor(msg, want, budget, lazy)
        if budget is not None:
            budget -= n
        out[name] = array
    if expected is not None and len(out) != len(expected):
        missing = [k for k in expected if k not in out]
        raise UpdateRejected("missing_tensor", f"missing {missing[:5]} ({len(missing)} in all)")
    return out


def _parse(data: bytes | update_pb2.ModelUpdate, max_bytes: int) -> update_pb2.ModelUpdate:
    if isinstance(data, update_pb2.ModelUpdate):
        size = data.ByteSize()
        if size > max_bytes:
            raise UpdateRejected("too_large", f"{size} bytes exceed the cap of {max_bytes}")
        return data
    if isinstance(data, memoryview | bytearray | np.ndarray):
        data = bytes(data) if not isinstance(data, np.ndarray) else data.tobytes()
    if not isinstance(data, bytes):
        raise UpdateRejected("malformed", f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise UpdateRejected("too_large", f"{len(data)} bytes exceed the cap of {max_bytes}")
    note_payload(len(data))
    try:
        return update_pb2.ModelUpdate.FromString(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise UpdateRejected("malformed", f"not a ModelUpdate: {e}") from None


def decode_update(
    data: bytes | update_pb2.ModelUpdate,
    *,
    expected: ExpectedMap | None = None,
    max_bytes: int = DEFAULT_MAX_UPDATE_BYTES,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    lazy: bool = False,
) -> DecodedUpdate:
    """Parse and validate an update; raises only `UpdateRejected` for bad input.

    `lazy=True` leaves dense int8 tensors quantized (`QuantizedArray`, fully
    checked, decoded on use): what the coordinator's running sum folds in.
    """
    try:
        return _decode_update(data, expected, max_bytes, max_elements, lazy)
    except UpdateRejected:
        raise
    except (ValueError, IndexError, TypeError, OverflowError, MemoryError) as e:
        # A check is missing somewhere: still reject, under a reason tests watch for.
        raise UpdateRejected("decode_error", f"{type(e).__name__}: {e}") from e


def _decode_update(
    data: bytes | update_pb2.ModelUpdate,
    expected: ExpectedMap | None,
    max_bytes: int,
    max_elements: int,
    lazy: bool = False,
) -> DecodedUpdate:
    update = _parse(data, max_bytes)
    try:
        parse_codec(update.codec)
    except CodecSpecError as e:
        raise UpdateRejected("bad_codec", str(e)) from None
    metrics = dict(update.metrics)
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise UpdateRejected("non_finite", f"metrics {bad[:5]} are NaN or Inf")
    arrays = decode_tensors(update.tensors, expected, max_elements, lazy)
    return DecodedUpdate(
        arrays=arrays,
        run_id=update.run_id,
        round=update.round,
        base_version=update.base_model_version,
        codec=update.codec,
        is_delta=update.is_delta,
        num_examples=update.num_examples,
        metrics=metrics,
    )
