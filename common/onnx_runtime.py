"""CPU inference from an ONNX export with ONNX Runtime: the device path that needs no torch.

A device that only predicts installs `fedge[inference-onnxruntime]` (ONNX
Runtime's CPU package, numpy, protobuf; no torch, no Flower), or
`fedge[inference]` without ONNX Runtime, where `load_onnx_predictor` runs
the file with numpy (`onnx_numpy.py`), and runs `.onnx` files that
`fedge export --format onnx|onnx-int8` or the HTTP API wrote. This module
imports neither torch nor the `onnx` package: the file is checked with its
seal (`onnx_file.check_seal`, standard library only) before ONNX Runtime
parses a byte of it, and the metadata it needs is read through ONNX
Runtime. `OnnxPredictor` answers like `fedge.common.inference.Predictor`
(`prepare`, `predict`, `label`, `info`), so `fedge predict` and the HTTP API
use either.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedge.common.onnx_file import ONNX_FILE_FORMAT, ONNX_FORMATS, OnnxFileError, check_seal
from fedge.common.predictions import FileFacts, Predictions, top1

DEFAULT_MAX_ONNX_BYTES = 256 << 20
DEFAULT_BATCH = 64



@dataclass(frozen=True)
class OnnxInfo:
    """What a verified ONNX export says about itself (the fields `fedge predict` prints)."""

    format: str
    task: str
    input_shape: tuple[int, ...]
    labels: tuple[str, ...]
    source_version: str
    content_hash: str
    size: int
    metadata: dict[str, str] = field(default_factory=dict)


def ort_available() -> bool:
    """Whether ONNX Runtime is installed (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def read_onnx(
    source: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_ONNX_BYTES,
) -> bytes:
    """The bytes of an ONNX export (from a path or bytes), size-capped and seal-checked."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        p = Path(source)
        try:
            with open(p, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > max_bytes:
                    raise OnnxFileError("too_large", f"{p}: {size} bytes > cap {max_bytes}")
                data = f.read(max_bytes + 1)
        except OSError as e:
            raise OnnxFileError("unreadable", f"{p}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise OnnxFileError("too_large", f"{len(data)} bytes > cap {max_bytes}")
    check_seal(data)
    return data


class OnnxPredictor(FileFacts):
    """An ONNX Runtime session on one CPU, ready to predict.

    `kernels` names what runs the graph (`onnxruntime`, or `numpy` for
    `onnx_numpy.NumpyOnnxPredictor`), so a report says what computed its answers.
    """

    kernels = "onnxruntime"

    def __init__(self, session: Any, info: OnnxInfo) -> None:
        self.session = session
        self.info = info
        self.input_name = session.get_inputs()[0].name

    def run_batch(self, xs: np.ndarray) -> np.ndarray:
        """The graph's output for one batch of prepared inputs."""
        return np.asarray(self.session.run(None, {self.input_name: xs})[0])

    def logits(self, x: Any, *, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
        """Raw model outputs for validated inputs, `batch_size` examples per run."""
        xs = self.prepare(x)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        outs = [self.run_batch(xs[i : i + batch_size]) for i in range(0, len(xs), batch_size)]
        if not outs:
            return np.zeros((0, max(1, len(self.labels))), np.float32)
        return np.concatenate(outs).astype(np.float32, copy=False)

    def predict(self, x: Any, *, batch_size: int = DEFAULT_BATCH) -> Predictions:
        """Top-1 predictions with softmax probabilities."""
        logits = self.logits(x, batch_size=batch_size)
        if logits.ndim != 2:
            raise OnnxFileError("model_mismatch", f"model output has shape {logits.shape}")
        return top1(logits)


RUNTIMES = ("auto", "onnxruntime", "numpy")
"""Who runs an ONNX export: ONNX Runtime when installed (auto), or numpy (onnx_numpy.py)."""


def load_onnx_predictor(
    source: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    threads: int | None = None,
    max_bytes: int = DEFAULT_MAX_ONNX_BYTES,
    runtime: str = "auto",
) -> OnnxPredictor:
    """An `OnnxPredictor` for a sealed ONNX export; every problem is an `OnnxFileError`.

    `threads`: ONNX Runtime's intra-op threads (default: its own choice).
    `runtime`: `auto` takes ONNX Runtime where it is installed and numpy's runner
    (fedge's exports only) where it is not, so a small device needs no ONNX Runtime.
    """
    if runtime not in RUNTIMES:
        raise OnnxFileError("bad_runtime", f"{runtime!r}: use one of {', '.join(RUNTIMES)}")
    if runtime == "numpy" or (runtime == "auto" and not ort_available()):
        from fedge.common.onnx_numpy import load_numpy_predictor

        return load_numpy_predictor(source, max_bytes=max_bytes)
    data = read_onnx(source, max_bytes=max_bytes)
    try:
        import onnxruntime as ort
    except ImportError:
        raise OnnxFileError(
            "no_runtime", "ONNX Runtime is not installed: pip install onnxruntime, or run "
            "the file with numpy (--runtime numpy)"
        ) from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # int8 weights behind DequantizeLinear: ORT keeps such nodes for its QDQ fusions and
    # then dequantizes every weight on every run (0.63 ms against 0.31 ms per CNN image
    # here). With QDQ handling off, constant folding dequantizes them once at load;
    # memory is no worse, since each run held the float weights in its arena anyway.
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for bad graphs
        raise OnnxFileError("malformed", f"ONNX Runtime cannot load it: {e}") from None
    meta = dict(session.get_modelmeta().custom_metadata_map)
    info = onnx_info(meta, data)
    inputs = session.get_inputs()
    if len(inputs) != 1 or list(inputs[0].shape[1:]) != list(info.input_shape):
        raise OnnxFileError(
            "model_mismatch", f"graph input {[list(i.shape) for i in inputs]} does not take "
            f"[N, {', '.join(map(str, info.input_shape))}]"
        )
    return OnnxPredictor(session, info)


def onnx_info(meta: dict[str, str], data: bytes) -> OnnxInfo:
    """The checked metadata of an export (whichever runtime read it)."""
    if meta.get("file-format") != ONNX_FILE_FORMAT:
        raise OnnxFileError("unsupported", f"file format {meta.get('file-format', '')[:40]!r}")
    fmt = meta.get("format", "")
    if fmt not in ONNX_FORMATS:
        raise OnnxFileError("bad_metadata", f"format {fmt[:20]!r}")
    try:
        shape = json.loads(meta.get("input-shape", ""))
        labels = json.loads(meta.get("labels", "[]"))
    except (ValueError, RecursionError):
        raise OnnxFileError("bad_metadata", "input-shape or labels is not JSON") from None
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d > 0
                                                           for d in shape):
        raise OnnxFileError("bad_metadata", "input-shape is not a list of positive integers")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise OnnxFileError("bad_metadata", "labels is not a list of strings")
    return OnnxInfo(
        format=fmt,
        task=meta.get("task", ""),
        input_shape=tuple(shape),
        labels=tuple(labels),
        source_version=meta.get("source-version", ""),
        content_hash=meta.get("content-sha256", ""),
        size=len(data),
        metadata=meta,
    )

