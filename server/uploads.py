"""Where a result upload's bytes live while they arrive: memory, or `<uploads>/<task_id>.part`.

docs/coordinator.md ("Resumption") keeps a partial upload as a file with its
progress in SQLite, so a device whose link drops resumes where it stopped.
Writing every result through a file costs a write, a read and a delete per
result (on this VM's disk about 6 ms for a 1.7 MB update, three times the
hashing), although almost every upload arrives whole in one stream. So:

- a **fresh, small** upload (nothing held yet, at most `memory_limit` bytes,
  within the servicer's memory budget) is assembled in memory; if its stream
  breaks, the bytes received are written to the `.part` file and fsynced
  before the progress is recorded, which is exactly the state a file upload
  would have left;
- a **resumed or large** upload goes to the file from the start, fsynced
  every few MiB and when the stream breaks (`checkpoint` / `save_partial`).

Either way a whole upload is verified against its SHA-256 before anything
reads it. A coordinator killed mid-stream loses an in-memory partial, which
costs nothing: after a restart the round is re-run and its old tasks expire.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedge.common.chunking import MAX_CHUNK_SIZE, Assembler, FileAssembler


class MemoryUpload(Assembler):
    """An upload held in memory; `save_partial` spills what arrived to its `.part` file."""

    def __init__(self, path: Path, total_size: int, sha256: str, *, max_total: int) -> None:
        super().__init__(total_size, sha256, max_total=max_total, max_chunk=MAX_CHUNK_SIZE)
        self.path = path

    def checkpoint(self) -> int | None:
        """Nothing is durable until the stream ends; None: no progress to record."""
        return None

    def save_partial(self) -> int:
        """Write the bytes held to the `.part` file (fsync) and return their count."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            for part in self._parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        return self.offset

    def payload(self) -> bytes:
        """The verified payload (ChunkError on a size or hash mismatch)."""
        return self.finish()

    def close(self) -> None:
        self._parts.clear()

    def discard(self) -> None:
        self._parts.clear()
        self.path.unlink(missing_ok=True)


class FileUpload(FileAssembler):
    """An upload written to its `.part` file as it arrives (resumable after any break)."""

    def checkpoint(self) -> int | None:
        """fsync and return the bytes now durable (record them in the store after this)."""
        return self.flush()

    def save_partial(self) -> int:
        return self.flush()

    def payload(self) -> bytes:
        """Verify size and hash (no fsync: a whole result need not survive a crash), read it."""
        try:
            self._f.flush()
            self._check_done()
        finally:
            self._f.close()
        return self.path.read_bytes()

    def discard(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.path.unlink(missing_ok=True)


Upload = MemoryUpload | FileUpload


def open_upload(
    path: Path,
    total_size: int,
    sha256: str,
    *,
    max_total: int,
    held: int,
    in_memory: bool,
) -> Upload:
    """A memory upload for a fresh one that fits (`in_memory`), else the `.part` file.

    Raises ChunkError for a header the rules refuse (size over the cap, bad hash).
    """
    if in_memory and held == 0:
        path.unlink(missing_ok=True)
        return MemoryUpload(path, total_size, sha256, max_total=max_total)
    return FileUpload.open(
        path, total_size, sha256, max_total=max_total, held=held, max_chunk=MAX_CHUNK_SIZE
    )
