"""Turn one train reply into validated arrays, or reject it with a reason.

A reply is either compressed (its one ArrayRecord holds a single uint8 array
`fedge.update`: a serialized fedge `ModelUpdate`, see docs/CONTRACTS.md) or
plain (full weights from a stock Flower ClientApp). Plain arrays keyed by
position (`"0"`..`"n-1"`, what Flower's `ArrayRecord(list_of_arrays)` builds,
as in its quickstart-numpy) stand for the global model's tensors in order,
which is how stock FedAvg, averaging key by key, treats them. Either way the
result must match the global model tensor for tensor (names, shapes, dtype
kind) and be finite, and the weight (`num-examples`) must be a positive number; otherwise
`UpdateRejected(reason, detail)` is raised so the round can drop the reply,
count why, and carry on with the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedge.common.contract import UPDATE_KEY
from fedge.common.errors import UpdateRejected
from fedge.common.records import records_of
from fedge.common.tensor_codec import QuantizedArray
from fedge.common.update_array import packed_bytes
from fedge.common.update_codec import decode_update

#: Elements per finiteness check: a 256 KiB boolean temporary, not one the size of the tensor.
FINITE_CHUNK = 1 << 18

Layout = dict[str, tuple[tuple[int, ...], np.dtype]]


@dataclass
class DecodedReply:
    """One accepted reply: its arrays (a delta or full weights) and its weight."""

    arrays: dict[str, np.ndarray | QuantizedArray]
    """int8 tensors stay quantized (`QuantizedArray`) until used; see `decode_reply`."""
    is_delta: bool
    weight: float
    metrics: MetricRecord
    array_key: str
    metric_key: str
    compressed: bool
    codec: str


def layout_of(arrays: Mapping[str, np.ndarray]) -> Layout:
    """Name -> (shape, dtype) of a model: what every reply must agree with."""
    return {k: (tuple(int(s) for s in v.shape), np.dtype(v.dtype)) for k, v in arrays.items()}


def is_compressed(record: ArrayRecord) -> bool:
    """True when the record is a fedge-encoded update (a single `fedge.update` array)."""
    return len(record) == 1 and UPDATE_KEY in record


def reply_bytes(message: Message) -> int:
    """Bytes of arrays a reply carried (the update bytes, or the plain arrays' bytes)."""
    if not message.has_content():
        return 0
    records = records_of(message.content, ArrayRecord)
    return sum(len(a.data) for rec in records.values() for a in rec.values())


def _all_finite(a: np.ndarray) -> bool:
    """`np.isfinite(a).all()` without a model-sized boolean temporary."""
    flat = np.ravel(a)
    return all(
        bool(np.isfinite(flat[lo : lo + FINITE_CHUNK]).all())
        for lo in range(0, flat.size, FINITE_CHUNK)
    )


def _single(message: Message) -> tuple[str, ArrayRecord, str, MetricRecord]:
    content = message.content
    arrays, metrics = records_of(content, ArrayRecord), records_of(content, MetricRecord)
    if len(arrays) != 1 or len(metrics) != 1:
        raise UpdateRejected(
            "malformed",
            f"expected one ArrayRecord and one MetricRecord, got {len(arrays)} and {len(metrics)}",
        )
    (akey, arec), (mkey, mrec) = next(iter(arrays.items())), next(iter(metrics.items()))
    return akey, arec, mkey, mrec


def _weight(metrics: MetricRecord, key: str) -> float:
    if key not in metrics:
        raise UpdateRejected("malformed", f"MetricRecord lacks {key!r}")
    value = metrics[key]
    if isinstance(value, list | bool):
        raise UpdateRejected("bad_weight", f"{key!r} must be a single number")
    w = float(value)
    if not np.isfinite(w) or w <= 0:
        raise UpdateRejected("bad_weight", f"{key!r} is {value!r}")
    return w


def _check_tensor(name: str, a: np.ndarray | QuantizedArray, layout: Layout) -> None:
    shape, dtype = layout[name]
    if tuple(a.shape) != shape:
        raise UpdateRejected("shape_mismatch", f"{name}: {tuple(a.shape)} != {shape}")
    if dtype.kind in "fc":
        if a.dtype.kind != "f":
            raise UpdateRejected("dtype_mismatch", f"{name}: {a.dtype} for a {dtype} tensor")
        # a QuantizedArray was checked finite (its scales) when decoded
        if not isinstance(a, QuantizedArray) and not _all_finite(a):
            raise UpdateRejected("non_finite", f"{name} holds NaN or Inf")
    elif (a.dtype.kind in "iu") != (dtype.kind in "iu") or (dtype.kind == "b") != (
        a.dtype.kind == "b"
    ):
        raise UpdateRejected("dtype_mismatch", f"{name}: {a.dtype} for a {dtype} tensor")


def check_arrays(arrays: Mapping[str, np.ndarray | QuantizedArray], layout: Layout) -> None:
    """Raise `UpdateRejected` unless `arrays` match `layout` exactly and are finite."""
    missing = [k for k in layout if k not in arrays]
    if missing:
        raise UpdateRejected("missing_tensor", ", ".join(missing[:5]))
    unexpected = [k for k in arrays if k not in layout]
    if unexpected:
        raise UpdateRejected("unexpected_tensor", ", ".join(unexpected[:5]))
    for name, a in arrays.items():
        _check_tensor(name, a, layout)


def by_position(arrays: Mapping[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """`arrays` keyed by the model's names: positional keys (`"0"`..`"n-1"`) become the
    names of the model's tensors in order; any other keys are returned as they are.

    A positional reply with the wrong number of arrays, or an array whose shape is
    not that of the model's tensor at its position, is refused with that reason.
    """
    keys = list(arrays)
    names = list(layout)
    if keys == names or not keys or set(keys) != {str(i) for i in range(len(keys))}:
        return dict(arrays)
    if len(keys) != len(names):
        reason = "missing_tensor" if len(keys) < len(names) else "unexpected_tensor"
        raise UpdateRejected(reason, f"{len(keys)} arrays keyed by position for a model of "
                             f"{len(names)} tensors ({', '.join(names[:5])})")
    named: dict[str, np.ndarray] = {}
    for position, name in enumerate(names):
        a = arrays[str(position)]
        shape = layout[name][0]
        if tuple(a.shape) != shape:
            raise UpdateRejected("shape_mismatch",
                                 f"array {position} ({name}): {tuple(a.shape)} != {shape}")
        named[name] = a
    return named


def decode_reply(
    message: Message,
    *,
    layout: Layout,
    base_version: str,
    run_id: str,
    server_round: int,
    weighted_by_key: str,
    max_update_bytes: int,
) -> DecodedReply:
    """Decode and validate one train reply, or raise `UpdateRejected`.

    Dense int8 tensors come back as checked `QuantizedArray`s: the streaming
    mean folds them in without building their float32 copies, and
    `np.asarray` decodes them for everything else.
    """
    if message.has_error():
        raise UpdateRejected("client_error", str(message.error.reason)[:200])
    akey, arec, mkey, mrec = _single(message)
    weight = _weight(mrec, weighted_by_key)
    if not is_compressed(arec):
        try:
            arrays = {k: a.numpy() for k, a in arec.items()}
        except Exception as ex:
            raise UpdateRejected("malformed", f"plain arrays: {ex}") from None
        arrays = by_position(arrays, layout)
        check_arrays(arrays, layout)
        return DecodedReply(arrays, False, weight, mrec, akey, mkey, False, "")

    update = decode_update(  # parsed from the Array's own bytes: no copy, no re-measuring
        packed_bytes(arec[UPDATE_KEY], max_update_bytes),
        expected=layout,
        max_bytes=max_update_bytes,
        lazy=True,
    )
    if update.run_id and run_id and update.run_id != run_id:
        raise UpdateRejected("wrong_run", f"update for run {update.run_id!r}")
    if update.round and update.round != server_round:
        raise UpdateRejected("wrong_round", f"update for round {update.round}")
    if update.is_delta and update.base_version != base_version:
        raise UpdateRejected(
            "stale_base", f"delta against {update.base_version[:12]!r}, not {base_version[:12]!r}"
        )
    check_arrays(update.arrays, layout)
    return DecodedReply(
        dict(update.arrays), bool(update.is_delta), weight, mrec, akey, mkey, True, update.codec
    )
