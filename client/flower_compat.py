"""The device's only door into Flower internals (flwr 1.42).

A device never imports the coordinator's code. What both sides need (Flower
messages and contexts as protobuf bytes, error replies) lives in
`fedge.common.flower_compat`, which the edge runtime uses to carry Flower
messages inside fedge's gRPC envelopes and to keep `context.state` on disk;
this file holds what only a device uses. A Flower upgrade touches the three
compat modules and nothing else.

Device-only internals from flwr 1.42: `flwr.clientapp.typing.ClientAppCallable`
and `Mod`, the signatures of a ClientApp and of a client mod (not exported by
`flwr.clientapp`).
"""

from __future__ import annotations

from flwr.clientapp.typing import ClientAppCallable, Mod

__all__ = ["ClientAppCallable", "Mod"]
