"""Downlink deltas: the global model as an int8 delta against a model the device holds.

Both ends call the same two functions on the same bytes, so the model a device
rebuilds is bit for bit the one the server computed (docs/compression.md,
"Compressed downlink"): `encode_model_delta` on the server and
`apply_model_delta` on both. Models are named by `fedge.common.model_version`,
the same hash as the coordinator's `fedge.base-version`.

Wire: a train message whose ArrayRecord holds the single uint8 array
`DOWNLINK_ARRAY_KEY` (a serialized `fedge.v1.ModelUpdate`, `is_delta`, its
`base_model_version` the anchor's version) is a compressed downlink; the
config then names the codec, the anchor and the version of the model the
device must end up with (`DownlinkFields`). A device's reply names the anchor
it holds (`tag_held` / `held_of`). The server writes and the device reads
these with the same functions here, so the key names (`fedge.common.contract`)
are spelled in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedge.common.codec_spec import parse_codec
from fedge.common.contract import (
    DOWNLINK_ANCHOR_KEY,
    DOWNLINK_ARRAY_KEY,
    DOWNLINK_CODEC_KEY,
    DOWNLINK_HELD_KEY,
    DOWNLINK_REPLY_KEY,
    DOWNLINK_TARGET_KEY,
    ZERO_ANCHOR,
)
from fedge.common.update_array import pack_update, packed_bytes
from fedge.common.update_codec import DEFAULT_MAX_UPDATE_BYTES, decode_update, encode_update


@dataclass(frozen=True)
class DownlinkFields:
    """What a train config says about its downlink: the codec, the anchor, the target.

    `anchor` is the version of the model the delta is against (or of the plain
    model sent, which becomes the device's anchor; `ZERO_ANCHOR` for a
    compressed first contact); `target` (deltas only) the version of the model
    the device must rebuild.
    """

    codec: str
    anchor: str
    target: str = ""

    def to_config(self) -> dict[str, str]:
        """The train config entries that announce this downlink."""
        out = {DOWNLINK_CODEC_KEY: self.codec, DOWNLINK_ANCHOR_KEY: self.anchor}
        if self.target:
            out[DOWNLINK_TARGET_KEY] = self.target
        return out

    @classmethod
    def read(cls, config: Mapping[str, Any]) -> DownlinkFields | None:
        """The downlink a train config announces; None when none is in force."""
        codec = str(config.get(DOWNLINK_CODEC_KEY, "") or "")
        if codec in ("", "none"):
            return None
        return cls(codec, str(config.get(DOWNLINK_ANCHOR_KEY, "")),
                   str(config.get(DOWNLINK_TARGET_KEY, "")))


def delta_record(packed: Array) -> ArrayRecord:
    """The ArrayRecord of a delta message: the packed delta as its only array."""
    return ArrayRecord({DOWNLINK_ARRAY_KEY: packed})


def packed_delta(record: ArrayRecord) -> Array | None:
    """The packed delta if `record` is a delta message's model, else None (plain weights)."""
    if len(record) == 1 and DOWNLINK_ARRAY_KEY in record:
        return record[DOWNLINK_ARRAY_KEY]
    return None


def tag_held(content: RecordDict, version: str) -> None:
    """Add to a train reply the record naming the anchor the device holds ("" for none)."""
    content[DOWNLINK_REPLY_KEY] = ConfigRecord({DOWNLINK_HELD_KEY: version})


def held_of(content: RecordDict) -> str:
    """The anchor a train reply says its device holds ("" when it names none)."""
    record = content.get(DOWNLINK_REPLY_KEY)
    return str(record.get(DOWNLINK_HELD_KEY, "")) if isinstance(record, ConfigRecord) else ""


def encode_model_delta(
    target: Mapping[str, np.ndarray],
    anchor: Mapping[str, np.ndarray] | None,
    spec: str,
    *,
    anchor_version: str,
    run_id: str = "",
    round: int = 0,
) -> Array:
    """`target - anchor`, encoded with `spec` and packed as one raw-bytes Array.

    No error-feedback residual is kept: the next delta is again taken from the
    exact target, so what this one drops is not carried anywhere. `anchor=None`
    is the zero model (`ZERO_ANCHOR`): the target itself is encoded, every float
    tensor quantized (`small=0`), because a small tensor would go as fp16 and the
    device, holding no model, could not tell its dtype.
    """
    if anchor is None:
        whole = replace(parse_codec(spec), small=0).canonical
        model = {k: np.array(t, copy=True) for k, t in target.items()}
        update, _ = encode_update(model, whole, run_id=run_id, round=round,
                                  base_version=anchor_version or ZERO_ANCHOR, is_delta=True)
        return pack_update(update.SerializeToString())
    delta = {}
    for k, t in target.items():
        a = anchor[k]
        if t.shape != a.shape or t.dtype != a.dtype:
            raise ValueError(f"{k}: target {t.dtype}{t.shape} vs anchor {a.dtype}{a.shape}")
        delta[k] = np.subtract(t, a, dtype=t.dtype)
    update, _ = encode_update(
        delta, spec, run_id=run_id, round=round, base_version=anchor_version, is_delta=True
    )
    return pack_update(update.SerializeToString())


def apply_model_delta(
    anchor: Mapping[str, np.ndarray] | None,
    packed: Array,
    *,
    max_bytes: int = DEFAULT_MAX_UPDATE_BYTES,
) -> dict[str, np.ndarray]:
    """`anchor + decode(packed)`, tensor by tensor in the anchor's dtype.

    Raises `UpdateRejected` when the bytes are not a delta for this anchor's
    layout. Server and device both rebuild the model with this function.
    `anchor=None` is the zero model: the decoded tensors are the model, in the
    layout the update declares (a device that holds nothing has none to check).
    """
    if anchor is None:
        decoded = decode_update(packed_bytes(packed, max_bytes), max_bytes=max_bytes)
        return {k: np.array(d, copy=True) for k, d in decoded.arrays.items()}
    expected = {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in anchor.items()}
    decoded = decode_update(packed_bytes(packed, max_bytes), expected=expected,
                            max_bytes=max_bytes)
    out: dict[str, np.ndarray] = {}
    for k, a in anchor.items():
        d = decoded.arrays[k]
        out[k] = np.add(a, d.astype(a.dtype, copy=False), dtype=a.dtype)
    return out
