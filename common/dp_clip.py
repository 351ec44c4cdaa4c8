"""L2 clipping of a whole model update: the one bound both sides of DP-FedAvg apply.

User-level DP-FedAvg bounds each device's influence on a round by clipping its
update, all tensors together, to L2 norm C (docs/privacy.md). The device clips
what it sends before quantizing; the coordinator clips again what it decoded,
so the bound holds whatever a device sends. Both call `clip_to_norm`, so the
two sides cannot disagree on what "norm" means (every tensor, integer buffers
included, in float64).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all tensors together, accumulated in float64."""
    total = 0.0
    for a in arrays.values():
        flat = np.ravel(a)
        total += float(np.dot(flat, flat)) if flat.dtype == np.float64 else float(
            np.sum(np.square(flat, dtype=np.float64)))
    return math.sqrt(total)


def clip_factor(norm: float, clip: float) -> float:
    """min(1, C / norm): what an update of norm `norm` is scaled by."""
    if clip <= 0 or not math.isfinite(clip):
        raise ValueError(f"the clipping norm must be a positive finite number, got {clip}")
    return 1.0 if norm <= clip else clip / norm


def clip_to_norm(
    arrays: Mapping[str, np.ndarray], clip: float, *, keep_dtype: bool = False
) -> tuple[dict[str, np.ndarray], float]:
    """(the update scaled to L2 norm at most `clip`, its norm before clipping).

    Float tensors keep their dtype (scaled in place when writable: the caller's
    copy is consumed, as the compression mod's delta is); integer tensors
    become float64, since a scaled integer delta is no longer an integer
    (`keep_dtype`: rounded back to their dtype, for a codec that expects it;
    the coordinator's own clip then absorbs the rounding).
    A float32 rounding can leave the result a hair above `clip`; the factor is
    shrunk by a few ulps so it never does.
    """
    norm = l2_norm(arrays)
    factor = clip_factor(norm, clip)
    if factor >= 1.0:
        return dict(arrays), norm
    factor *= 1.0 - 1e-6  # float32 rounding must not push the result above C
    out: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        arr = np.asarray(a)
        if arr.dtype.kind == "f" and arr.flags.writeable and arr.ndim > 0:
            out[name] = np.multiply(arr, arr.dtype.type(factor), out=arr)
        elif arr.dtype.kind == "f":
            out[name] = (arr * arr.dtype.type(factor)).astype(arr.dtype)
        elif keep_dtype:
            out[name] = np.rint(arr.astype(np.float64) * factor).astype(arr.dtype)
        else:
            out[name] = arr.astype(np.float64) * factor
    return out, norm
