"""Split payloads into chunks and put them back together, checking every byte.

Tasks, results and models cross the coordinator's gRPC service as a header
(total size, SHA-256) followed by chunks with offsets, so no single gRPC
message comes near the 4 MiB default limit and an interrupted transfer resumes
from the bytes already held. Both sides use this module, so the rules (strictly
in order, no gaps, no overlap, nothing past the declared size or the cap, hash
verified at the end) are written once.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from fedge.common.errors import ReasonError

DEFAULT_CHUNK_SIZE = 1 << 20
"""1 MiB: a quarter of gRPC's default message limit, and small for a device's memory."""

MAX_CHUNK_SIZE = 2 << 20
"""2 MiB: the largest chunk either side sends or accepts, leaving headroom under 4 MiB."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_READ_BLOCK = 1 << 20

Buffer = bytes | bytearray | memoryview


class ChunkError(ReasonError, ValueError):
    """A chunked transfer broke a rule.

    `reason` is a short stable code: "bad_header", "bad_chunk_size", "over_cap",
    "empty_chunk", "chunk_too_large", "overlap", "out_of_order", "over_total",
    "incomplete", "hash_mismatch". `detail` says what exactly disagreed.
    """

    what = "chunk error"


STATUS_BY_REASON: dict[str, str] = {
    "bad_header": "INVALID_ARGUMENT",
    "bad_chunk_size": "INVALID_ARGUMENT",
    "empty_chunk": "INVALID_ARGUMENT",
    "over_cap": "RESOURCE_EXHAUSTED",
    "chunk_too_large": "RESOURCE_EXHAUSTED",
    "overlap": "OUT_OF_RANGE",
    "out_of_order": "OUT_OF_RANGE",
    "over_total": "OUT_OF_RANGE",
    "incomplete": "ABORTED",
    "hash_mismatch": "DATA_LOSS",
}
"""gRPC status code name for each ChunkError reason (docs/coordinator.md says why).

Names, not `grpc.StatusCode`s, so this module stays free of gRPC:
`grpc.StatusCode[STATUS_BY_REASON[err.reason]]`.
"""


def check_chunk_size(chunk_size: int) -> int:
    """Return `chunk_size` if it is in 1..MAX_CHUNK_SIZE, else raise ChunkError."""
    if not isinstance(chunk_size, int) or not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ChunkError("bad_chunk_size", f"{chunk_size!r} not in 1..{MAX_CHUNK_SIZE}")
    return chunk_size


def iter_chunks(
    data: Buffer, chunk_size: int = DEFAULT_CHUNK_SIZE, *, start: int = 0
) -> Iterator[tuple[int, memoryview]]:
    """Yield (offset, view) slices of `data` from `start`, without copying the data.

    `start` lets a sender resume at the offset the receiver already holds.
    """
    check_chunk_size(chunk_size)
    view = memoryview(data).cast("B")
    if not 0 <= start <= len(view):
        raise ChunkError("out_of_order", f"start {start} outside 0..{len(view)}")
    for offset in range(start, len(view), chunk_size):
        yield offset, view[offset : offset + chunk_size]


def iter_file_chunks(
    path: str | os.PathLike[str], chunk_size: int = DEFAULT_CHUNK_SIZE, *, start: int = 0
) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, bytes) chunks of a file from `start`, reading one chunk at a time.

    For payloads kept on disk (model versions, results queued for upload), so
    the sender never holds the whole payload in memory.
    """
    check_chunk_size(chunk_size)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not 0 <= start <= size:
            raise ChunkError("out_of_order", f"start {start} outside 0..{size}")
        f.seek(start)
        offset = start
        while block := f.read(chunk_size):
            yield offset, block
            offset += len(block)


def sha256_hex(data: Buffer) -> str:
    """Lowercase hex SHA-256, the content hash used in every fedge header."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Lowercase hex SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
    return h.hexdigest()


