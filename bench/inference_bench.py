"""`fedge bench inference`: export sizes, accuracy and CPU latency of each format.

The model is the FedAvg CNN on Fashion-MNIST after a short central training
run (`trained_cnn`: 1 epoch on the first 4,000 training images, SGD with
momentum; about 20 s on two cores, cached in the temp folder by its settings).
Each format is exported, loaded back through the device's loader
(`common/inference.py`) and run on the whole test set (10,000 images): size
against the fp32 file, accuracy, and top-1 agreement with fp32.

Latency is per call of `Predictor.predict` (validation included) at batch 1
and 64, for fp32, int8 with int8 Linear kernels (what `fedge predict` runs)
and int8 dequantized to float. Variants are timed interleaved, one call each
in turn, so a busy machine slows them alike; the median is reported with the
10th percentile. `checks` holds the issue's acceptance bars.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedge.common.datasets import FASHION_MNIST_LABELS, load_idx
from fedge.common.export import EXPORT_FORMATS, export_model, parse_model_file
from fedge.common.inference import Predictor, load_predictor, weight_bytes

TRAIN = {"examples": 4000, "epochs": 1, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "seed": 0}
BARS = {
    "int8_size_ratio": 0.26,
    "int8_agreement": 0.99,
    "int8_accuracy_drop": 0.005,
    "int4_size_ratio": 0.14,
    "int4_accuracy_drop": 0.02,
}
INPUT_SHAPE = (1, 28, 28)


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "fedge-bench-cache"


def trained_cnn(cache_dir: Path | None = None, **overrides: Any) -> dict[str, np.ndarray]:
    """FedAvg CNN weights after the short training run `TRAIN` (with `overrides`).

    Cached as `.npz` (read back with allow_pickle=False) under a name hashing
    the settings, so a test session or a second bench run skips training.
    """
    from fedge.common.arrays import model_to_arrays
    from fedge.common.models import FedAvgCNN
    from fedge.common.training import train

    settings = {**TRAIN, **overrides}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"fedavg-cnn-fmnist-{key}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    x, y = load_idx(split="train")
    n = int(settings["examples"])
    model = FedAvgCNN(seed=int(settings["seed"]))
    train(
        model,
        x[:n],
        y[:n],
        epochs=int(settings["epochs"]),
        batch_size=int(settings["batch_size"]),
        lr=float(settings["lr"]),
        momentum=float(settings["momentum"]),
        seed=int(settings["seed"]),
    )
    arrays = model_to_arrays(model)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    return arrays


def export_all(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """Every export format of the CNN, as file bytes."""
    return {
        fmt: export_model(
            arrays,
            fmt=fmt,
            task="fashion-mnist",
            input_shape=INPUT_SHAPE,
            labels=FASHION_MNIST_LABELS,
            source_version="bench",
        )
        for fmt in EXPORT_FORMATS
    }


def accuracy_table(
    files: dict[str, bytes], x: np.ndarray, y: np.ndarray, *, batch_size: int = 256
) -> dict[str, dict[str, Any]]:
    """Per variant: file bytes, size ratio, accuracy, agreement with fp32, resident weights."""
    variants = [(fmt, "auto") for fmt in files]
    if "int8" in files:
        variants.append(("int8", "float"))
    out: dict[str, dict[str, Any]] = {}
    reference: np.ndarray | None = None
    fp32_bytes = len(files["fp32"])
    for fmt, kernels in variants:
        t0 = time.perf_counter()
        predictor = load_predictor(files[fmt], kernels=kernels)
        load_s = time.perf_counter() - t0
        classes = predictor.predict(x, batch_size=batch_size).classes
        if reference is None:
            reference = classes
        name = fmt if kernels == "auto" else f"{fmt}-{kernels}"
        out[name] = {
            "format": fmt,
            "kernels": predictor.kernels,
            "file_bytes": len(files[fmt]),
            "size_ratio": round(len(files[fmt]) / fp32_bytes, 4),
            "accuracy": float((classes == y).mean()),
            "agreement_with_fp32": float((classes == reference).mean()),
            "weight_bytes_in_memory": weight_bytes(predictor.model),
            "load_s": round(load_s, 4),
        }
    return out


def latency(
    predictors: dict[str, Predictor],
    x: np.ndarray,
    *,
    batch_sizes: tuple[int, ...] = (1, 64),
    calls: dict[int, int] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Interleaved latency of `predict` per variant and batch size (ms: median, p10)."""
    calls = calls or {1: 300, 64: 40}
    out: dict[str, dict[str, dict[str, float]]] = {name: {} for name in predictors}
    for bs in batch_sizes:
        xb = np.ascontiguousarray(x[:bs])
        times: dict[str, list[float]] = {name: [] for name in predictors}
        for p in predictors.values():  # warm-up
            for _ in range(3):
                p.predict(xb, batch_size=bs)
        names = list(predictors)
        for i in range(calls.get(bs, 20)):
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                t0 = time.perf_counter()
                predictors[name].predict(xb, batch_size=bs)
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            ts.sort()
            out[name][f"batch_{bs}"] = {
                "median_ms": round(statistics.median(ts) * 1000, 3),
                "p10_ms": round(ts[len(ts) // 10] * 1000, 3),
                "calls": len(ts),
            }
    return out


def checks(table: dict[str, dict[str, Any]], lat: dict[str, Any] | None) -> dict[str, bool]:
    """The issue's acceptance bars, each True or False."""
    fp32, int8, int4 = table["fp32"], table["int8"], table["int4"]
    out = {
        "int8_size_ratio_le_0.26": int8["size_ratio"] <= BARS["int8_size_ratio"],
        "int8_agreement_ge_0.99": int8["agreement_with_fp32"] >= BARS["int8_agreement"],
        "int8_accuracy_within_0.5pt": fp32["accuracy"] - int8["accuracy"]
        <= BARS["int8_accuracy_drop"],
        "int4_size_ratio_le_0.14": int4["size_ratio"] <= BARS["int4_size_ratio"],
        "int4_accuracy_within_2pt": fp32["accuracy"] - int4["accuracy"]
        <= BARS["int4_accuracy_drop"],
    }
    if lat is not None:
        out["int8_not_slower_than_fp32_batch_64"] = (
            lat["int8"]["batch_64"]["median_ms"] <= lat["fp32"]["batch_64"]["median_ms"]
        )
    return out


def run(
    *,
    cache_dir: Path | None = None,
    test_examples: int | None = None,
    calls: dict[int, int] | None = None,
    threads: int | None = None,
    train: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole bench as one JSON-ready dict (`threads`: torch CPU threads, default torch's;
    `train`: overrides of `TRAIN`, e.g. fewer examples for a quick run)."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    settings = {**TRAIN, **(train or {})}
    arrays = trained_cnn(cache_dir, **(train or {}))
    train_s = time.perf_counter() - t0
    x, y = load_idx(split="test")
    if test_examples is not None:
        x, y = x[:test_examples], y[:test_examples]
    files = export_all(arrays)
    for data in files.values():
        parse_model_file(data)  # every export reads back
    table = accuracy_table(files, x, y)
    predictors = {
        "fp32": load_predictor(files["fp32"]),
        "int8": load_predictor(files["int8"], kernels="auto"),
        "int8-float": load_predictor(files["int8"], kernels="float"),
    }
    lat = latency(predictors, x, calls=calls)
    return {
        "model": "fedavg-cnn",
        "task": "fashion-mnist",
        "parameters": int(sum(a.size for a in arrays.values())),
        "training": {**settings, "seconds_or_cached": round(train_s, 2)},
        "test_examples": len(y),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "int8_kernels": predictors["int8"].kernels,
        "formats": table,
        "latency": lat,
        "checks": checks(table, lat),
    }


def main(json_output: bool = False, cache: bool = True, threads: int | None = None) -> None:
    result = run(cache_dir=default_cache_dir() if cache else None, threads=threads)
    if json_output:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"fedge inference bench ({result['test_examples']} test images)")
    for col in ("variant", "kernels", "bytes", "ratio", "accuracy", "agree fp32", "weights mem"):
        table.add_column(col, justify="left" if col in ("variant", "kernels") else "right")
    for name, r in result["formats"].items():
        table.add_row(
            name,
            r["kernels"],
            f"{r['file_bytes']:,}",
            f"{r['size_ratio']:.4f}",
            f"{r['accuracy']:.4f}",
            f"{r['agreement_with_fp32']:.4f}",
            f"{r['weight_bytes_in_memory']:,}",
        )
    console.print(table)
    lat = Table(title=f"latency of predict, ms (median / p10), {result['torch_threads']} threads")
    lat.add_column("variant")
    for bs in ("batch_1", "batch_64"):
        lat.add_column(bs, justify="right")
    for name, r in result["latency"].items():
        lat.add_row(name, *(f"{r[b]['median_ms']:.2f} / {r[b]['p10_ms']:.2f}" for b in r))
    console.print(lat)
    for name, ok in result["checks"].items():
        console.print(f"{'PASS' if ok else 'FAIL'} {name}")
