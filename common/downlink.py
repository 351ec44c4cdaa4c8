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
device must end up with (the keys live in `fedge.common.contract`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
from flwr.app import Array

from fedge.common.codec_spec import parse_codec
from fedge.common.contract import ZERO_ANCHOR
from fedge.common.update_array import pack_update, packed_bytes
from fedge.common.update_codec import DEFAULT_MAX_UPDATE_BYTES, decode_update, encode_update


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
