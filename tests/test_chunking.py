"""Chunk splitting, reassembly rules, resumption from a partial file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from fedge.common.chunking import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    Assembler,
    ChunkError,
    FileAssembler,
    is_sha256_hex,
    iter_chunks,
    iter_file_chunks,
    sha256_file,
    sha256_hex,
)

PAYLOAD = os.urandom(10_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def _asm(total: int = len(PAYLOAD), sha: str = SHA, **kw) -> Assembler:
    kw.setdefault("max_total", 1 << 20)
    return Assembler(total, sha, **kw)


def test_defaults_stay_well_below_grpc_limit() -> None:
    assert DEFAULT_CHUNK_SIZE == 1 << 20
    assert MAX_CHUNK_SIZE <= 2 << 20 < 4 << 20


def test_iter_chunks_covers_data_without_copies() -> None:
    data = bytearray(PAYLOAD)
    chunks = list(iter_chunks(data, 4096))
    assert [o for o, _ in chunks] == [0, 4096, 8192]
    assert [len(v) for _, v in chunks] == [4096, 4096, 10_000 - 8192]
    assert b"".join(bytes(v) for _, v in chunks) == PAYLOAD
    data[0] ^= 0xFF  # views share the buffer: no copy was made
    assert chunks[0][1][0] == data[0]


def test_iter_chunks_resumes_and_validates() -> None:
    assert [o for o, _ in iter_chunks(PAYLOAD, 4096, start=5000)] == [5000, 9096]
    assert list(iter_chunks(b"", 10)) == []
    with pytest.raises(ChunkError) as e:
        list(iter_chunks(PAYLOAD, 0))
    assert e.value.reason == "bad_chunk_size"
    with pytest.raises(ChunkError):
        list(iter_chunks(PAYLOAD, MAX_CHUNK_SIZE + 1))
    with pytest.raises(ChunkError):
        list(iter_chunks(PAYLOAD, 10, start=len(PAYLOAD) + 1))


def test_iter_file_chunks(tmp_path: Path) -> None:
    p = tmp_path / "blob"
    p.write_bytes(PAYLOAD)
    chunks = list(iter_file_chunks(p, 3000, start=1000))
    assert [o for o, _ in chunks] == [1000, 4000, 7000]
    assert b"".join(c for _, c in chunks) == PAYLOAD[1000:]
    assert sha256_file(p) == SHA == sha256_hex(memoryview(PAYLOAD))


def test_roundtrip_through_assembler() -> None:
    asm = _asm()
    for off, view in iter_chunks(PAYLOAD, 777):
        assert asm.add(off, view) == off + len(view)
    assert asm.complete
    assert asm.finish() == PAYLOAD


def test_empty_payload() -> None:
    asm = _asm(0, sha256_hex(b""))
    assert asm.complete
    assert asm.finish() == b""


@pytest.mark.parametrize(
    ("offset", "size", "reason"),
    [
        (1000, 100, "out_of_order"),  # gap after 500 held
        (499, 100, "overlap"),
        (0, 100, "overlap"),
        (500, len(PAYLOAD), "over_total"),
        (500, 0, "empty_chunk"),
    ],
)
def test_assembler_rejects_bad_chunks_and_keeps_offset(offset: int, size: int, reason: str) -> None:
    asm = _asm()
    asm.add(0, PAYLOAD[:500])
    with pytest.raises(ChunkError) as e:
        asm.add(offset, b"x" * size)
    assert e.value.reason == reason
    assert asm.offset == 500  # nothing was taken from the bad chunk
    for off, view in iter_chunks(PAYLOAD, 4096, start=500):
        asm.add(off, view)
    assert asm.finish() == PAYLOAD


def test_assembler_rejects_over_cap_and_oversized_chunks() -> None:
    with pytest.raises(ChunkError) as e:
        _asm(2 << 20, max_total=1 << 20)
    assert e.value.reason == "over_cap"
    asm = _asm(max_chunk=1024)
    with pytest.raises(ChunkError) as e:
        asm.add(0, PAYLOAD[:1025])
    assert e.value.reason == "chunk_too_large"


@pytest.mark.parametrize(("total", "sha"), [(-1, SHA), (10, "abc"), (10, SHA.upper())])
def test_assembler_rejects_bad_headers(total: int, sha: str) -> None:
    with pytest.raises(ChunkError) as e:
        _asm(total, sha)
    assert e.value.reason == "bad_header"


def test_finish_checks_length_and_hash() -> None:
    asm = _asm()
    asm.add(0, PAYLOAD[:100])
    with pytest.raises(ChunkError) as e:
        asm.finish()
    assert e.value.reason == "incomplete"

    tampered = bytearray(PAYLOAD)
    tampered[5000] ^= 1
    asm = _asm()
    for off, view in iter_chunks(tampered, 4096):
        asm.add(off, view)
    with pytest.raises(ChunkError) as e:
        asm.finish()
    assert e.value.reason == "hash_mismatch"


def test_is_sha256_hex() -> None:
    assert is_sha256_hex(SHA)
    assert not is_sha256_hex("../" + SHA[3:])
    assert not is_sha256_hex(SHA + "0")


def test_file_assembler_resumes_after_interruption(tmp_path: Path) -> None:
    part = tmp_path / "upload.part"
    with FileAssembler.open(part, len(PAYLOAD), SHA, max_total=1 << 20) as asm:
        for off, view in iter_chunks(PAYLOAD[:6000], 1000):
            asm.add(off, view)
        held = asm.flush()
    assert held == 6000
    # a later write reached the file but was never recorded as held: it is cut
    with open(part, "ab") as f:
        f.write(b"garbage")
    asm = FileAssembler.open(part, len(PAYLOAD), SHA, max_total=1 << 20, held=held)
    assert asm.offset == 6000
    with pytest.raises(ChunkError) as e:
        asm.add(0, PAYLOAD[:10])
    assert e.value.reason == "overlap"
    for off, view in iter_chunks(PAYLOAD, 1000, start=asm.offset):
        asm.add(off, view)
    assert asm.finish_to_path() == part
    assert part.read_bytes() == PAYLOAD
    assert oct(part.stat().st_mode & 0o777) == "0o600"


def test_file_assembler_trusts_file_when_shorter_than_record(tmp_path: Path) -> None:
    part = tmp_path / "upload.part"
    part.write_bytes(PAYLOAD[:300])
    asm = FileAssembler.open(part, len(PAYLOAD), SHA, max_total=1 << 20, held=5000)
    assert asm.offset == 300
    for off, view in iter_chunks(PAYLOAD, 4096, start=300):
        asm.add(off, view)
    assert asm.finish() == PAYLOAD


def test_file_assembler_hash_covers_resumed_prefix(tmp_path: Path) -> None:
    part = tmp_path / "upload.part"
    bad = bytearray(PAYLOAD[:4000])
    bad[0] ^= 1  # the bytes on disk before the resume differ from the payload
    part.write_bytes(bad)
    asm = FileAssembler.open(part, len(PAYLOAD), SHA, max_total=1 << 20)
    for off, view in iter_chunks(PAYLOAD, 4096, start=asm.offset):
        asm.add(off, view)
    with pytest.raises(ChunkError) as e:
        asm.finish_to_path()
    assert e.value.reason == "hash_mismatch"


def test_every_reason_has_a_grpc_status() -> None:
    import grpc

    from fedge.common.chunking import STATUS_BY_REASON

    def reason_of(fn) -> str:
        with pytest.raises(ChunkError) as e:
            fn()
        return e.value.reason

    def held(n: int) -> Assembler:
        asm = _asm()
        if n:
            asm.add(0, PAYLOAD[:n])
        return asm

    def wrong_bytes() -> Assembler:
        asm = Assembler(1, SHA, max_total=1)
        asm.add(0, b"x")
        return asm

    seen = {
        reason_of(lambda: _asm(-1)),
        reason_of(lambda: list(iter_chunks(b"x", 0))),
        reason_of(lambda: held(0).add(0, b"")),
        reason_of(lambda: _asm(max_total=10)),
        reason_of(lambda: _asm(max_chunk=1).add(0, b"xy")),
        reason_of(lambda: held(10).add(5, b"x")),
        reason_of(lambda: held(10).add(50, b"x")),
        reason_of(lambda: held(10).add(10, b"x" * len(PAYLOAD))),
        reason_of(lambda: held(10).finish()),
        reason_of(lambda: wrong_bytes().finish()),
    }
    assert seen == set(STATUS_BY_REASON)
    for name in STATUS_BY_REASON.values():
        assert isinstance(grpc.StatusCode[name], grpc.StatusCode)
