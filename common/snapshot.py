"""Global model snapshots: ordered numpy arrays <-> `fedge.v1.ModelSnapshot` protobuf.

A snapshot is how a global model version is stored on the coordinator and
shipped to devices: tensors in state_dict order plus string metadata, never
pickle. Tensors are written and read by the codec (`update_codec.encode_arrays`
/ `decode_tensors`), so a snapshot is dense fp32 little-endian by default and
may be fp16/int8/int4 for exports; reading validates every tensor and raises
`UpdateRejected` for anything inconsistent, because snapshot bytes come from
disk or the network.

Three hashes, three jobs (docs/coordinator.md):
- the model *version* (store file name, FetchModel, runs/rounds in SQLite) is
  the SHA-256 of the serialized snapshot bytes (server/model_store.py);
- `ModelSnapshot.version` inside the message is `tensors_version`, the SHA-256
  of the encoded tensors alone, so a file shipped on its own checks its weights;
- `fedge.base-version` in train messages is the weights' content hash the
  strategy wrapper computes (`fedge.common.model_version.model_version`).

A FetchModel header names these bytes `MODEL_SNAPSHOT_FORMAT` (`fedge.common.contract`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
from google.protobuf.message import DecodeError

from fedge.common.errors import UpdateRejected
from fedge.common.update_codec import DEFAULT_MAX_ELEMENTS, decode_tensors, encode_arrays
from fedge.v1 import snapshot_pb2

DEFAULT_MAX_SNAPSHOT_BYTES = 1 << 30
"""1 GiB: far above the models fedge targets, low enough to refuse garbage early."""

Expected = Mapping[str, tuple[tuple[int, ...], np.dtype]]


def tensors_version(snapshot: snapshot_pb2.ModelSnapshot) -> str:
    """SHA-256 hex of the snapshot's tensors alone (what `ModelSnapshot.version` holds).

    Taken over a snapshot message carrying only the tensors: maps are left out,
    so every protobuf implementation writes the same bytes for it.
    """
    only = snapshot_pb2.ModelSnapshot(tensors=snapshot.tensors)
    return hashlib.sha256(only.SerializeToString(deterministic=True)).hexdigest()


def arrays_to_snapshot(
    arrays: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    *,
    codec: str = "none",
) -> snapshot_pb2.ModelSnapshot:
    """A ModelSnapshot of `arrays` in order, with its tensors_version set.

    `codec` "none" keeps every tensor dense and exact (fp32 stays fp32,
    little-endian); a lossy spec ("fp16", "int8", ...) is for exports.
    Raises UpdateRejected for arrays the wire cannot carry.
    """
    try:
        tensors, _ = encode_arrays(arrays, codec)
    except ValueError as e:
        raise UpdateRejected("unsupported_tensor", str(e)) from None
    snap = snapshot_pb2.ModelSnapshot(tensors=tensors, metadata=dict(metadata or {}))
    snap.version = tensors_version(snap)
    return snap


def parse_snapshot(
    data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES
) -> snapshot_pb2.ModelSnapshot:
    """Parse snapshot bytes, refusing oversized or malformed input with UpdateRejected."""
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise UpdateRejected("too_large", f"{size} bytes > {max_bytes}")
    try:
        return snapshot_pb2.ModelSnapshot.FromString(bytes(data))
    except (DecodeError, ValueError, RuntimeError) as e:
        raise UpdateRejected("malformed", f"not a ModelSnapshot: {e}") from None


def snapshot_to_arrays(
    data: bytes | bytearray | memoryview,
    *,
    expected: Expected | None = None,
    max_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    check_version: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Decode snapshot bytes into (ordered arrays, metadata), validating everything.

    `expected` maps tensor name to (shape, dtype) and must match exactly;
    without it the total element count is capped by `max_elements`.
    `check_version` compares `ModelSnapshot.version` (when set) with the tensors.
    """
    snap = parse_snapshot(data, max_bytes=max_bytes)
    if check_version and snap.version and snap.version != tensors_version(snap):
        raise UpdateRejected("hash_mismatch", "snapshot tensors do not match its version")
    try:
        arrays = decode_tensors(snap.tensors, expected, max_elements)
    except UpdateRejected:
        raise
    except (ValueError, IndexError, TypeError, OverflowError, MemoryError) as e:
        raise UpdateRejected("decode_error", f"{type(e).__name__}: {e}") from e
    return arrays, dict(snap.metadata)
