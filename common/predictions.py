"""What every predictor shares, with no torch: input validation and top-1 from logits.

`fedge.common.inference` (torch, `.pb` exports) and `fedge.common.onnx_runtime`
(ONNX Runtime, `.onnx` exports) both validate inputs and answer with these,
so a device that only predicts imports this module and never torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class InputError(ValueError):
    """Inputs do not fit the model (shape, type, non-finite values); the message says how."""


@dataclass
class Predictions:
    """Top-1 class, its probability and the full probabilities for each input."""

    classes: np.ndarray  # int64 [N]
    scores: np.ndarray  # float32 [N]
    probabilities: np.ndarray  # float32 [N, classes]


def top1(logits: np.ndarray) -> Predictions:
    """Softmax probabilities and the top-1 class of each row of `logits` [N, classes]."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    classes = probs.argmax(axis=1).astype(np.int64)
    scores = probs[np.arange(len(classes)), classes].astype(np.float32)
    return Predictions(classes, scores, probs.astype(np.float32))


def prepare_inputs(x: Any, input_shape: Sequence[int]) -> np.ndarray:
    """Validate inputs against a model's input shape; float32 [N, *input_shape], C order.

    Accepts one example (exactly `input_shape`) or a batch (`[N, *input_shape]`),
    as nested lists or a numeric array. Refuses strings, booleans, nulls,
    ragged nesting, wrong shapes and NaN/Inf with an `InputError` that says
    what was expected.
    """
    shape = tuple(int(d) for d in input_shape)
    want = f"[N, {', '.join(map(str, shape))}] (or one example of {list(shape)})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", np.exceptions.VisibleDeprecationWarning)
            a = np.asarray(x)
    except (ValueError, TypeError, RecursionError, np.exceptions.VisibleDeprecationWarning):
        raise InputError(f"inputs are ragged or not numbers; expected {want}") from None
    if a.dtype.kind not in "fiu":
        what = {
            "b": "booleans",
            "U": "strings",
            "S": "bytes",
            "O": "non-numbers (null, mixed or ragged lists)",
        }.get(a.dtype.kind, f"dtype {a.dtype}")
        raise InputError(f"inputs must be numbers, got {what}; expected {want}")
    if a.shape == shape:
        a = a[None]
    if a.shape[1:] != shape or a.ndim != len(shape) + 1:
        raise InputError(f"inputs have shape {list(a.shape)}; expected {want}")
    with np.errstate(over="ignore"):  # beyond float32 becomes Inf, refused just below
        out = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(out).all():
        raise InputError("inputs hold NaN, Inf or values beyond float32")
    return out


class _Facts(Protocol):
    @property
    def input_shape(self) -> tuple[int, ...]: ...

    @property
    def labels(self) -> tuple[str, ...]: ...


class FileFacts:
    """What a predictor answers from its model file's metadata, whatever runs the graph."""

    info: _Facts

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.info.input_shape

    @property
    def labels(self) -> tuple[str, ...]:
        return self.info.labels

    def label(self, index: int) -> str:
        """The label of a class index, or the index as text when the file has no labels."""
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)

    def prepare(self, x: Any) -> np.ndarray:
        """Inputs as float32 [N, *input_shape]; see `prepare_inputs`."""
        return prepare_inputs(x, self.input_shape)
