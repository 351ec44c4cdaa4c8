"""Model export files: a global model as one self-checking `fedge.v1.ModelSnapshot`.

An export is what a device runs: the weights (fp32, fp16, or int8/int4 with one
scale per output channel) plus what the device needs to use them (task name,
input shape, labels) and where they came from (source version, lineage). No
pickle: the file is protobuf, tensors are written and read by the codec.

Quantization is weight-only and per output channel: a Linear weight's row or a
Conv weight's output channel is one codec block (`block_size` = elements per
channel), so a tensor's wire form is the codec's own `QuantizedTensor` and any
fedge decoder reads it. Biases, 1-d and small tensors (< 1024 elements) stay
fp32: they are under 1 % of a model and the most sensitive to error. Scales
are absmax for int8 and int4 alike: per-row clipping chosen for least squared
error was measured on the CNN and lowered int4's top-1 agreement with fp32
(98.3 % against 99.1 %), since the clipped outliers are the weights that matter.

Integrity: `ModelSnapshot.version` is the tensors' hash (as for every
snapshot), and metadata `content-sha256` hashes that together with every other
metadata entry (`content_hash`), so flipping, cutting or editing any byte that
matters makes `parse_model_file` raise `ModelFileError`. The hash detects
damage; it does not authenticate who wrote the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from fedge.common import quantize as qz
from fedge.common.codec_spec import MAX_BLOCK, CodecSpec
from fedge.common.errors import ReasonError, UpdateRejected
from fedge.common.snapshot import tensors_version
from fedge.common.tensor_codec import WIRE_TO_NUMPY, fill_encoded
from fedge.common.update_codec import DEFAULT_MAX_ELEMENTS, decode_tensors
from fedge.v1 import snapshot_pb2, tensor_pb2

EXPORT_FORMATS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
FILE_FORMAT = "fedge.export.v1"
"""Metadata `file-format`: bumped if the layout or the hash definition ever changes."""

SMALL_TENSOR = 1024
"""Float tensors with fewer elements (and every 1-d tensor) stay fp32 in every format."""

DEFAULT_MAX_MODEL_BYTES = 256 << 20
"""A model file larger than this is refused before it is read (the CNN at fp32: 6.7 MB)."""

MAX_INPUT_ELEMENTS = 1 << 24
MAX_INPUT_NDIM = 8
MAX_LABELS = 1 << 16
MAX_METADATA_VALUE = 1 << 20


# metadata keys
K_FILE_FORMAT = "file-format"
K_FORMAT = "format"
K_TASK = "task"
K_INPUT_SHAPE = "input-shape"
K_LABELS = "labels"
K_SOURCE = "source-version"
K_LINEAGE = "lineage"
K_EVALUATION = "evaluation"
K_HASH = "content-sha256"
_HASH_DOMAIN = b"fedge.export.v1\x00"


class ModelFileError(ReasonError, ValueError):
    """A model file is refused; `reason` is a stable code, `detail` says what disagreed.

    Reasons: `too_large`, `unreadable`, `malformed`, `hash_mismatch`,
    `missing_metadata`, `bad_metadata`, `unsupported`, `bad_format`, and the
    codec's own (`bad_length`, `bad_scales`, `non_finite`, ...) for bad tensors.
    """

    what = "model file refused"


@dataclass
class ModelFile:
    """A verified export: float32 weights in order, plus what a device needs to run them.

    `int8_rows` holds the int8 weights exactly as stored (values [rows, per-row],
    float32 scales [rows]) so inference can run them with int8 kernels instead
    of their dequantized copies in `arrays`.
    """

    arrays: dict[str, np.ndarray]
    format: str
    task: str
    input_shape: tuple[int, ...]
    labels: tuple[str, ...]
    source_version: str
    content_hash: str
    size: int
    lineage: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    int8_rows: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


# ---------------------------------------------------------------- hashing


def content_hash(tensors_hash: str, metadata: Mapping[str, str]) -> str:
    """SHA-256 hex over the tensors' hash and every metadata entry but `content-sha256`.

    Canonical and language-neutral: the domain tag, the tensors' hash (64 ASCII
    hex digits), then each entry sorted by its UTF-8 key as
    `u32le(len key) key u32le(len value) value`.
    """
    h = hashlib.sha256(_HASH_DOMAIN)
    h.update(tensors_hash.encode("ascii", "replace"))
    entries = sorted((k.encode(), v.encode()) for k, v in metadata.items() if k != K_HASH)
    for k, v in entries:
        h.update(struct.pack("<I", len(k)))
        h.update(k)
        h.update(struct.pack("<I", len(v)))
        h.update(v)
    return h.hexdigest()


# ---------------------------------------------------------------- export


def per_channel(array: np.ndarray) -> bool:
    """Whether a tensor is quantized per output channel (float, >= 2-d, >= 1024 elements)."""
    return array.dtype.kind == "f" and array.ndim >= 2 and array.size >= SMALL_TENSOR


def _spec_for(array: np.ndarray, fmt: str) -> CodecSpec:
    """The codec spec one tensor of an export is written with."""
    if fmt == "fp32" or not per_channel(array):
        return CodecSpec()
    if fmt == "fp16":
        return CodecSpec(float16=True, error_feedback=False, small=0)
    row = math.prod(array.shape[1:])
    # one block per output channel; a row too long for one block falls back to finer blocks
    block = row if row <= MAX_BLOCK else qz.CHUNK
    return CodecSpec(bits=8 if fmt == "int8" else 4, block=block, error_feedback=False, small=0)


def export_model(
    arrays: Mapping[str, np.ndarray],
    *,
    fmt: str,
    task: str,
    input_shape: Sequence[int],
    labels: Sequence[str] = (),
    source_version: str = "",
    lineage: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, float] | None = None,
) -> bytes:
    """Serialized export of `arrays` (state_dict order) in format `fmt`.

    Deterministic: the same weights and metadata give the same bytes, so an
    export can be cached and named by its hash. Raises ValueError for an
    unknown format, non-finite weights or metadata that could not be read back.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    shape = tuple(int(d) for d in input_shape)
    _check_input_shape(shape)
    snap = snapshot_pb2.ModelSnapshot()
    for name, array in arrays.items():
        a = np.asarray(array)
        fill_encoded(snap.tensors.add(), name, a, _spec_for(a, fmt))
    meta = {
        K_FILE_FORMAT: FILE_FORMAT,
        K_FORMAT: fmt,
        K_TASK: str(task),
        K_INPUT_SHAPE: json.dumps(list(shape)),
        K_LABELS: json.dumps([str(x) for x in labels]),
        K_SOURCE: str(source_version),
        K_LINEAGE: json.dumps(dict(lineage or {}), sort_keys=True),
        K_EVALUATION: json.dumps(_finite_floats(evaluation or {}), sort_keys=True),
    }
    if not meta[K_TASK]:
        raise ValueError("an export needs a task name")
    snap.version = tensors_version(snap)
    meta[K_HASH] = content_hash(snap.version, meta)
    snap.metadata.update(meta)
    return snap.SerializeToString(deterministic=True)


