"""ONNX exports: the same predictions as torch, int8 weights kept as stored, the seal, no torch.

The no-torch checks run in a child interpreter whose import system refuses
`torch` (and Flower), as on a device installed with `fedge[inference]` only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from fedge.common.arrays import model_to_arrays
from fedge.common.export import export_model, parse_model_file
from fedge.common.inference import load_predictor
from fedge.common.models import CharLSTM, DigitsMLP, FedAvgCNN
from fedge.common.onnx_export import to_onnx
from fedge.common.onnx_file import SEAL_LEN, OnnxFileError, check_seal
from fedge.common.onnx_runtime import load_onnx_predictor
from fedge.demo import child_env

LABELS = [f"c{i}" for i in range(10)]


def _pb(arrays: dict[str, np.ndarray], fmt: str, task: str, shape: tuple[int, ...]) -> bytes:
    return export_model(arrays, fmt=fmt, task=task, input_shape=shape, labels=LABELS,
                        source_version="ab" * 32, evaluation={"accuracy": 0.5})


@pytest.fixture(scope="module")
def cnn_files() -> dict[str, bytes]:
    arrays = model_to_arrays(FedAvgCNN(seed=3))
    files = {}
    for fmt, onnx_fmt in (("fp32", "onnx"), ("int8", "onnx-int8")):
        pb = _pb(arrays, fmt, "fashion-mnist", (1, 28, 28))
        files[fmt] = pb
        files[onnx_fmt] = to_onnx(parse_model_file(pb), onnx_fmt)
    return files


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def test_fp32_onnx_computes_what_torch_computes(cnn_files: dict[str, bytes]) -> None:
    x = _images(64)
    ort = load_onnx_predictor(cnn_files["onnx"])
    torch_pred = load_predictor(cnn_files["fp32"])
    np.testing.assert_allclose(ort.logits(x), torch_pred.logits(x), atol=1e-4, rtol=1e-4)
    assert (ort.predict(x).classes == torch_pred.predict(x).classes).all()
    assert ort.info.format == "onnx" and ort.info.task == "fashion-mnist"
    assert ort.info.input_shape == (1, 28, 28) and ort.info.labels == tuple(LABELS)
    assert ort.info.source_version == "ab" * 32
    assert ort.label(3) == "c3"


def test_int8_onnx_keeps_the_exports_int8_weights(cnn_files: dict[str, bytes]) -> None:
    model = onnx.load_from_string(cnn_files["onnx-int8"])
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DequantizeLinear") == 3  # conv2, fc1, fc2 (conv1 is under 1024 weights)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    stored = parse_model_file(cnn_files["int8"]).int8_rows
    for name in ("conv2.weight", "fc1.weight", "fc2.weight"):
        values, scales = stored[name]
        assert inits[f"{name}.int8"].dtype == np.int8
        assert np.array_equal(inits[f"{name}.int8"].reshape(values.shape), values)
        assert np.array_equal(inits[f"{name}.scale"], scales)
    assert inits["conv1.weight"].dtype == np.float32
    # a quarter of the fp32 file, give or take the float biases and conv1
    assert len(cnn_files["onnx-int8"]) < 0.27 * len(cnn_files["onnx"])
    x = _images(200, seed=1)
    ort = load_onnx_predictor(cnn_files["onnx-int8"]).predict(x).classes
    dequantized = load_predictor(cnn_files["int8"], kernels="float").predict(x).classes
    assert (ort == dequantized).mean() >= 0.99


def test_digits_mlp_exports_and_other_models_are_refused() -> None:
    arrays = model_to_arrays(DigitsMLP(seed=2))
    pb = _pb(arrays, "fp32", "digits", (1, 8, 8))
    x = np.random.default_rng(2).random((10, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(load_onnx_predictor(to_onnx(parse_model_file(pb), "onnx")).logits(x),
                               load_predictor(pb).logits(x), atol=1e-5)
    with pytest.raises(OnnxFileError) as e:
        to_onnx(parse_model_file(pb), "onnx-int8")  # built from the int8 export only
    assert e.value.reason == "bad_format"
    lstm = _pb(model_to_arrays(CharLSTM(hidden=16, seed=0)), "fp32", "shakespeare", (80,))
    with pytest.raises(OnnxFileError) as e:
        to_onnx(parse_model_file(lstm), "onnx")
    assert e.value.reason == "unsupported" and "digits MLP and the FedAvg CNN" in e.value.detail


def test_deterministic_and_sealed(cnn_files: dict[str, bytes]) -> None:
    again = to_onnx(parse_model_file(cnn_files["int8"]), "onnx-int8")
    assert again == cnn_files["onnx-int8"]
    digest = check_seal(again)
    # the seal is an ordinary metadata entry to every ONNX reader
    props = {p.key: p.value for p in onnx.load_from_string(again).metadata_props}
    assert props["content-sha256"] == digest and props["file-format"] == "fedge.onnx.v1"


def test_damage_is_refused_before_onnx_runtime_sees_it(cnn_files: dict[str, bytes]) -> None:
    data = cnn_files["onnx-int8"]
    rng = np.random.default_rng(0)
    for offset in [*rng.integers(0, len(data) - SEAL_LEN, 20), len(data) - 1, len(data) - 70]:
        bad = bytearray(data)
        bad[int(offset)] ^= 0x10
        with pytest.raises(OnnxFileError) as e:
            load_onnx_predictor(bytes(bad))
        assert e.value.reason in ("hash_mismatch", "missing_metadata"), offset
    for cut in (data[:-1], data[: len(data) // 2], data + b"\x00", b""):
        with pytest.raises(OnnxFileError):
            load_onnx_predictor(cut)
    with pytest.raises(OnnxFileError) as e:
        load_onnx_predictor(cnn_files["int8"])  # a .pb export is no ONNX file
    assert e.value.reason == "missing_metadata"
    with pytest.raises(OnnxFileError) as e:
        load_onnx_predictor(data, max_bytes=len(data) - 1)
    assert e.value.reason == "too_large"


_NO_TORCH = textwrap.dedent(
    """
    import sys

    # what Python does for a package that is not installed: None in sys.modules makes
    # `import torch` raise ModuleNotFoundError and importlib.util.find_spec answer None
    for name in {names!r}:
        sys.modules[name] = None
    """
)


def _run_without_torch(tmp_path: Path, argv: list[str], *,
                       absent: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`fedge ARGV` in a child where torch, Flower, Ray (and `absent`) cannot be imported.

    A `sitecustomize` on PYTHONPATH marks them absent before anything else runs.
    """
    names = ("torch", "flwr", "ray", *absent)
    (tmp_path / "sitecustomize.py").write_text(_NO_TORCH.format(names=names))
    code = (
        "import sys\n"
        "from fedge.cli import app\n"
        "try:\n"
        f"    sys.exit(app({argv!r}, standalone_mode=False))\n"
        "except SystemExit as e:\n"
        "    sys.exit(e.code)\n"
        "finally:\n"
        "    loaded = sys.modules.get('torch') is not None\n"
        "    print('TORCH-LOADED' if loaded else 'NO-TORCH', file=sys.stderr)\n"
    )
    env = child_env({"PYTHONPATH": str(tmp_path)})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)


