"""fedge for a Flower app, in two lines: the public import of compression.

    from fedge.flower import Compressed, compression_mod

    app = ClientApp(mods=[compression_mod])               # the device side
    strategy = Compressed(FedAvg(...), codec="int8")       # the ServerApp side

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

_HOMES = {
    "compression_mod": ("fedge.client.compression_mod", "compression_mod"),
    "make_compression_mod": ("fedge.client.compression_mod", "make_compression_mod"),
    "Compressed": ("fedge.server.compressed_strategy", "CompressedStrategy"),
}

__all__ = ["Compressed", "compression_mod", "make_compression_mod"]


def __getattr__(name: str) -> Any:
    """Import the one side a name belongs to, the first time it is asked for."""
    try:
        module, attr = _HOMES[name]
    except KeyError:
        raise AttributeError(f"module 'fedge.flower' has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), attr)