def _finite_floats(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[str(k)] = f
    return out


# ---------------------------------------------------------------- loading


def read_model_file(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_MODEL_BYTES
) -> ModelFile:
    """Read and verify an export file; every failure is a `ModelFileError`."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise ModelFileError("too_large", f"{p}: {size} bytes > cap {max_bytes}")
            data = f.read(max_bytes + 1)  # the size may change under us: never read past the cap
    except OSError as e:
        raise ModelFileError("unreadable", f"{p}: {e.strerror or e}") from None
    return parse_model_file(data, max_bytes=max_bytes)


def parse_model_file(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_MODEL_BYTES,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> ModelFile:
    """Verify and decode export bytes; every failure is a `ModelFileError`.

    Order of checks: size cap, protobuf parse and canonical size, tensors hash, content hash (so
    nothing below trusts an unverified byte), metadata, then the codec's own
    per-tensor validation (lengths against bytes present, scales, bits).
    """
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise ModelFileError("too_large", f"{size} bytes > cap {max_bytes}")
    if size == 0:
        raise ModelFileError("malformed", "empty file")
    try:
        snap = snapshot_pb2.ModelSnapshot.FromString(bytes(data))
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ModelFileError("malformed", f"not a fedge model file (protobuf: {e})") from None
    # Fields this reader does not know, repeated fields or padded encodings would
    # pass the hashes (they hash what was understood): the file must be exactly
    # its canonical encoding's size once unknown fields are dropped.
    snap.DiscardUnknownFields()
    if snap.ByteSize() != size:
        raise ModelFileError("malformed", "unknown, repeated or non-canonical fields in the file")
    meta = dict(snap.metadata)
    if meta.get(K_FILE_FORMAT) != FILE_FORMAT:
        if K_FILE_FORMAT in meta:
            raise ModelFileError("unsupported", f"file format {meta[K_FILE_FORMAT][:40]!r}")
        raise ModelFileError("missing_metadata", f"no {K_FILE_FORMAT!r}: not a fedge export")
    if not snap.version or snap.version != tensors_version(snap):
        raise ModelFileError("hash_mismatch", "the weights do not match the file's tensors hash")
    stated = meta.get(K_HASH, "")
    if not stated:
        raise ModelFileError("missing_metadata", f"no {K_HASH!r}")
    if stated != content_hash(snap.version, meta):
        raise ModelFileError("hash_mismatch", "metadata or weights differ from the content hash")
    fmt = _required(meta, K_FORMAT)
    if fmt not in EXPORT_FORMATS:
        raise ModelFileError("bad_metadata", f"format {fmt[:20]!r}")
    try:
        arrays = decode_tensors(snap.tensors, None, max_elements)
    except UpdateRejected as e:
        raise ModelFileError(e.reason, e.detail) from None
    except (ValueError, IndexError, TypeError, OverflowError, MemoryError) as e:
        raise ModelFileError("decode_error", f"{type(e).__name__}: {e}") from None
    int8_rows = _check_format(snap, fmt)
    for name, a in arrays.items():
        if a.dtype != np.float32 and a.dtype.kind == "f":
            arrays[name] = a.astype(np.float32)
    return ModelFile(
        arrays=arrays,
        format=fmt,
        task=_required(meta, K_TASK),
        input_shape=_parse_input_shape(_required(meta, K_INPUT_SHAPE)),
        labels=_parse_labels(meta.get(K_LABELS, "[]")),
        source_version=meta.get(K_SOURCE, ""),
        content_hash=stated,
        size=size,
        lineage=_parse_json_object(meta.get(K_LINEAGE, "{}"), K_LINEAGE),
        evaluation=_finite_floats(_parse_json_object(meta.get(K_EVALUATION, "{}"), K_EVALUATION)),
        metadata=meta,
        int8_rows=int8_rows,
    )


def _check_format(
    snap: snapshot_pb2.ModelSnapshot, fmt: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every tensor is stored as `fmt` says; collect int8 per-channel weights as stored."""
    want_bits = {"int8": 8, "int4": 4}.get(fmt)
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for msg in snap.tensors:
        if msg.WhichOneof("kind") == "dense":
            if msg.dense.dtype == tensor_pb2.DTYPE_FLOAT16 and fmt != "fp16":
                raise ModelFileError("bad_format", f"{msg.dense.name!r}: fp16 in a {fmt} file")
            continue
        q = msg.quantized
        if want_bits is None or q.bits != want_bits:
            raise ModelFileError("bad_format", f"{q.name!r}: int{q.bits} in a {fmt} file")
        if q.HasField("indices"):
            raise ModelFileError("bad_format", f"{q.name!r}: sparse tensor in an export")
        shape = tuple(int(d) for d in q.shape)
        per_row = int(np.prod(shape[1:])) if len(shape) >= 2 else 0
        if q.bits == 8 and per_row and q.block_size == per_row:
            values = np.frombuffer(q.values, np.int8).reshape(shape[0], per_row)
            scales = np.frombuffer(q.scales, WIRE_TO_NUMPY[q.scale_dtype]).astype(np.float32)
            rows[q.name] = (values, scales)
    return rows


def _required(meta: Mapping[str, str], key: str) -> str:
    value = meta.get(key, "")
    if not value:
        raise ModelFileError("missing_metadata", f"no {key!r}")
    if len(value) > MAX_METADATA_VALUE:
        raise ModelFileError("bad_metadata", f"{key!r} is {len(value)} characters")
    return value


def _check_input_shape(shape: tuple[int, ...]) -> None:
    if not shape or len(shape) > MAX_INPUT_NDIM or any(d < 1 for d in shape):
        raise ValueError(f"input shape {shape}: need 1 to {MAX_INPUT_NDIM} positive dimensions")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise ValueError(f"input shape {shape}: over {MAX_INPUT_ELEMENTS} elements per example")


def _parse_input_shape(text: str) -> tuple[int, ...]:
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raise ModelFileError("bad_metadata", f"{K_INPUT_SHAPE!r} is not JSON") from None
    if not isinstance(raw, list) or not all(type(d) is int for d in raw):
        raise ModelFileError("bad_metadata", f"{K_INPUT_SHAPE!r} is not a list of integers")
    shape = tuple(raw)
    try:
        _check_input_shape(shape)
    except ValueError as e:
        raise ModelFileError("bad_metadata", str(e)) from None
    return shape


def _parse_labels(text: str) -> tuple[str, ...]:
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raise ModelFileError("bad_metadata", f"{K_LABELS!r} is not JSON") from None
    if (
        not isinstance(raw, list)
        or len(raw) > MAX_LABELS
        or not all(isinstance(x, str) for x in raw)
    ):
        raise ModelFileError("bad_metadata", f"{K_LABELS!r} is not a list of strings")
    return tuple(raw)


def _parse_json_object(text: str, key: str) -> dict[str, Any]:
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raise ModelFileError("bad_metadata", f"{key!r} is not JSON") from None
    if not isinstance(raw, dict):
        raise ModelFileError("bad_metadata", f"{key!r} is not a JSON object")
    return raw
