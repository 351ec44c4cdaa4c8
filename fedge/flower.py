"""fedge for a Flower app, in two lines: the public import of compression.

    from fedge.flower import Compressed, compression_mod

    app = ClientApp(mods=[compression_mod])               # the device side
    strategy = Compressed(FedAvg(...), codec="int8")       # the ServerApp side

With user-level differential privacy (docs/privacy.md): the same mod clips what a
device sends when the server asks, and the wrapper clips again, adds the noise
and accounts epsilon:

    strategy = Compressed(FedAvg(...), codec="int8",
                          dp=DifferentialPrivacy(noise_multiplier=1.0, clip=0.5, delta=1e-3))

Each name loads its side on first use, so a device that imports
`compression_mod` never loads the coordinator's code, and a ServerApp never
loads the device's.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedge.client.compression_mod import compression_mod, make_compression_mod
    from fedge.server.compressed_strategy import CompressedStrategy as Compressed
    from fedge.server.dp import DpSettings as DifferentialPrivacy

_HOMES = {
    "compression_mod": ("fedge.client.compression_mod", "compression_mod"),
    "make_compression_mod": ("fedge.client.compression_mod", "make_compression_mod"),
    "Compressed": ("fedge.server.compressed_strategy", "CompressedStrategy"),
    "DifferentialPrivacy": ("fedge.server.dp", "DpSettings"),
}

__all__ = ["Compressed", "DifferentialPrivacy", "compression_mod", "make_compression_mod"]


def __getattr__(name: str) -> Any:
    """Import the one side a name belongs to, the first time it is asked for."""
    try:
        module, attr = _HOMES[name]
    except KeyError:
        raise AttributeError(f"module 'fedge.flower' has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), attr)
