"""The process's malloc policy, in one place (glibc only; a no-op elsewhere).

A process picks one of two policies:

- **Speed** (`tune_malloc`; the default, applied lazily by the codec when it
  first handles a large payload). Encoding a 10M-float update makes ~60 MB of
  short-lived buffers (quantized values, protobuf's copies, the serialized
  bytes). By default glibc returns blocks above its mmap threshold to the
  kernel on free and trims the heap top, so every round pays first-touch page
  faults again: measured here as about half the CPU time of an int8 encode.
  Raising the mmap threshold to glibc's maximum (32 MiB) and the trim threshold
  to 128 MiB keeps those pages for reuse, at the cost of up to 128 MiB of freed
  heap staying mapped. ``FEDGE_MALLOC_TUNING=0`` leaves the allocator alone.
- **Memory** (`limit_heap_growth`; edge devices, called once, early). On a
  device memory comes first: model-sized buffers get their own mappings and
  go back to the OS on free, arenas are capped, and the speed policy is turned
  off (``FEDGE_MALLOC_TUNING=0`` unless the user chose). `release_memory`
  hands freed heap back after each task.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from collections.abc import Callable
from threading import Lock

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20
# payloads smaller than this do not benefit enough to touch process settings
LARGE_BYTES = 4 << 20

_result: bool | None = None
_lock = Lock()


def _glibc() -> ctypes.CDLL | None:
    """glibc, or None on another platform or libc (musl has no mallopt to speak of)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _mallopt() -> Callable[[int, int], int] | None:
    libc = _glibc()
    try:
        mallopt = libc.mallopt if libc is not None else None
    except AttributeError:  # a libc.so.6 without mallopt
        return None
    if mallopt is not None:
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt


def tune_malloc() -> bool:
    """The speed policy: apply it once; True if glibc accepted it."""
    global _result
    with _lock:
        if _result is None:
            _result = _apply_speed()
        return _result


def _apply_speed() -> bool:
    if os.environ.get("FEDGE_MALLOC_TUNING", "1") == "0":
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok


def note_payload(nbytes: int) -> None:
    """Tune on the first payload large enough to matter."""
    if _result is None and nbytes >= LARGE_BYTES:
        tune_malloc()


def limit_heap_growth(mmap_threshold: int = 256 << 10, arenas: int = 2) -> bool:
    """The memory policy: keep a device's heap from holding on to freed memory.

    By default glibc raises its mmap threshold after the first large free, so
    later model-sized buffers land on the heap and are never returned to the
    OS; pinning the threshold keeps them in their own mappings. Arenas are
    capped because gRPC's and the worker's threads would each get one.
    Measured on the CNN task: about 15 MiB less at the first round's peak,
    35 MiB less from round 2 on. Returns whether the settings were applied.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    os.environ.setdefault("FEDGE_MALLOC_TUNING", "0")
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, int(mmap_threshold)) == 1 and ok
    return mallopt(_M_ARENA_MAX, int(arenas)) == 1 and ok


def release_memory() -> None:
    """Collect cycles and hand freed heap back to the OS (glibc): a device waits for
    its next round with the memory it needs, not its training peak."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)