def is_sha256_hex(value: str) -> bool:
    """True for a lowercase 64-digit hex string (a content hash, safe as a file name)."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


class Assembler:
    """Reassembles one payload in memory from in-order chunks and verifies its hash.

    The receiver creates it from the header, feeds `add(offset, data)` for each
    chunk and calls `finish()` once the stream ends. Any broken rule raises
    `ChunkError` and leaves the bytes held so far untouched, so the caller can
    report `offset` and let the sender resume.
    """

    def __init__(
        self,
        total_size: int,
        sha256: str,
        *,
        max_total: int,
        max_chunk: int = MAX_CHUNK_SIZE,
    ) -> None:
        _check_header(total_size, sha256, max_total)
        self.total_size = total_size
        self.sha256 = sha256
        self.max_chunk = check_chunk_size(max_chunk)
        self._offset = 0
        self._hash = hashlib.sha256()
        self._parts: list[bytes] = []

    @property
    def offset(self) -> int:
        """Bytes held: where the next chunk must start."""
        return self._offset

    @property
    def complete(self) -> bool:
        """True once every declared byte is held (the hash is checked by `finish`)."""
        return self._offset == self.total_size

    def add(self, offset: int, data: Buffer) -> int:
        """Accept the chunk at `offset` and return the new offset held."""
        size = memoryview(data).nbytes
        if size == 0:
            raise ChunkError("empty_chunk", f"at offset {offset}")
        if size > self.max_chunk:
            raise ChunkError("chunk_too_large", f"{size} bytes > {self.max_chunk}")
        if offset < self._offset:
            raise ChunkError("overlap", f"chunk at {offset}, {self._offset} bytes already held")
        if offset > self._offset:
            raise ChunkError("out_of_order", f"chunk at {offset}, expected {self._offset}")
        if offset + size > self.total_size:
            raise ChunkError(
                "over_total", f"chunk ends at {offset + size}, total is {self.total_size}"
            )
        self._write(data)
        self._hash.update(data)
        self._offset += size
        return self._offset

    def _check_done(self) -> None:
        if self._offset != self.total_size:
            raise ChunkError("incomplete", f"{self._offset} of {self.total_size} bytes held")
        digest = self._hash.hexdigest()
        if digest != self.sha256:
            raise ChunkError("hash_mismatch", f"got {digest}, header says {self.sha256}")

    def _write(self, data: Buffer) -> None:
        self._parts.append(data if isinstance(data, bytes) else bytes(data))

    def finish(self) -> bytes:
        """Verify size and hash and return the payload (ChunkError otherwise)."""
        self._check_done()
        payload = b"".join(self._parts)
        self._parts = [payload]
        return payload


class FileAssembler(Assembler):
    """Reassembles one payload into a file, so a partial upload survives a restart.

    `open` resumes a file left by an earlier stream: it trusts at most the
    bytes the caller recorded as held (and at most what the file has), cuts
    anything after them, and re-hashes the prefix, since a hash state cannot be
    saved. Call `flush()` before recording the offset elsewhere.
    """

    def __init__(
        self,
        f: BinaryIO,
        path: Path,
        total_size: int,
        sha256: str,
        *,
        max_total: int,
        max_chunk: int = MAX_CHUNK_SIZE,
    ) -> None:
        super().__init__(total_size, sha256, max_total=max_total, max_chunk=max_chunk)
        self.path = path
        self._f = f

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        total_size: int,
        sha256: str,
        *,
        max_total: int,
        held: int | None = None,
        max_chunk: int = MAX_CHUNK_SIZE,
    ) -> FileAssembler:
        """Create or resume the partial file at `path`; `held` caps the bytes trusted."""
        _check_header(total_size, sha256, max_total)
        path = Path(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        f = os.fdopen(fd, "r+b")
        try:
            size = os.fstat(fd).st_size
            keep = min(size, total_size if held is None else max(0, min(held, total_size)))
            f.truncate(keep)
            asm = cls(f, path, total_size, sha256, max_total=max_total, max_chunk=max_chunk)
            f.seek(0)
            remaining = keep
            while remaining:
                block = f.read(min(_READ_BLOCK, remaining))
                if not block:
                    break
                asm._hash.update(block)
                remaining -= len(block)
            asm._offset = keep - remaining
            f.seek(asm._offset)
            return asm
        except BaseException:
            f.close()
            raise

    def _write(self, data: Buffer) -> None:
        self._f.write(data)

    def flush(self) -> int:
        """Make the bytes held durable (flush and fsync) and return their count."""
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._offset

    def close(self) -> None:
        """Close the file, keeping what it holds for a later resume."""
        self._f.close()

    def finish(self) -> bytes:
        """Verify size and hash, close, and return the payload read back from the file."""
        path = self.finish_to_path()
        return path.read_bytes()

    def finish_to_path(self) -> Path:
        """Flush, verify size and hash, close, and return the file's path.

        The file is closed whether or not the check passes; on ChunkError the
        caller decides whether to delete it (hash_mismatch) or keep it (incomplete).
        """
        try:
            self.flush()
            self._check_done()
        finally:
            self._f.close()
        return self.path

    def __enter__(self) -> FileAssembler:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._f.closed:
            self._f.close()


def _check_header(total_size: int, sha256: str, max_total: int) -> None:
    if not isinstance(total_size, int) or total_size < 0:
        raise ChunkError("bad_header", f"total size {total_size!r}")
    if not is_sha256_hex(sha256):
        raise ChunkError("bad_header", "sha256 must be 64 lowercase hex digits")
    if total_size > max_total:
        raise ChunkError("over_cap", f"total size {total_size} > cap {max_total}")
