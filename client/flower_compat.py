"""The device's only door into Flower internals (flwr 1.42).

A device never imports the coordinator's code. What both sides need (Flower
messages and contexts as protobuf bytes, error replies, message ids) lives in
`fedge.common.flower_compat` and is re-exported here; this file adds what
only a device uses, so a Flower upgrade touches the three compat modules and
nothing else. The edge runtime uses these to carry Flower messages inside
fedge's gRPC envelopes and to keep `context.state` on disk.

Device-only internals from flwr 1.42: `flwr.clientapp.typing.ClientAppCallable`
and `Mod`, the signatures of a ClientApp and of a client mod (not exported by
`flwr.clientapp`).
"""

from __future__ import annotations

from flwr.clientapp.typing import ClientAppCallable, Mod

from fedge.common.flower_compat import (
    ErrorCode,
    context_from_bytes,
    context_to_bytes,
    error_reply,
    message_from_bytes,
    message_to_bytes,
)

__all__ = [
    "ClientAppCallable",
    "ErrorCode",
    "Mod",
    "context_from_bytes",
    "context_to_bytes",
    "error_reply",
    "message_from_bytes",
    "message_to_bytes",
]
