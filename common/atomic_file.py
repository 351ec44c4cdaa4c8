"""Crash-safe file writes: a crash leaves either the old file or the new one, never half.

One implementation for every file fedge persists (keys, certificates, device
state, models): write a temporary file in the same folder (mkstemp: created
0600 with O_EXCL, so no other user can open it meanwhile), fsync it, set its
mode, rename it over the target, then fsync the folder so the rename itself is
durable.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: the directory entry needs its own fsync)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path,
    data: bytes | bytearray | memoryview,
    mode: int = 0o600,
    *,
    prefix: str = ".tmp-",
    make_parents: bool = False,
) -> None:
    """Write `data` to `path` atomically and durably, leaving it with permissions `mode`.

    `prefix` names the temporary file (a store that sweeps leftovers after a
    crash globs for it); `make_parents` creates missing folders first.
    """
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
