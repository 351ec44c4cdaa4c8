"""Crash-safe file writes: a crash leaves either the old file or the new one, never half.

One implementation for every file fedge persists (keys, certificates, device
state, models): write a temporary file in the same folder (created with the
target's mode, O_EXCL and O_NOFOLLOW, so it is never more open than the final
file and no one else's file or link is written through), fsync it, rename it
over the target, then fsync the folder so the rename itself is durable.
"""

from __future__ import annotations

import contextlib
import os
import secrets
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
    umask_narrows: bool = False,
) -> None:
    """Write `data` to `path` atomically and durably, leaving it with permissions `mode`.

    `prefix` names the temporary file (a store that sweeps leftovers after a
    crash globs for it); `make_parents` creates missing folders first. With
    `umask_narrows` the process umask may narrow `mode` and nothing is chmod-ed
    (enrollment's key files); otherwise the mode is set exactly.
    """
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{prefix}{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if not umask_narrows:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
