"""Model versions as content-addressed files: atomic, verified, kill-safe."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedge.common.errors import UpdateRejected
from fedge.common.snapshot import arrays_to_snapshot, snapshot_to_arrays, tensors_version
from fedge.server.model_store import (
    ModelCorrupt,
    ModelNotFound,
    ModelStore,
    ModelStoreError,
)
from fedge.v1 import snapshot_pb2, tensor_pb2


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "fc.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "fc.bias": rng.standard_normal(4).astype(np.float32),
        "bn.num_batches_tracked": np.array(5, dtype=np.int64),
    }


def test_put_get_roundtrip_and_naming(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    data = b"snapshot bytes"
    version = store.put(data)
    assert version == hashlib.sha256(data).hexdigest()
    assert store.path(version).name == f"{version}.pb"
    assert store.get(version) == data
    assert store.list() == [version]
    assert store.size(version) == len(data)
    assert store.put(data) == version  # idempotent
    assert store.list() == [version]
    assert [p.name for p in store.folder.iterdir()] == [f"{version}.pb"]


def test_tampered_or_truncated_file_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    version = store.put(b"x" * 1000)
    path = store.path(version)
    raw = bytearray(path.read_bytes())
    raw[10] ^= 1
    path.write_bytes(raw)
    with pytest.raises(ModelCorrupt) as e:
        store.get(version)
    assert e.value.reason == "corrupt"
    with pytest.raises(ModelCorrupt):
        store.verify(version)
    path.write_bytes(b"x" * 999)
    with pytest.raises(ModelCorrupt):
        store.get(version)
    # putting the right bytes again repairs the file
    assert store.put(b"x" * 1000) == version
    assert store.get(version) == b"x" * 1000


def test_missing_and_malformed_versions(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(ModelNotFound):
        store.get("f" * 64)
    with pytest.raises(KeyError):  # ModelNotFound is also a KeyError
        store.get("f" * 64)
    for bad in ("../../etc/passwd", "F" * 64, "f" * 63, ""):
        with pytest.raises(ModelStoreError) as e:
            store.get(bad)
        assert e.value.reason == "bad_version"


KILLED_WRITER = r"""
import os, signal, sys
from fedge.server.model_store import ModelStore
store = ModelStore(sys.argv[1])
def stall(src, dst):
    # the temp file is written and fsynced; die before the rename
    print("READY", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = stall
store.put(os.urandom(1 << 20))
"""


def test_kill_9_mid_write_leaves_no_version_and_temp_is_cleaned(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    keep = ModelStore(folder).put(b"older version")
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL and "READY" in proc.stdout
    leftovers = [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == 1 << 20
    store = ModelStore(folder)  # a restart
    assert store.removed_temp_files == 1
    assert sorted(p.name for p in folder.iterdir()) == [f"{keep}.pb"]
    assert store.list() == [keep]
    assert store.get(keep) == b"older version"


def test_written_file_is_complete_before_it_is_visible(tmp_path: Path, monkeypatch) -> None:
    """The rename happens only after the data was fsynced to the temp file."""
    store = ModelStore(tmp_path)
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1]
    )
    store.put(b"payload")
    assert events == ["fsync", "replace", "fsync"]  # file, rename, then the folder


def test_snapshot_arrays_roundtrip(tmp_path: Path) -> None:
    arrays = _arrays()
    store = ModelStore(tmp_path)
    snap = arrays_to_snapshot(arrays, {"task": "digits", "input_shape": "64"})
    version = store.put(snap.SerializeToString(deterministic=True))
    back, meta = snapshot_to_arrays(store.get(version))
    assert list(back) == list(arrays)
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype and np.array_equal(back[name], a)
    assert back["fc.weight"].flags.writeable
    assert meta == {"task": "digits", "input_shape": "64"}
    snap = snapshot_pb2.ModelSnapshot.FromString(store.get(version))
    dense = snap.tensors[0].dense
    assert dense.dtype == tensor_pb2.DTYPE_FLOAT32
    assert dense.data == arrays["fc.weight"].astype("<f4").tobytes()  # fp32 little-endian
    assert snap.version == tensors_version(snap)


def test_snapshot_big_endian_input_is_stored_little_endian() -> None:
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    snap = arrays_to_snapshot({"w": a})
    assert snap.tensors[0].dense.data == np.arange(6, dtype="<f4").tobytes()
    back, _ = snapshot_to_arrays(snap.SerializeToString())
    assert np.array_equal(back["w"], a)


def test_snapshot_validation_raises_typed_errors() -> None:
    arrays = _arrays()
    good = arrays_to_snapshot(arrays)
    expected = {n: (a.shape, a.dtype) for n, a in arrays.items()}
    snapshot_to_arrays(good.SerializeToString(), expected=expected)

    def reason(data: bytes, **kw) -> str:
        with pytest.raises(UpdateRejected) as e:
            snapshot_to_arrays(data, **kw)
        return e.value.reason

    assert reason(b"\xff\xff\xff") == "malformed"
    assert reason(good.SerializeToString(), max_bytes=10) == "too_large"

    short = snapshot_pb2.ModelSnapshot()
    short.CopyFrom(good)
    short.tensors[0].dense.data = short.tensors[0].dense.data[:-1]
    short.version = tensors_version(short)
    assert reason(short.SerializeToString()) == "bad_length"

    tampered = snapshot_pb2.ModelSnapshot()
    tampered.CopyFrom(good)
    tampered.tensors[1].dense.data = bytes(16)
    assert reason(tampered.SerializeToString()) == "hash_mismatch"

    twice = arrays_to_snapshot({"a": np.zeros(2, np.float32)})
    twice.tensors.append(twice.tensors[0])
    twice.version = ""
    assert reason(twice.SerializeToString()) == "duplicate_tensor"

    bad_dtype = arrays_to_snapshot({"a": np.zeros(2, np.float32)})
    bad_dtype.tensors[0].dense.dtype = 99
    bad_dtype.version = ""
    assert reason(bad_dtype.SerializeToString()) == "bad_dtype"

    nan = arrays_to_snapshot({"a": np.zeros(2, np.float32)})
    nan.tensors[0].dense.data = np.array([0, np.nan], "<f4").tobytes()
    nan.version = ""
    assert reason(nan.SerializeToString()) == "non_finite"

    empty_kind = snapshot_pb2.ModelSnapshot(tensors=[tensor_pb2.EncodedTensor()])
    assert reason(empty_kind.SerializeToString()) == "malformed"

    wrong_shape = {**expected, "fc.bias": ((5,), np.float32)}
    assert reason(good.SerializeToString(), expected=wrong_shape) == "shape_mismatch"
    assert reason(good.SerializeToString(), expected={"x": ((1,), np.float32)}) in {
        "missing_tensor",
        "unexpected_tensor",
    }
    with pytest.raises(UpdateRejected) as e:
        arrays_to_snapshot({"o": np.array(["x"], dtype=object)})
    assert e.value.reason == "unsupported_tensor"


def test_quantized_snapshot_for_exports() -> None:
    arrays = {"w": np.linspace(-1, 1, 4096, dtype=np.float32).reshape(64, 64)}
    dense = arrays_to_snapshot(arrays)
    int8 = arrays_to_snapshot(arrays, {"format": "int8"}, codec="int8")
    assert int8.tensors[0].WhichOneof("kind") == "quantized"
    assert int8.ByteSize() < dense.ByteSize() / 3
    back, meta = snapshot_to_arrays(int8.SerializeToString())
    assert meta == {"format": "int8"} and back["w"].dtype == np.float32
    assert np.abs(back["w"] - arrays["w"]).max() < 1 / 127 + 1e-6
