"""fedge for a Flower app, in two lines: the public import of compression.

    from fedge.flower import Compressed, compression_mod

    app = ClientApp(mods=[compression_mod])               # the device side
    strategy = Compressed(FedAvg(...), codec="int8")       # the ServerApp side

With user-level differential privacy (docs/privacy.md): the same mod clips what a
device sends when the server asks, and the wrapper clips again, adds the noise
and accounts epsilon:

    strategy = Compressed(FedAvg(...), codec="int8",
                          dp=DifferentialPrivacy(noise_multiplier=1.0, clip=0.5, delta=1e-3))

With secure aggregation (docs/secure-aggregation.md): the coordinator learns only the
sum of the devices' quantized deltas. The secagg mod goes outermost; the strategy runs on
a grid that turns each train round into the SecAgg+ exchange (codec `none`: the masked
ring words are the compression); DP composes (noise on the unmasked sum):

    app = ClientApp(mods=[secagg_mod, compression_mod])
    secure = SecAggGrid(grid, SecAggConfig(clip=AdaptiveClip(0.05), error_feedback=True))
    Compressed(FedAvg(...), codec="none", dp=...).start(grid=secure, ...)

Each name loads its side on first use, so a device that imports
`compression_mod` never loads the coordinator's code, and a ServerApp never
loads the device's.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedge.client.compression_mod import compression_mod, make_compression_mod
    from fedge.client.secagg_device import secagg_mod
    from fedge.server.compressed_strategy import CompressedStrategy as Compressed
    from fedge.server.dp import DpSettings as DifferentialPrivacy
    from fedge.server.secagg_server import AdaptiveClip, SecAggConfig, SecAggGrid, SecAggStrategy

_HOMES = {
    "compression_mod": ("fedge.client.compression_mod", "compression_mod"),
    "make_compression_mod": ("fedge.client.compression_mod", "make_compression_mod"),
    "Compressed": ("fedge.server.compressed_strategy", "CompressedStrategy"),
    "DifferentialPrivacy": ("fedge.server.dp", "DpSettings"),
    "secagg_mod": ("fedge.client.secagg_device", "secagg_mod"),
    "AdaptiveClip": ("fedge.server.secagg_server", "AdaptiveClip"),
    "SecAggConfig": ("fedge.server.secagg_server", "SecAggConfig"),
    "SecAggGrid": ("fedge.server.secagg_server", "SecAggGrid"),
    "SecAggStrategy": ("fedge.server.secagg_server", "SecAggStrategy"),
}

__all__ = ["AdaptiveClip", "Compressed", "DifferentialPrivacy", "SecAggConfig", "SecAggGrid",
           "SecAggStrategy", "compression_mod", "make_compression_mod", "secagg_mod"]


def __getattr__(name: str) -> Any:
    """Import the one side a name belongs to, the first time it is asked for."""
    try:
        module, attr = _HOMES[name]
    except KeyError:
        raise AttributeError(f"module 'fedge.flower' has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), attr)
