"""fedge's ONNX exports run with numpy alone (common/onnx_numpy.py), as ONNX Runtime runs them.

ONNX Runtime is the reference here (installed in the dev set-up); the numpy
runner must give the same logits, refuse what it does not implement, and be
what `fedge predict` and an inference-only device use where ONNX Runtime is
not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from test_onnx_export import _run_without_torch

from fedge.common.arrays import model_to_arrays
from fedge.common.datasets import FASHION_MNIST_LABELS
from fedge.common.export import export_model, parse_model_file
from fedge.common.models import DigitsMLP, FedAvgCNN
from fedge.common.onnx_export import to_onnx
from fedge.common.onnx_file import OnnxFileError, seal
from fedge.common.onnx_numpy import NumpyOnnxPredictor, load_numpy_predictor
from fedge.common.onnx_runtime import load_onnx_predictor

LABELS = list(FASHION_MNIST_LABELS)


def _files(arrays: dict[str, np.ndarray], task: str, shape: tuple[int, ...]) -> dict[str, bytes]:
    out = {}
    for fmt, onnx_fmt in (("fp32", "onnx"), ("int8", "onnx-int8")):
        pb = export_model(arrays, fmt=fmt, task=task, input_shape=shape, labels=LABELS,
                          source_version="cd" * 32, evaluation={})
        out[onnx_fmt] = to_onnx(parse_model_file(pb), onnx_fmt)
    return out


@pytest.fixture(scope="module")
def cnn() -> dict[str, bytes]:
    return _files(model_to_arrays(FedAvgCNN(seed=4)), "fashion-mnist", (1, 28, 28))


@pytest.mark.parametrize("fmt", ["onnx", "onnx-int8"])
def test_numpy_runs_the_cnn_as_onnx_runtime_does(cnn: dict[str, bytes], fmt: str) -> None:
    x = np.random.default_rng(1).random((37, 1, 28, 28), dtype=np.float32)
    ours = load_onnx_predictor(cnn[fmt], runtime="numpy")
    ort = load_onnx_predictor(cnn[fmt], runtime="onnxruntime")
    assert isinstance(ours, NumpyOnnxPredictor) and ours.kernels == "numpy"
    assert ort.kernels == "onnxruntime"
    a, b = ours.logits(x, batch_size=16), ort.logits(x)
    assert a.shape == (37, 10)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert (ours.predict(x).classes == ort.predict(x).classes).all()
    assert ours.info == ort.info and ours.info.format == fmt


def test_numpy_runs_the_digits_mlp() -> None:
    files = _files(model_to_arrays(DigitsMLP(seed=2)), "digits", (64,))
    x = np.random.default_rng(2).random((9, 64), dtype=np.float32)
    for data in files.values():
        np.testing.assert_allclose(load_numpy_predictor(data).logits(x),
                                   load_onnx_predictor(data, runtime="onnxruntime").logits(x),
                                   rtol=1e-4, atol=1e-5)


def _with_node(data: bytes, change) -> bytes:
    """A re-sealed copy of an export with its graph changed by `change(model)`."""
    model = onnx.load_from_string(data)
    del model.metadata_props[-1]  # the old seal
    change(model)
    return seal(model.SerializeToString())


def test_what_numpy_does_not_implement_is_refused_at_load(cnn: dict[str, bytes]) -> None:
    def sigmoid(model) -> None:
        model.graph.node[1].op_type = "Sigmoid"  # conv1.relu

    def strided(model) -> None:
        model.graph.node[0].attribute.append(helper.make_attribute("strides", [2, 2]))

    def opset(model) -> None:
        model.opset_import[0].version = 99

    for change, words in ((sigmoid, "operator Sigmoid"), (strided, "Conv with attributes"),
                          (opset, "opsets")):
        with pytest.raises(OnnxFileError, match=words) as e:
            load_numpy_predictor(_with_node(cnn["onnx"], change))
        assert e.value.reason == "unsupported"
        # ONNX Runtime still runs what it knows: the refusal is the runner's, not the file's
    load_onnx_predictor(_with_node(cnn["onnx"], sigmoid), runtime="onnxruntime")
    with pytest.raises(OnnxFileError, match="hash_mismatch"):
        damaged = bytearray(cnn["onnx"])
        damaged[500] ^= 1
        load_numpy_predictor(bytes(damaged))
    with pytest.raises(OnnxFileError, match="bad_runtime"):
        load_onnx_predictor(cnn["onnx"], runtime="tflite")


def test_fedge_predict_without_onnx_runtime_uses_numpy(tmp_path: Path,
                                                       cnn: dict[str, bytes]) -> None:
    """No torch, no Flower, no ONNX Runtime: `fedge predict` answers with numpy."""
    model = tmp_path / "model.onnx"
    model.write_bytes(cnn["onnx-int8"])
    x = np.random.default_rng(5).random((4, 1, 28, 28), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    done = _run_without_torch(tmp_path, ["predict", "--model", str(model), "--json",
                                         str(tmp_path / "x.npy")], absent=("onnxruntime",))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["model"]["kernels"] == "numpy"
    want = load_onnx_predictor(cnn["onnx-int8"], runtime="onnxruntime").predict(x).classes
    assert [p["class"] for p in doc["predictions"]] == want.tolist()


def _ort_single(node, x: np.ndarray, inits: list) -> np.ndarray:
    """One ONNX node run by ONNX Runtime (the reference for the numpy kernels)."""
    import onnxruntime
    from onnx import TensorProto

    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, list(x.shape))], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnxruntime.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]


@pytest.mark.parametrize("kernel,strides", [((2, 2), (2, 2)), ((3, 3), None), ((2, 2), (1, 2))])
def test_maxpool_kernel_matches_onnx_runtime(kernel, strides) -> None:
    from fedge.common.onnx_numpy import _maxpool

    x = np.random.default_rng(0).random((2, 3, 7, 6), dtype=np.float32)
    attrs = {"kernel_shape": list(kernel), **({"strides": list(strides)} if strides else {})}
    want = _ort_single(helper.make_node("MaxPool", ["x"], ["y"], **attrs), x, [])
    np.testing.assert_array_equal(_maxpool(x, kernel, strides or ()), want)


@pytest.mark.parametrize("k,pad", [(3, 0), (3, 1), (5, 2), (1, 0)])
def test_conv_kernel_matches_onnx_runtime(k: int, pad: int) -> None:
    from onnx import numpy_helper

    from fedge.common.onnx_numpy import _conv

    rng = np.random.default_rng(k + pad)
    x = rng.standard_normal((2, 3, 9, 8), dtype=np.float32)
    w = rng.standard_normal((4, 3, k, k), dtype=np.float32)
    b = rng.standard_normal(4, dtype=np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[k, k],
                            pads=[pad] * 4)
    want = _ort_single(node, x, [numpy_helper.from_array(w, "w"),
                                 numpy_helper.from_array(b, "b")])
    np.testing.assert_allclose(_conv(x, w, b, pad), want, rtol=1e-4, atol=1e-4)
