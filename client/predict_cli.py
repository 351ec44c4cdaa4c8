"""`fedge predict --model FILE INPUT...`: run an export on this CPU.

Inputs are `.npy` files (read with `allow_pickle=False`) or `.json` files
holding `{"inputs": [...]}` or a bare list, as `POST /v1/predict` takes; each
is one example (the task's input shape, e.g. [1, 28, 28]) or a batch of them.
Values are what the task's model takes (Fashion-MNIST: float pixels in [0, 1]).

Runtimes, chosen by the file: a `.onnx` export (`fedge export --format
onnx|onnx-int8`) runs with ONNX Runtime where it is installed, otherwise with
numpy (`fedge.common.onnx_numpy`; `--kernels onnxruntime|numpy` picks one),
and never imports torch, so a device installed with `fedge[inference]`
predicts without PyTorch; a `.pb` export runs with torch (`fedge.common.inference`).

A device that personalizes keeps its personal head next to its model file
(`<data>/personal-head.npz`, written by `fedge.client.personal`); `--personal
auto` (the default) predicts with it when it is there (`.pb` exports), `--personal
none` with the global model alone, `--personal FILE` with that file.

Only typer is imported at the top; the runtime when the command runs.
A refused model file or unusable input is one line on stderr and exit code 1,
never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

EXIT_REFUSED = 1
MAX_INPUT_FILE_BYTES = 1 << 30


def _fail(message: str) -> typer.Exit:
    typer.echo(f"fedge predict: {message}", err=True)
    return typer.Exit(EXIT_REFUSED)


def _read_input(path: Path) -> Any:
    """The raw inputs of one file (validated against the model later)."""
    import numpy as np

    try:
        size = path.stat().st_size
    except OSError as e:
        raise _fail(f"{path}: cannot read ({e.strerror or e})") from None
    if size > MAX_INPUT_FILE_BYTES:
        raise _fail(f"{path}: {size} bytes is over the {MAX_INPUT_FILE_BYTES} byte limit")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".json":
            doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
            return doc["inputs"] if isinstance(doc, dict) and "inputs" in doc else doc
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _fail(f"{path}: not a readable {suffix[1:]} file ({e})") from None
    raise _fail(f"{path}: unknown input type {suffix or '(none)'!r}; use .npy or .json")


def _use_personal(predictor: Any, model: Path, personal: str) -> Path | None:
    """Load the device's personal part into the predictor's model; the file used, or None."""
    from fedge.common.personal import PersonalError, apply_personal, load_personal, personal_path

    if personal == "none":
        return None
    path = personal_path(model) if personal == "auto" else Path(personal)
    if personal == "auto" and not path.is_file():
        return None
    try:
        apply_personal(predictor.model, load_personal(path))
    except PersonalError as e:
        raise _fail(f"personal model {path}: {e}") from None
    predictor.model.eval()
    return path


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _load_onnx(model: Path, task: str | None, kernels: str, threads: int | None) -> Any:
    """An ONNX predictor (ONNX Runtime's or numpy's); torch is never imported on this path."""
    from fedge.common.onnx_file import OnnxFileError
    from fedge.common.onnx_runtime import RUNTIMES, load_onnx_predictor

    if task is not None:
        raise _fail("--task is for .pb exports; an .onnx file carries its graph")
    if kernels not in RUNTIMES:
        raise _fail(f"--kernels for an .onnx file is one of {', '.join(RUNTIMES)}, "
                    f"not {kernels!r}")
    try:
        return load_onnx_predictor(model, threads=threads, runtime=kernels)
    except OnnxFileError as e:
        raise _fail(f"refused model file {model} ({e.reason}): {e.detail}") from None


def _load_torch(model: Path, task: str | None, kernels: str, threads: int | None) -> Any:
    """The torch predictor of a `.pb` export (`fedge.common.inference`)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise _fail(f"{model}: a .pb export needs PyTorch, which this device does not have; "
                    "fetch the model as onnx or onnx-int8 (.onnx) to run it without torch")
    from fedge.common.export import ModelFileError
    from fedge.common.inference import KERNELS, load_predictor

    if kernels not in KERNELS:
        raise _fail(f"--kernels must be one of {', '.join(KERNELS)}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        return load_predictor(model, task=task, kernels=kernels)
    except ModelFileError as e:
        raise _fail(f"refused model file {model} ({e.reason}): {e.detail}") from None


def predict_command(
    model: Path = typer.Option(..., "--model", help="Export file (fedge export): .pb runs "
                               "with torch, .onnx with ONNX Runtime or numpy (no torch)."),
    inputs: list[Path] = typer.Argument(..., help=".npy or .json files: one example or a batch."),
    task: str | None = typer.Option(
        None,
        "--task",
        help="Task to build the model with; needed (and trusted) for a "
        "user task 'module:object'. Default: the built-in task the file names.",
    ),
    kernels: str = typer.Option(
        "auto",
        "--kernels",
        help="auto | int8 | float: int8 Linear kernels for int8 .pb files (auto: when torch "
        "has them); for .onnx files auto | onnxruntime | numpy (auto: ONNX Runtime if installed).",
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Examples per model call."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads (torch's "
                                       "or ONNX Runtime's)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
    personal: str = typer.Option(
        "auto", "--personal",
        help="auto (the device's personal-head.npz next to the model file, when there) | "
        "none (the global model) | a personal-part file.",
    ),
) -> None:
    """Predict with a model file on this CPU; refuses a damaged or tampered file."""
    from fedge.common.onnx_file import is_onnx_path
    from fedge.common.predictions import InputError

    personal_file: Path | None = None
    if is_onnx_path(str(model)):
        if personal not in ("auto", "none"):
            raise _fail("--personal FILE needs a .pb export: an .onnx file carries its graph")
        predictor = _load_onnx(model, task, kernels, threads)
    else:
        predictor = _load_torch(model, task, kernels, threads)
        personal_file = _use_personal(predictor, model, personal)
    rows: list[dict[str, Any]] = []
    for path in inputs:
        try:
            x = predictor.prepare(_read_input(path))
            result = predictor.predict(x, batch_size=batch_size)
        except InputError as e:
            raise _fail(f"{path}: {e}") from None
        for i, (c, s) in enumerate(zip(result.classes, result.scores, strict=True)):
            rows.append(
                {
                    "input": str(path),
                    "index": i,
                    "class": int(c),
                    "label": predictor.label(int(c)),
                    "score": round(float(s), 6),
                }
            )
    info = predictor.info
    if json_output:
        doc = {
            "model": {
                "file": str(model),
                "format": info.format,
                "task": info.task,
                "source_version": info.source_version,
                "content_sha256": info.content_hash,
                "kernels": predictor.kernels,
                "personal": None if personal_file is None else str(personal_file),
            },
            "predictions": rows,
        }
        sys.stdout.write(json.dumps(doc) + "\n")
        return
    for r in rows:
        typer.echo(f"{r['input']}[{r['index']}]\t{r['label']}\t{r['score']:.3f}")
