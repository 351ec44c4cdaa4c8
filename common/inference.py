"""CPU inference from an export file: the task's model with the file's weights, in batches.

int8 files run their Linear layers with int8 kernels (torch's dynamic
quantization: int8 weights, activations quantized per batch on the fly),
built from the file's own int8 values and per-channel scales, so nothing is
re-quantized; convolutions and everything else run in float with weights
dequantized once at load. docs/models.md has the measurements behind this
choice: on the FedAvg CNN it is as fast or faster than fp32 at batch 1 and 64
and holds the Linear weights in a quarter of the memory. Where torch's
quantized engine is missing the loader falls back to dequantized weights
(`kernels="auto"`), so a file always runs. int4 and fp16 files are
dequantized to float32 at load (no int4 CPU kernels in torch).

A file names its task; only fedge's built-in tasks are resolved from that
name, because resolving `module:object` imports code: the caller passes a
user task explicitly (`task=`, `fedge predict --task`) to trust it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from fedge.common.export import (
    DEFAULT_MAX_MODEL_BYTES,
    ModelFile,
    ModelFileError,
    parse_model_file,
    read_model_file,
)
from fedge.common.predictions import FileFacts, InputError, Predictions, prepare_inputs, top1
from fedge.common.task import BUILTIN_TASKS, Task, TaskError, resolve_task

__all__ = ["InputError", "Predictions", "Predictor", "load_predictor", "prepare_inputs"]

KERNELS = ("auto", "int8", "float")
DEFAULT_BATCH = 64




class Predictor(FileFacts):
    """A loaded model ready to predict; holds no copy of the file's arrays."""

    def __init__(self, model: nn.Module, info: ModelFile, kernels: str) -> None:
        self.model = model.eval()
        self.info = info
        self.kernels = kernels  # "int8" (int8 Linear kernels) or "float"


    @torch.inference_mode()
    def logits(self, x: Any, *, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
        """Raw model outputs for validated inputs, computed `batch_size` examples at a time."""
        xs = self.prepare(x)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        outs = [
            self.model(torch.from_numpy(xs[i : i + batch_size])).float().numpy()
            for i in range(0, len(xs), batch_size)
        ]
        if not outs:
            return np.zeros((0, max(1, len(self.labels))), np.float32)
        return np.concatenate(outs)

    def predict(self, x: Any, *, batch_size: int = DEFAULT_BATCH) -> Predictions:
        """Top-1 predictions with softmax probabilities."""
        logits = self.logits(x, batch_size=batch_size)
        if logits.ndim != 2:
            raise ModelFileError("model_mismatch", f"model output has shape {logits.shape}")
        return top1(logits)



# ---------------------------------------------------------------- loading


def load_predictor(
    source: ModelFile | bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    task: Task | str | None = None,
    kernels: str = "auto",
    max_bytes: int = DEFAULT_MAX_MODEL_BYTES,
) -> Predictor:
    """A Predictor for an export (a path, its bytes, or a parsed `ModelFile`).

    `kernels`: "auto" runs int8 files' Linear layers with int8 kernels when
    torch can, "int8" insists (ModelFileError if it cannot), "float" always
    dequantizes. `task` names or gives the task to trust (needed for user
    tasks; a built-in named by the file is resolved without it). Every problem
    with the file is a `ModelFileError`.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
    if isinstance(source, ModelFile):
        mf = source
    elif isinstance(source, bytes | bytearray | memoryview):
        mf = parse_model_file(source, max_bytes=max_bytes)
    else:
        mf = read_model_file(source, max_bytes=max_bytes)
    the_task = _task_for(mf, task)
    try:
        model = _load_weights(the_task.make_model(), mf.arrays)
    except (ValueError, TaskError) as e:
        raise ModelFileError("model_mismatch", f"task {the_task.name!r}: {e}") from None
    used = "float"
    if kernels != "float" and mf.int8_rows:
        swapped = _int8_linear(model, mf) if int8_kernels_available() else []
        if swapped and not _runs(model, mf.input_shape):
            _put_back(model, swapped)  # e.g. a forward that reads `fc.weight` itself
            swapped = []
        if swapped:
            used = "int8"
        elif kernels == "int8":
            raise ModelFileError("unsupported", "no int8 Linear kernels for this model or CPU")
    elif kernels == "int8":
        raise ModelFileError("unsupported", f"a {mf.format} file has no int8 weights")
    info = dataclasses.replace(mf, arrays={}, int8_rows={})
    return Predictor(model, info, used)


def _load_weights(model: nn.Module, arrays: dict[str, np.ndarray]) -> nn.Module:
    """Load `arrays` into `model`: names and shapes must match exactly.

    `fedge.common.arrays.arrays_to_model` does the same but imports Flower,
    a second's start-up on a small device that only predicts.
    """
    state = model.state_dict()
    missing = [k for k in state if k not in arrays]
    unexpected = [k for k in arrays if k not in state]
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    new_state = {}
    for name, ref in state.items():
        a = arrays[name]
        if tuple(a.shape) != tuple(ref.shape):
            raise ValueError(f"{name!r}: the model has {tuple(ref.shape)}, the file {a.shape}")
        new_state[name] = torch.from_numpy(np.array(a, copy=True)).to(ref.dtype)
    model.load_state_dict(new_state, strict=True)
    return model


def _task_for(mf: ModelFile, task: Task | str | None) -> Task:
    """The task to build the model with: the caller's, or a built-in the file names."""
    try:
        if task is not None:
            the_task = resolve_task(task)
        elif ":" in mf.task:
            raise ModelFileError(
                "untrusted_task",
                f"the file's task {mf.task[:80]!r} is user code; name it explicitly "
                "(--task / task=) to import it",
            )
        else:
            the_task = resolve_task(mf.task)
    except TaskError as e:
        known = ", ".join(sorted(BUILTIN_TASKS))
        raise ModelFileError("unknown_task", f"{e} (built-ins: {known})") from None
    if the_task.input_shape and tuple(the_task.input_shape) != mf.input_shape:
        raise ModelFileError(
            "task_mismatch",
            f"task {the_task.name!r} takes {tuple(the_task.input_shape)}, "
            f"the file says {mf.input_shape}",
        )
    return the_task


def int8_kernels_available() -> bool:
    """True if this torch build has dynamic int8 Linear kernels for this CPU."""
    try:
        import torch.ao.nn.quantized.dynamic
    except ImportError:
        return False
    engines = torch.backends.quantized.supported_engines
    return any(e in engines for e in ("x86", "fbgemm", "qnnpack", "onednn"))


def _prefer_qnnpack_on_arm() -> None:
    """On ARM, pack and run int8 layers with QNNPACK, the engine built for ARM CPUs.

    torch 2.6's aarch64 build defaults to oneDNN, whose dynamic int8 Linear
    gave the same class for every input of the CNN's int8 export on an
    emulated arm64 device (scripts/pi-emulate), where QNNPACK matched x86
    label for label. Where QNNPACK cannot start, packing fails and the
    caller keeps the float layers.
    """
    if platform.machine().lower() in ("aarch64", "arm64") and (
        "qnnpack" in torch.backends.quantized.supported_engines
    ):
        torch.backends.quantized.engine = "qnnpack"


def _int8_linear(model: nn.Module, mf: ModelFile) -> list[tuple[str, nn.Module]]:
    """Swap Linear layers stored as per-channel int8 for dynamic int8 ones.

    Returns the (name, original layer) pairs replaced, so a caller can put them back.
    """
    from torch.ao.nn.quantized import dynamic as nnqd

    _prefer_qnnpack_on_arm()

    swaps = []
    for name, module in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if type(module) is nn.Linear and key in mf.int8_rows:
            values, scales = mf.int8_rows[key]
            if values.shape == tuple(module.weight.shape):
                swaps.append((name, module, values, scales))
    made: list[tuple[str, nn.Module]] = []
    try:
        with warnings.catch_warnings():
            # torch 2.13 marks quantized tensors deprecated (moving to torchao); still supported
            warnings.simplefilter("ignore")
            for name, module, values, scales in swaps:
                qweight = torch._make_per_channel_quantized_tensor(
                    torch.from_numpy(values.copy()),
                    torch.from_numpy(scales.astype(np.float64)),
                    torch.zeros(len(scales), dtype=torch.int64),
                    0,
                )
                layer = nnqd.Linear(
                    module.in_features,
                    module.out_features,
                    dtype=torch.qint8,
                    bias_=module.bias is not None,
                )
                bias = None if module.bias is None else module.bias.detach().clone()
                layer.set_weight_bias(qweight, bias)
                made.append((name, layer))
    except (RuntimeError, AttributeError, TypeError, NotImplementedError):
        return []  # this torch cannot build them: keep every layer in float
    originals: list[tuple[str, nn.Module]] = [(name, module) for name, module, _, _ in swaps]
    _put_back(model, made)
    return originals


def _put_back(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
    """Set each named submodule to the given layer."""
    for name, layer in layers:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer)


def _runs(model: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether the model gives finite outputs for one example of zeros."""
    try:
        with torch.inference_mode():
            out = model(torch.zeros((1, *input_shape)))
        return isinstance(out, torch.Tensor) and bool(torch.isfinite(out).all())
    except (RuntimeError, AttributeError, TypeError, ValueError, NotImplementedError):
        return False


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights the model holds in memory (int8 packed weights counted as int8)."""
    total = 0
    for t in model.state_dict().values():
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
        elif isinstance(t, tuple):  # packed dynamic Linear params: (weight, bias)
            total += sum(x.numel() * x.element_size() for x in t if isinstance(x, torch.Tensor))
    return total
