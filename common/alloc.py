"""Let glibc reuse large freed buffers instead of handing them back to the kernel.

Encoding a 10M-float update makes ~60 MB of short-lived buffers (quantized
values, protobuf's copies, the serialized bytes). By default glibc returns
blocks above its mmap threshold to the kernel on free and trims the heap top,
so every round pays first-touch page faults again: measured here as about half
the CPU time of an int8 encode. Raising the mmap threshold to glibc's maximum
(32 MiB) and the trim threshold to 128 MiB keeps those pages for reuse.

The codec applies this once, lazily, when it first handles a large payload, so
devices and the coordinator run as fast as the benchmark. It is process-wide:
the cost is that up to 128 MiB of freed heap stays mapped. Set
``FEDGE_MALLOC_TUNING=0`` to leave the allocator alone. No-op off glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys
from threading import Lock

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20
# payloads smaller than this do not benefit enough to touch process settings
LARGE_BYTES = 4 << 20

_result: bool | None = None
_lock = Lock()


def tune_malloc() -> bool:
    """Apply the settings once; True if glibc accepted them."""
    global _result
    with _lock:
        if _result is None:
            _result = _apply()
        return _result


def _apply() -> bool:
    if os.environ.get("FEDGE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok


def note_payload(nbytes: int) -> None:
    """Tune on the first payload large enough to matter."""
    if _result is None and nbytes >= LARGE_BYTES:
        tune_malloc()
