"""Export files: per-channel quantization, metadata, determinism, and refusing damage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedge.common.arrays import model_to_arrays
from fedge.common.export import (
    EXPORT_FORMATS,
    K_HASH,
    K_TASK,
    ModelFileError,
    content_hash,
    export_model,
    parse_model_file,
    read_model_file,
)
from fedge.common.models import DigitsMLP, FedAvgCNN
from fedge.common.snapshot import snapshot_to_arrays, tensors_version
from fedge.v1 import snapshot_pb2, tensor_pb2


def _mlp_arrays() -> dict[str, np.ndarray]:
    return model_to_arrays(DigitsMLP(seed=1))


def _export(arrays: dict[str, np.ndarray], fmt: str, **kw: object) -> bytes:
    args: dict = {
        "fmt": fmt,
        "task": "digits",
        "input_shape": (1, 8, 8),
        "labels": [str(i) for i in range(10)],
        "source_version": "ab" * 32,
        "lineage": {"run_id": 7, "round": 3, "parent_version": "cd" * 32},
        "evaluation": {"accuracy": 0.9, "loss": 0.3},
    }
    args.update(kw)
    return export_model(arrays, **args)


@pytest.fixture(scope="module")
def cnn() -> dict[str, np.ndarray]:
    return model_to_arrays(FedAvgCNN(seed=0))


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_roundtrip_metadata_and_layout(fmt: str) -> None:
    arrays = _mlp_arrays()
    data = _export(arrays, fmt)
    mf = parse_model_file(data)
    assert list(mf.arrays) == list(arrays)
    assert all(a.dtype == np.float32 for a in mf.arrays.values())
    assert mf.format == fmt and mf.task == "digits" and mf.input_shape == (1, 8, 8)
    assert mf.labels == tuple(str(i) for i in range(10))
    assert mf.source_version == "ab" * 32
    assert mf.lineage == {"run_id": 7, "round": 3, "parent_version": "cd" * 32}
    assert mf.evaluation == {"accuracy": 0.9, "loss": 0.3}
    assert mf.size == len(data)
    # biases and small tensors stay fp32, bit for bit, in every format
    for name in ("fc1.bias", "fc2.weight", "fc2.bias"):
        np.testing.assert_array_equal(mf.arrays[name], arrays[name])
    snap = snapshot_pb2.ModelSnapshot.FromString(data)
    kinds = {t.WhichOneof("kind") for t in snap.tensors}
    assert kinds == ({"dense"} if fmt in ("fp32", "fp16") else {"dense", "quantized"})
    # an export is still a snapshot every fedge decoder reads
    decoded, _ = snapshot_to_arrays(data)
    assert list(decoded) == list(arrays)


@pytest.mark.parametrize("fmt,bits", [("int8", 8), ("int4", 4)])
def test_one_scale_per_output_channel(cnn: dict[str, np.ndarray], fmt: str, bits: int) -> None:
    snap = snapshot_pb2.ModelSnapshot.FromString(_export(cnn, fmt, input_shape=(1, 28, 28)))
    quantized = {t.quantized.name: t.quantized for t in snap.tensors if t.HasField("quantized")}
    assert set(quantized) == {"conv2.weight", "fc1.weight", "fc2.weight"}  # conv1: 800 < 1024
    mf = parse_model_file(snap.SerializeToString(deterministic=True))
    qmax = {8: 127, 4: 7}[bits]
    for name, q in quantized.items():
        rows = cnn[name].shape[0]
        per_row = cnn[name].size // rows
        assert q.bits == bits and q.block_size == per_row
        scale_dtype = np.float16 if q.scale_dtype == tensor_pb2.DTYPE_FLOAT16 else np.float32
        scales = np.frombuffer(q.scales, scale_dtype).astype(np.float32)
        assert scales.shape == (rows,)
        # absmax per row, so every value is within half a step of its row's scale
        err = np.abs(mf.arrays[name] - cnn[name]).reshape(rows, per_row).max(axis=1)
        assert np.all(err <= scales / 2 * (1 + 1e-3) + 1e-12)
        amax = np.abs(cnn[name]).reshape(rows, per_row).max(axis=1)
        np.testing.assert_allclose(scales, amax / qmax, rtol=2e-3)
    if bits == 8:
        assert set(mf.int8_rows) == set(quantized)
        values, scales = mf.int8_rows["fc1.weight"]
        assert values.shape == (512, 3136) and values.dtype == np.int8
        np.testing.assert_array_equal(
            values.astype(np.float32) * scales[:, None], mf.arrays["fc1.weight"]
        )


def test_size_ratios_on_the_cnn(cnn: dict[str, np.ndarray]) -> None:
    sizes = {f: len(_export(cnn, f, input_shape=(1, 28, 28))) for f in EXPORT_FORMATS}
    assert sizes["int8"] <= 0.26 * sizes["fp32"]
    assert sizes["int4"] <= 0.14 * sizes["fp32"]
    assert sizes["fp16"] <= 0.51 * sizes["fp32"]


def test_export_is_deterministic_and_hash_covers_metadata() -> None:
    arrays = _mlp_arrays()
    a, b = _export(arrays, "int8"), _export(arrays, "int8")
    assert a == b
    other = _export(arrays, "int8", labels=[f"c{i}" for i in range(10)])
    snap_a = snapshot_pb2.ModelSnapshot.FromString(a)
    snap_o = snapshot_pb2.ModelSnapshot.FromString(other)
    assert snap_a.version == snap_o.version  # same weights
    assert snap_a.metadata[K_HASH] != snap_o.metadata[K_HASH]  # other metadata
    assert snap_a.metadata[K_HASH] == content_hash(snap_a.version, dict(snap_a.metadata))


def test_refuses_unknown_format_and_non_finite() -> None:
    arrays = _mlp_arrays()
    with pytest.raises(ValueError, match="format"):
        _export(arrays, "int2")
    arrays["fc1.weight"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _export(arrays, "int8")


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_every_single_byte_flip_is_refused(fmt: str) -> None:
    """Exhaustive on a small file: any one byte changed, the loader refuses."""
    data = _export(_mlp_arrays(), fmt)
    buf = bytearray(data)
    accepted = []
    for i in range(len(buf)):
        buf[i] ^= 0x01 if i % 2 else 0xFF
        try:
            parse_model_file(bytes(buf))
            accepted.append(i)
        except ModelFileError:
            pass
        buf[i] = data[i]
    assert accepted == []


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_every_truncation_is_refused(fmt: str) -> None:
    """Exhaustive on a small file (docs/models.md): every prefix, the empty one included."""
    data = _export(_mlp_arrays(), fmt)
    accepted = []
    for n in range(len(data)):
        try:
            parse_model_file(data[:n])
            accepted.append(n)
        except ModelFileError:
            pass
    assert accepted == []
    parse_model_file(data)  # the whole file is fine


def test_extended_files_are_refused() -> None:
    data = _export(_mlp_arrays(), "int8")
    # an appended field this reader does not know, or a repeated one
    for tail in (b"\x78\x01", b"\x0a\x01x", data[:50]):
        with pytest.raises(ModelFileError, match="malformed"):
            parse_model_file(data + tail)


def test_edited_metadata_with_recomputed_tensor_hash_is_refused() -> None:
    snap = snapshot_pb2.ModelSnapshot.FromString(_export(_mlp_arrays(), "int8"))
    snap.metadata[K_TASK] = "fashion-mnist"
    with pytest.raises(ModelFileError, match="hash_mismatch"):
        parse_model_file(snap.SerializeToString(deterministic=True))
    # weights edited, the tensors hash recomputed, the content hash left: refused
    snap = snapshot_pb2.ModelSnapshot.FromString(_export(_mlp_arrays(), "fp32"))
    t = snap.tensors[1].dense
    t.data = bytes(4) + t.data[4:]
    snap.version = tensors_version(snap)
    with pytest.raises(ModelFileError, match="hash_mismatch"):
        parse_model_file(snap.SerializeToString(deterministic=True))


def test_consistent_forgery_still_gets_format_and_codec_checks() -> None:
    """A file with valid hashes but lying metadata or tensors is refused by the checks below."""

    def forge(mutate) -> bytes:
        snap = snapshot_pb2.ModelSnapshot.FromString(_export(_mlp_arrays(), "int8"))
        mutate(snap)
        snap.version = tensors_version(snap)
        meta = dict(snap.metadata)
        snap.metadata[K_HASH] = content_hash(snap.version, meta)
        return snap.SerializeToString(deterministic=True)

    def set_meta(key: str, value: str):
        return lambda s: s.metadata.__setitem__(key, value)

    cases = {
        "bad_metadata": [
            set_meta("input-shape", "[1, -8, 8]"),
            set_meta("input-shape", "oops"),
            set_meta("labels", '{"a": 1}'),
            set_meta("format", "int3"),
        ],
        "bad_format": [set_meta("format", "fp32")],
        "missing_metadata": [set_meta("task", "")],
        "unsupported": [set_meta("file-format", "fedge.export.v9")],
    }
    for reason, mutations in cases.items():
        for m in mutations:
            with pytest.raises(ModelFileError) as info:
                parse_model_file(forge(m))
            assert info.value.reason == reason, (reason, info.value)

    def lie_about_scales(s: snapshot_pb2.ModelSnapshot) -> None:
        q = next(t.quantized for t in s.tensors if t.HasField("quantized"))
        q.scales = q.scales[:-2]

    with pytest.raises(ModelFileError) as info:
        parse_model_file(forge(lie_about_scales))
    assert info.value.reason == "bad_scales"


def test_size_cap_and_unreadable(tmp_path: Path) -> None:
    data = _export(_mlp_arrays(), "fp32")
    path = tmp_path / "m.pb"
    path.write_bytes(data)
    assert read_model_file(path).format == "fp32"
    with pytest.raises(ModelFileError, match="too_large"):
        read_model_file(path, max_bytes=len(data) - 1)
    with pytest.raises(ModelFileError, match="unreadable"):
        read_model_file(tmp_path / "missing.pb")
    with pytest.raises(ModelFileError, match="malformed"):
        parse_model_file(b"\xff" * 64)


def test_metadata_is_plain_json_a_device_can_read() -> None:
    snap = snapshot_pb2.ModelSnapshot.FromString(_export(_mlp_arrays(), "int4"))
    assert json.loads(snap.metadata["input-shape"]) == [1, 8, 8]
    assert json.loads(snap.metadata["lineage"])["round"] == 3
    assert snap.metadata["format"] == "int4"


def test_fedge_export_writes_onnx_files(tmp_path: Path) -> None:
    """`fedge export --format onnx|onnx-int8` from a coordinator's state folder."""
    from test_registry import make_state
    from typer.testing import CliRunner

    from fedge.cli import app
    from fedge.common.onnx_runtime import load_onnx_predictor

    state = make_state(tmp_path / "state")
    try:
        state.registry.promote(state.versions[1], reason="test")
        runner = CliRunner()
        for fmt in ("onnx", "onnx-int8"):
            out = tmp_path / "exports" / f"m-{fmt}.onnx"
            done = runner.invoke(app, ["export", "--format", fmt, "--out", str(out),
                                       "--state", str(state.folder)])
            assert done.exit_code == 0, done.output
            model = load_onnx_predictor(out)
            assert model.info.format == fmt and model.info.source_version == state.versions[1]
            assert model.info.task == "digits" and model.info.input_shape == (1, 8, 8)
        wrong = runner.invoke(app, ["export", "--format", "onnx", "--out",
                                    str(tmp_path / "m.pb"), "--state", str(state.folder)])
        assert wrong.exit_code == 1 and "*.onnx" in wrong.output
        assert not (tmp_path / "m.pb").exists()
    finally:
        state.store.close()
