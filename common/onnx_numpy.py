"""fedge's ONNX exports run with numpy alone: predicting on a device without ONNX Runtime.

ONNX Runtime's CPU package is 60-80 MB installed, as much as numpy itself, so a
device that only predicts and keeps its install small (a Pi Zero's SD card,
docs/edge.md "Inference-only devices") can leave it out: this module runs the
graphs `fedge.common.onnx_export` writes (the digits MLP and the FedAvg CNN,
fp32 or int8 weights behind DequantizeLinear) with numpy. The file is parsed
with fedge's generated subset of ONNX's schema (`proto/fedge/v1/onnx_subset.proto`;
no `onnx` package, no pickle) after its seal is checked, and every node is
checked before anything runs: an operator, attribute or dtype outside the small
set below is refused with `OnnxFileError("unsupported")`, never guessed at.
Supported: Conv (2-D, group 1, stride 1, no dilation, symmetric pads), Relu,
MaxPool (no padding), Flatten, Gemm, DequantizeLinear (int8, zero point 0,
per tensor or per axis). int8 weights are dequantized once at load, as ONNX
Runtime's constant folding does, so the arithmetic is float32 either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.common.onnx_file import OnnxFileError
from fedge.common.onnx_runtime import (
    DEFAULT_MAX_ONNX_BYTES,
    OnnxInfo,
    OnnxPredictor,
    onnx_info,
    read_onnx,
)
from fedge.v1 import onnx_subset_pb2 as pb

_DTYPES = {1: np.float32, 3: np.int8}
"""ONNX TensorProto.DataType codes the exports use: FLOAT, INT8."""
_MAX_OPSET = 21
"""The newest default-domain opset whose semantics for the ops below match what runs here."""


@dataclass(frozen=True)
class _Step:
    """One node, ready to run: its op, inputs, output and checked attributes."""

    op: str
    inputs: tuple[str, ...]
    output: str
    attrs: dict[str, Any]


_ATTRIBUTE_VALUE: dict[int, Callable[[pb.OnnxAttribute], Any]] = {
    1: lambda a: a.f,  # onnx.AttributeProto.AttributeType: FLOAT 1, INT 2, STRING 3,
    2: lambda a: a.i,  # FLOATS 6, INTS 7
    3: lambda a: a.s.decode("utf-8", "replace"),
    6: lambda a: tuple(a.floats),
    7: lambda a: tuple(a.ints),
}


def _attrs(node: pb.OnnxNode) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type not in _ATTRIBUTE_VALUE:
            raise OnnxFileError("unsupported", f"{node.op_type} attribute {a.name!r} of "
                                               f"type {a.type}")
        out[a.name] = _ATTRIBUTE_VALUE[a.type](a)
    return out


def _tensor(t: pb.OnnxTensor) -> np.ndarray:
    if t.data_location != 0 or len(t.external_data):
        raise OnnxFileError("unsupported", f"initializer {t.name!r} keeps its data outside")
    dtype = _DTYPES.get(t.data_type)
    if dtype is None:
        raise OnnxFileError("unsupported", f"initializer {t.name!r} of ONNX type {t.data_type}")
    shape = tuple(int(d) for d in t.dims)
    if any(d < 0 for d in shape):
        raise OnnxFileError("malformed", f"initializer {t.name!r} has dims {shape}")
    count = int(np.prod(shape, dtype=np.int64))
    if t.raw_data:
        raw = np.frombuffer(t.raw_data, dtype=np.dtype(dtype).newbyteorder("<"))
    elif dtype is np.float32:
        raw = np.asarray(t.float_data, np.float32)
    else:
        raw = np.asarray(t.int32_data, np.int32)
    if raw.size != count:
        raise OnnxFileError("malformed", f"initializer {t.name!r}: {raw.size} values for "
                                         f"dims {shape}")
    return raw.astype(dtype, copy=True).reshape(shape)


def _check(step: _Step, consts: dict[str, np.ndarray]) -> None:
    """Refuse what this runner does not implement exactly (before anything runs)."""
    a, op = step.attrs, step.op
    allowed = {
        "Conv": {"kernel_shape", "pads", "strides", "dilations", "group"},
        "Relu": set(), "Flatten": {"axis"}, "DequantizeLinear": {"axis"},
        "MaxPool": {"kernel_shape", "strides", "pads"},
        "Gemm": {"transA", "transB", "alpha", "beta"},
    }
    if op not in allowed:
        raise OnnxFileError("unsupported", f"operator {op} (the numpy runner knows "
                                           f"{', '.join(sorted(allowed))}; install onnxruntime)")
    extra = set(a) - allowed[op]
    if extra:
        raise OnnxFileError("unsupported", f"{op} attribute(s) {', '.join(sorted(extra))}")
    bad = (
        (op == "Conv" and (a.get("group", 1) != 1 or set(a.get("strides", (1, 1))) != {1}
                          or set(a.get("dilations", (1, 1))) != {1}
                          or len(a.get("pads", (0,) * 4)) != 4
                          or len(set(a.get("pads", (0,) * 4))) != 1))
        or (op == "MaxPool" and (len(a.get("kernel_shape", ())) != 2
                                or set(a.get("pads", (0,))) != {0}))
        or (op == "Gemm" and (a.get("transA", 0) != 0 or a.get("alpha", 1.0) != 1.0
                             or a.get("beta", 1.0) != 1.0))
        or (op == "Flatten" and a.get("axis", 1) != 1)
    )
    if bad:
        raise OnnxFileError("unsupported", f"{op} with attributes {a}")
    if op == "DequantizeLinear":
        if len(step.inputs) == 3 and np.any(consts.get(step.inputs[2], np.zeros(1)) != 0):
            raise OnnxFileError("unsupported", "DequantizeLinear with a non-zero zero point")
        if not all(i in consts for i in step.inputs):
            raise OnnxFileError("unsupported", "DequantizeLinear of a computed tensor")


def _dequantize(step: _Step, consts: dict[str, np.ndarray]) -> np.ndarray:
    q, scale = consts[step.inputs[0]], consts[step.inputs[1]].astype(np.float32)
    if q.dtype != np.int8:
        raise OnnxFileError("unsupported", f"DequantizeLinear of {q.dtype}")
    if scale.ndim == 0 or scale.size == 1:
        return q.astype(np.float32) * scale.reshape(())
    axis = int(step.attrs.get("axis", 1)) % q.ndim
    if scale.ndim != 1 or scale.size != q.shape[axis]:
        raise OnnxFileError("malformed", f"{step.output}: {scale.size} scales for axis "
                                         f"{axis} of {q.shape}")
    shape = [1] * q.ndim
    shape[axis] = scale.size
    return q.astype(np.float32) * scale.reshape(shape)


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, pad: int) -> np.ndarray:
    """2-D convolution, stride 1, as a matrix product over each k x k window."""
    n, c, _, _ = x.shape
    o, wc, kh, kw = w.shape
    if wc != c:
        raise OnnxFileError("model_mismatch", f"Conv of {c} channels with weights {w.shape}")
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # n c h w kh kw
    h, wd = win.shape[2], win.shape[3]
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * wd, c * kh * kw)
    y = cols @ w.reshape(o, c * kh * kw).T
    if b is not None:
        y += b
    return np.ascontiguousarray(y.reshape(n, h, wd, o).transpose(0, 3, 1, 2))


def _maxpool(x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    kh, kw = kernel
    sh, sw = strides or (1, 1)  # ONNX's default stride is 1 along each axis
    if (sh, sw) == (kh, kw):  # the exports' 2 x 2, stride 2: a reshape
        n, c, h, w = x.shape
        h2, w2 = h // kh, w // kw
        return x[:, :, : h2 * kh, : w2 * kw].reshape(n, c, h2, kh, w2, kw).max(axis=(3, 5))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    return win[:, :, ::sh, ::sw].max(axis=(4, 5))


class NumpyOnnxPredictor(OnnxPredictor):
    """A fedge ONNX export run by numpy; answers like `OnnxPredictor`."""

    kernels = "numpy"

    def __init__(self, steps: list[_Step], consts: dict[str, np.ndarray], input_name: str,
                 output_name: str, info: OnnxInfo) -> None:
        self.steps = steps
        self.consts = consts
        self.input_name = input_name
        self.output_name = output_name
        self.info = info

    def run_batch(self, xs: np.ndarray) -> np.ndarray:
        values: dict[str, np.ndarray] = {**self.consts, self.input_name: xs}
        for s in self.steps:
            ins = [values[i] for i in s.inputs if i]
            if s.op == "Conv":
                pad = int(s.attrs.get("pads", (0,))[0])
                y = _conv(ins[0], ins[1], ins[2] if len(ins) > 2 else None, pad)
            elif s.op == "Relu":
                y = np.maximum(ins[0], 0)
            elif s.op == "MaxPool":
                y = _maxpool(ins[0], s.attrs["kernel_shape"], s.attrs.get("strides", ()))
            elif s.op == "Flatten":
                y = ins[0].reshape(len(ins[0]), -1)
            else:  # Gemm
                w = ins[1].T if s.attrs.get("transB", 0) else ins[1]
                y = ins[0] @ w
                if len(ins) > 2:
                    y += ins[2]
            values[s.output] = y
        return values[self.output_name]


def load_numpy_predictor(
    source: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_ONNX_BYTES,
) -> NumpyOnnxPredictor:
    """A `NumpyOnnxPredictor` for a sealed fedge ONNX export.

    Every problem is an `OnnxFileError`, raised before anything is returned.
    """
    data = read_onnx(source, max_bytes=max_bytes)
    model = pb.OnnxModel()
    try:
        model.ParseFromString(data)
    except Exception:  # protobuf's DecodeError, or a nesting too deep
        raise OnnxFileError("malformed", "not a protobuf ONNX ModelProto") from None
    opsets = {o.domain: o.version for o in model.opset_import}
    if set(opsets) - {"", "ai.onnx"} or not 13 <= opsets.get("", opsets.get("ai.onnx", 0)) \
            <= _MAX_OPSET:
        raise OnnxFileError("unsupported", f"opsets {opsets} (the numpy runner runs the "
                                           f"default domain, opset 13..{_MAX_OPSET})")
    info = onnx_info({e.key: e.value for e in model.metadata_props}, data)
    g = model.graph
    consts = {t.name: _tensor(t) for t in g.initializer}
    inputs = [v.name for v in g.input if v.name not in consts]
    if len(inputs) != 1 or len(g.output) != 1:
        raise OnnxFileError("model_mismatch", f"graph inputs {inputs}, outputs "
                                              f"{[v.name for v in g.output]}: one of each")
    steps = []
    for node in g.node:
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            raise OnnxFileError("unsupported", f"node {node.name!r} ({node.domain or 'ai.onnx'}"
                                               f".{node.op_type}, {len(node.output)} outputs)")
        step = _Step(node.op_type, tuple(node.input), node.output[0], _attrs(node))
        _check(step, consts)
        if step.op == "DequantizeLinear":  # weights: once, at load
            consts[step.output] = _dequantize(step, consts)
        else:
            steps.append(step)
    known = set(consts) | {inputs[0]} | {s.output for s in steps}
    missing = sorted({i for s in steps for i in s.inputs if i and i not in known})
    if missing or g.output[0].name not in known:
        raise OnnxFileError("malformed", "graph uses undefined values "
                                         f"{missing[:3] or g.output[0].name}")
    predictor = NumpyOnnxPredictor(steps, consts, inputs[0], g.output[0].name, info)
    try:  # a graph that does not fit its stated input shape is refused now, not later
        predictor.run_batch(np.zeros((1, *info.input_shape), np.float32))
    except (ValueError, IndexError, KeyError) as e:
        raise OnnxFileError("model_mismatch", f"the graph does not run on "
                                              f"{list(info.input_shape)}: {e}") from None
    return predictor
