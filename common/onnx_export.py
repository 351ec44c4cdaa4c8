"""ONNX exports of fedge models, written with the `onnx` package's helper API (no torch).

The graph is built from a verified fedge export (`ModelFile`), so an ONNX file
carries exactly the weights of the `.pb` file of the same version: `onnx` from
the fp32 export, `onnx-int8` from the int8 export with each per-channel int8
weight kept as stored (int8 values, one scale per output channel, zero point
0) and turned back into float by a `DequantizeLinear` node (axis 0) in front
of its Conv or Gemm. Activations stay float: weight-only quantization, as in
the `.pb` int8 file, so the ONNX file is a quarter of the size and nothing is
re-quantized. Why not `torch.onnx.export`: it needs torch (and, in torch 2.x,
onnxscript) wherever a file is written, and tracing gives no control over
which weights stay int8; the model zoo is small enough to write by hand.

Supported architectures are recognised by their state_dict (names and
shapes), not by task name, so a user task reusing them exports too:
`DigitsMLP` (fc1, fc2) and `FedAvgCNN` (conv1, conv2, fc1, fc2). Anything
else (the Shakespeare LSTM) is refused with `OnnxFileError("unsupported")`.

The file is sealed (`fedge.common.onnx_file.seal`) and deterministic: the same
export gives the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fedge.common.export import (
    K_EVALUATION,
    K_INPUT_SHAPE,
    K_LABELS,
    K_LINEAGE,
    K_SOURCE,
    K_TASK,
    ModelFile,
)
from fedge.common.onnx_file import (
    K_HASH,
    ONNX_FILE_FORMAT,
    ONNX_FORMATS,
    ONNX_SOURCE_FORMAT,
    OnnxFileError,
    seal,
)

OPSET = 17
IR_VERSION = 8
"""IR 8 / opset 17: loadable by every ONNX Runtime since 1.13, Mobile included."""
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
K_SOURCE_HASH = "source-content-sha256"
"""Metadata: the content hash of the `.pb` export the ONNX file was built from."""

_MLP = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
_CNN = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", *_MLP)


def architecture(arrays: Mapping[str, np.ndarray]) -> str:
    """`mlp` or `cnn` for the model zoo's architectures; raises `OnnxFileError` otherwise."""
    names = tuple(arrays)
    if names == _MLP and all(arrays[k].ndim == (2 if k.endswith("weight") else 1) for k in _MLP):
        return "mlp"
    if names == _CNN and arrays["conv1.weight"].ndim == 4 and arrays["conv2.weight"].ndim == 4:
        return "cnn"
    raise OnnxFileError(
        "unsupported",
        "ONNX export knows the digits MLP and the FedAvg CNN; this model has tensors "
        f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''} (use a .pb export)",
    )


class _Graph:
    """Nodes and initializers of one graph, with weights float or int8 + DequantizeLinear."""

    def __init__(self, model: ModelFile, int8: bool) -> None:
        self.model = model
        self.int8 = int8
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def weight(self, name: str) -> str:
        """The graph name of a float tensor of the state_dict (dequantized in-graph if int8)."""
        rows = self.model.int8_rows.get(name) if self.int8 else None
        if rows is None:
            a = np.ascontiguousarray(self.model.arrays[name], dtype=np.float32)
            self.inits.append(numpy_helper.from_array(a, name))
            return name
        values, scales = rows
        shape = self.model.arrays[name].shape
        q = np.ascontiguousarray(values).reshape(shape)
        self.inits += [
            numpy_helper.from_array(q, f"{name}.int8"),
            numpy_helper.from_array(np.ascontiguousarray(scales, np.float32), f"{name}.scale"),
            numpy_helper.from_array(np.zeros(len(scales), np.int8), f"{name}.zero"),
        ]
        self.node("DequantizeLinear", [f"{name}.int8", f"{name}.scale", f"{name}.zero"], name,
                  axis=0)
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def gemm(self, x: str, layer: str, out: str) -> str:
        w, b = self.weight(f"{layer}.weight"), self.weight(f"{layer}.bias")
        return self.node("Gemm", [x, w, b], out, transB=1)

    def conv_block(self, x: str, layer: str) -> str:
        """Conv ('same' padding, odd square kernel) -> ReLU -> max-pool 2, as FedAvgCNN does."""
        k = int(self.model.arrays[f"{layer}.weight"].shape[-1])
        w, b = self.weight(f"{layer}.weight"), self.weight(f"{layer}.bias")
        pad = k // 2
        y = self.node("Conv", [x, w, b], f"{layer}.out", kernel_shape=[k, k],
                      pads=[pad, pad, pad, pad])
        y = self.node("Relu", [y], f"{layer}.relu")
        return self.node("MaxPool", [y], f"{layer}.pool", kernel_shape=[2, 2], strides=[2, 2])


def to_onnx(model: ModelFile, fmt: str) -> bytes:
    """A sealed ONNX file of a verified export in `fmt` (`onnx` or `onnx-int8`).

    `model` must be the export `ONNX_SOURCE_FORMAT[fmt]` names (fp32 for
    `onnx`, int8 for `onnx-int8`). Raises `OnnxFileError` for another format
    or an architecture the builder does not know.
    """
    if fmt not in ONNX_FORMATS:
        raise OnnxFileError("bad_format", f"{fmt!r}: use one of {', '.join(ONNX_FORMATS)}")
    if model.format != ONNX_SOURCE_FORMAT[fmt]:
        raise OnnxFileError(
            "bad_format", f"{fmt} is built from the {ONNX_SOURCE_FORMAT[fmt]} export, "
            f"not {model.format}"
        )
    arch = architecture(model.arrays)
    g = _Graph(model, int8=fmt == "onnx-int8")
    x = INPUT_NAME
    if arch == "cnn":
        x = g.conv_block(x, "conv1")
        x = g.conv_block(x, "conv2")
    x = g.node("Flatten", [x], "flatten", axis=1)
    x = g.node("Relu", [g.gemm(x, "fc1", "fc1.out")], "fc1.relu")
    g.gemm(x, "fc2", OUTPUT_NAME)
    classes = int(model.arrays["fc2.weight"].shape[0])
    graph = helper.make_graph(
        g.nodes,
        f"fedge-{model.task}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                       ["batch", *model.input_shape])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", classes])],
        initializer=g.inits,
    )
    proto = helper.make_model(
        graph,
        producer_name="fedge",
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        doc_string=f"fedge {model.task} model {model.source_version[:12]} ({fmt})",
    )
    meta = {
        "file-format": ONNX_FILE_FORMAT,
        "format": fmt,
        K_TASK: model.task,
        K_INPUT_SHAPE: json.dumps(list(model.input_shape)),
        K_LABELS: json.dumps(list(model.labels)),
        K_SOURCE: model.source_version,
        K_SOURCE_HASH: model.content_hash,
        K_LINEAGE: json.dumps(model.lineage, sort_keys=True),
        K_EVALUATION: json.dumps(model.evaluation, sort_keys=True),
    }
    assert K_HASH not in meta
    helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto)
    return seal(proto.SerializeToString(deterministic=True))
