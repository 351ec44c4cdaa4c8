"""The content hash that names a model version in train messages and downlink deltas.

The coordinator sends it as `fedge.base-version` (so a delta is only ever
added to the model it was taken against) and as the downlink's anchor and
target versions; the device computes the same hash to check the model it
rebuilt. Both sides call this one function, so they cannot drift apart.
It is not the model store's version (SHA-256 of the snapshot file, see
`fedge.common.snapshot`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

#: 128 bits of SHA-256 name a model version: collisions are out of reach, and every
#: update carries it, so the other half would cost 32 bytes of uplink each time
VERSION_HEX_CHARS = 32


def model_version(arrays: Mapping[str, np.ndarray]) -> str:
    """Content hash of a model (names, dtypes, shapes, bytes, in order), 32 hex characters."""
    h = hashlib.sha256()
    for name, a in arrays.items():
        a = np.asarray(a)
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes(order="C") if not a.flags.c_contiguous else a.data)
    return h.hexdigest()[:VERSION_HEX_CHARS]