def test_fedge_predict_runs_onnx_without_torch(tmp_path: Path, cnn_files: dict[str, bytes]) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(cnn_files["onnx-int8"])
    x = _images(3, seed=5)
    inputs = tmp_path / "x.npy"
    np.save(inputs, x)
    done = _run_without_torch(tmp_path, ["predict", "--model", str(model), "--json",
                                         str(inputs)])
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().endswith("NO-TORCH")
    doc = json.loads(done.stdout)
    assert doc["model"]["format"] == "onnx-int8" and doc["model"]["kernels"] == "onnxruntime"
    want = load_onnx_predictor(cnn_files["onnx-int8"]).predict(x).classes.tolist()
    assert [p["class"] for p in doc["predictions"]] == want
    # a .pb export needs torch: one line naming the way out, exit 1
    pb = tmp_path / "model.int8.pb"
    pb.write_bytes(cnn_files["int8"])
    refused = _run_without_torch(tmp_path, ["predict", "--model", str(pb), str(inputs)])
    assert refused.returncode == 1
    first = refused.stderr.strip().splitlines()[0]
    assert "needs PyTorch" in first and "onnx-int8" in first
    # a damaged ONNX file: one line, exit 1
    bad = bytearray(cnn_files["onnx-int8"])
    bad[1000] ^= 1
    model.write_bytes(bytes(bad))
    damaged = _run_without_torch(tmp_path, ["predict", "--model", str(model), str(inputs)])
    assert damaged.returncode == 1 and "hash_mismatch" in damaged.stderr
