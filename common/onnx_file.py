"""The seal of an ONNX export: a content hash a device checks with the standard library alone.

An ONNX export is a plain `onnx.ModelProto` (ONNX Runtime, ONNX Runtime Mobile
and any ONNX tool load it as is) whose last bytes are one more
`metadata_props` entry, `content-sha256`: the SHA-256 of every byte before it.
Protobuf concatenates repeated fields, so appending the entry is the same as
adding it last, and a device verifies the file without the `onnx` package
(which a device that only predicts does not install): the last 84 bytes must
be exactly that entry, and the hash of the rest must match it. Everything
else the device needs (task, input shape, labels, source version) is metadata
inside the hashed part, read through ONNX Runtime. As for `.pb` exports, the
hash detects damage; it does not authenticate who wrote the file.
"""

from __future__ import annotations

import hashlib
import re

ONNX_FORMATS: tuple[str, ...] = ("onnx", "onnx-int8")
"""`fedge export --format` names: fp32 weights, or int8 weights with DequantizeLinear."""
ONNX_SOURCE_FORMAT = {"onnx": "fp32", "onnx-int8": "int8"}
"""The fedge export each ONNX format is built from (its weights, bit for bit)."""
ONNX_FILE_FORMAT = "fedge.onnx.v1"
"""Metadata `file-format` of an ONNX export."""

K_HASH = "content-sha256"
_TAG_METADATA_PROPS = 0x72  # ModelProto field 14, length-delimited
_KEY = K_HASH.encode()
_ENTRY_LEN = 2 + len(_KEY) + 2 + 64  # StringStringEntryProto {key = 1, value = 2}
SEAL_LEN = 2 + _ENTRY_LEN
_HEX = re.compile(rb"[0-9a-f]{64}")


class OnnxFileError(ValueError):
    """An ONNX export is refused; `reason` is a stable code, `detail` says what disagreed."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def _entry(digest_hex: bytes) -> bytes:
    return (
        bytes([_TAG_METADATA_PROPS, _ENTRY_LEN, 0x0A, len(_KEY)])
        + _KEY
        + bytes([0x12, 64])
        + digest_hex
    )


def seal(body: bytes) -> bytes:
    """`body` (a serialized ModelProto without the hash) with its content-sha256 entry appended."""
    return body + _entry(hashlib.sha256(body).hexdigest().encode())


def check_seal(data: bytes | bytearray | memoryview) -> str:
    """The content hash of a sealed ONNX export; raises `OnnxFileError` if it does not hold."""
    view = memoryview(data)
    if view.nbytes <= SEAL_LEN:
        raise OnnxFileError("malformed", f"{view.nbytes} bytes: too short for a fedge ONNX export")
    tail = bytes(view[-SEAL_LEN:])
    stated = tail[-64:]
    if not _HEX.fullmatch(stated) or tail != _entry(stated):
        raise OnnxFileError(
            "missing_metadata", "no content-sha256 entry at the end: not a fedge ONNX export"
        )
    if hashlib.sha256(view[:-SEAL_LEN]).hexdigest().encode() != stated:
        raise OnnxFileError("hash_mismatch", "the file's bytes differ from its content hash")
    return stated.decode()


def is_onnx_path(path: str) -> bool:
    """Whether a file name says ONNX (`.onnx`), which `fedge predict` runs with ONNX Runtime."""
    return str(path).lower().endswith(".onnx")
