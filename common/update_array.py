"""How a serialized `ModelUpdate` rides in a Flower reply: one raw-bytes `Array`.

Both the compression mod (device) and the strategy wrapper (coordinator) use
this, so the layout is written once (its key and `stype` are in
`fedge.common.contract`). The bytes travel as they are
(`stype` names the protobuf message), not as a `.npy` file: a numpy header
would add 128 bytes to every update and a copy on each side.
"""

from __future__ import annotations

from flwr.app import Array

from fedge.common.contract import UPDATE_KEY, UPDATE_STYPE
from fedge.common.errors import UpdateRejected


def pack_update(serialized: bytes) -> Array:
    """A Flower `Array` holding a serialized `ModelUpdate`."""
    return Array(dtype="uint8", shape=(len(serialized),), stype=UPDATE_STYPE, data=serialized)


def packed_bytes(array: Array, max_bytes: int) -> bytes:
    """The update bytes of a packed `Array`, after checking its layout and size."""
    if array.stype != UPDATE_STYPE:
        raise UpdateRejected("malformed", f"{UPDATE_KEY}: stype {array.stype!r}")
    if array.dtype != "uint8" or len(array.shape) != 1 or array.shape[0] != len(array.data):
        raise UpdateRejected(
            "malformed",
            f"{UPDATE_KEY}: {array.dtype} {tuple(array.shape)} for {len(array.data)} bytes",
        )
    if len(array.data) > max_bytes:
        raise UpdateRejected("too_large", f"{len(array.data)} bytes > {max_bytes}")
    return array.data
