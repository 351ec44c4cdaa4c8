"""Global model versions as files named by their content hash.

A version is the SHA-256 hex of the serialized `fedge.v1.ModelSnapshot`, and
the file `<version>.pb` holds exactly those bytes. Content addressing makes a
write idempotent and a read self-checking: `get` re-hashes and refuses a
tampered or truncated file. Writes are atomic (temporary file in the same
folder, fsync, rename, fsync of the folder), so after `kill -9` or a power cut
a version either exists whole or not at all; leftover temporary files are
removed when the store is opened. One coordinator owns one folder.

Which version is current, and its lineage, live in SQLite (server/store.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from fedge.common.atomic_file import atomic_write
from fedge.common.chunking import is_sha256_hex, sha256_file
from fedge.common.errors import ReasonError

__all__ = ["ModelCorrupt", "ModelNotFound", "ModelStore", "ModelStoreError"]

SUFFIX = ".pb"
TEMP_PREFIX = ".tmp-"


class ModelStoreError(ReasonError):
    """A model version could not be read or written; `reason` is a stable code."""

    what = "model store"


class ModelNotFound(ModelStoreError, KeyError):
    """No file for this version."""

    def __init__(self, version: str) -> None:
        super().__init__("not_found", version)

    def __str__(self) -> str:
        return Exception.__str__(self)


class ModelCorrupt(ModelStoreError):
    """The file's bytes no longer hash to its version (tampered or truncated)."""

    def __init__(self, version: str, actual: str) -> None:
        super().__init__("corrupt", f"{version} hashes to {actual}")


class ModelStore:
    """A folder of model snapshot files named `<sha256>.pb`."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.removed_temp_files = self._remove_temp_files()

    def put(self, snapshot_bytes: bytes | bytearray | memoryview) -> str:
        """Store the bytes atomically and return their version (SHA-256 hex).

        Storing bytes that are already present rewrites nothing, unless the
        existing file has been damaged, in which case it is replaced.
        """
        version = hashlib.sha256(snapshot_bytes).hexdigest()
        target = self.path(version)
        if target.exists() and sha256_file(target) == version:
            return version
        atomic_write(target, snapshot_bytes, 0o644, prefix=TEMP_PREFIX)
        return version

    def get(self, version: str) -> bytes:
        """The snapshot bytes of `version`, verified against the hash (ModelCorrupt if not)."""
        path = self.path(version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModelNotFound(version) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != version:
            raise ModelCorrupt(version, actual)
        return data

    def verify(self, version: str) -> None:
        """Re-hash the file without loading it whole; ModelNotFound / ModelCorrupt on failure."""
        path = self.path(version)
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            raise ModelNotFound(version) from None
        if actual != version:
            raise ModelCorrupt(version, actual)

    def list(self) -> list[str]:
        """Stored versions, oldest file first (lineage and `current` are in SQLite)."""
        found = []
        for p in self.folder.iterdir():
            if p.suffix == SUFFIX and is_sha256_hex(p.stem) and p.is_file():
                found.append((p.stat().st_mtime_ns, p.stem))
        return [v for _, v in sorted(found)]

    def size(self, version: str) -> int:
        """Size of the stored snapshot in bytes (ModelNotFound if absent)."""
        try:
            return self.path(version).stat().st_size
        except FileNotFoundError:
            raise ModelNotFound(version) from None

    def path(self, version: str) -> Path:
        """File path of `version`; refuses anything but a 64-digit hex (no path tricks)."""
        if not is_sha256_hex(version):
            raise ModelStoreError("bad_version", repr(version)[:80])
        return self.folder / f"{version}{SUFFIX}"

    def _remove_temp_files(self) -> int:
        """Delete temporary files a killed writer left behind; return how many."""
        removed = 0
        for p in self.folder.glob(f"{TEMP_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed += 1
        return removed


