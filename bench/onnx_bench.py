"""The `onnx` object of `fedge bench edge --json`: inference without torch, measured.

- **Agreement**: the FedAvg CNN after the short central training run of
  `inference_bench.trained_cnn` (cached) is exported as fp32 and int8 `.pb`
  files and as `onnx` / `onnx-int8` built from them; top-1 classes of ONNX
  Runtime and of `fedge predict`'s torch loader (`load_predictor`, default
  kernels: int8 Linear kernels for the int8 file) are compared on the
  Fashion-MNIST test images (10,000 by default).
- **Batch-1 latency**: median ms per `predict` call of one image, ONNX
  Runtime beside torch, both on one thread (a Pi-class core; also what keeps
  a shared machine's figures comparable), interleaved (`inference_bench.latency`).
- **Installed size of an inference-only device**: the packages a fresh venv
  gets from `pip install --no-deps fedge` plus the `inference` extra (numpy
  runs the ONNX file), and plus `inference-onnxruntime` (ONNX Runtime runs
  it), summed from the installed distributions' RECORD files (the extra's
  requirements and everything they require, as installed here; pip and
  setuptools, which come with Python's venv, left out) plus fedge's own
  modules. Offline and repeatable, on this machine's platform; the arm64
  figures come from the aarch64 wheels themselves (`scripts/inference-install-size`,
  bench/results/inference-install-arm64.json).
- **The numpy runner** (`fedge.common.onnx_numpy`, what a device without ONNX
  Runtime uses): its top-1 agreement with `fedge predict`'s torch loader on
  the same images and its batch-1 latency, beside ONNX Runtime's.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import platform
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedge.bench.inference_bench import INPUT_SHAPE, latency, trained_cnn
from fedge.common.datasets import FASHION_MNIST_LABELS, load_idx
from fedge.common.export import export_model, parse_model_file

BARS = {"fp32_agreement": 0.995, "int8_agreement": 0.99, "inference_only_installed_mb": 100.0}
PYTHON_OWN = {"pip", "setuptools", "wheel"}
"""What `python -m venv` puts in a venv by itself: 'Python's own packages'."""
EXTRA = "inference"
EXTRA_ORT = "inference-onnxruntime"
SAME_FILES: dict[str, tuple[str, frozenset[str]]] = {
    "typer-slim": ("typer", frozenset({"rich", "shellingham"})),
}
"""A requirement measured by the files of another installed distribution: typer-slim
ships the `typer` package that typer ships (same version line), with rich and shellingham
optional instead of required. The coordinator's set-up installs typer (Flower requires it),
and both in one venv would write the same files."""


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _applies(requirement: str, extra: str = "") -> bool:
    """Whether a requirement's marker holds here (for `extra`, or no extra)."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    return req.marker is None or req.marker.evaluate({"extra": extra})


def _dist_bytes(dist: md.Distribution) -> int:
    total = 0
    for f in dist.files or ():
        with contextlib.suppress(OSError):
            total += Path(str(dist.locate_file(f))).stat().st_size
    return total


def _fedge_own_bytes() -> int:
    """fedge's own modules (an editable install's RECORD lists none of them)."""
    import fedge
    import fedge.bench
    import fedge.client
    import fedge.common
    import fedge.server
    import fedge.v1

    total, seen = 0, set()
    for pkg in (fedge, fedge.common, fedge.v1, fedge.client, fedge.server, fedge.bench):
        for root in pkg.__path__:
            for f in Path(root).glob("*.py"):
                if f.resolve() not in seen:
                    seen.add(f.resolve())
                    total += f.stat().st_size
    return total


def _extra_requirements(extra: str) -> list[str]:
    """The names an extra of fedge adds, with the extras it names (`fedge[other]`) expanded."""
    names: list[str] = []
    for r in md.requires("fedge") or []:
        if not _applies(r, extra) or _applies(r, ""):
            continue
        name = _name(r)
        if name == "fedge":
            inner = re.search(r"\[([^\]]+)\]", r)
            for other in (inner.group(1).split(",") if inner else []):
                names += _extra_requirements(other.strip())
        else:
            names.append(name)
    return names


def inference_install(extra: str = EXTRA) -> dict[str, Any]:
    """Bytes per distribution an inference-only device installs (the extra's closure)."""
    wanted = _extra_requirements(extra)
    if not wanted:
        raise RuntimeError(f"fedge's installed metadata has no [{extra}] extra: pip install -e .")
    sizes: dict[str, int] = {}
    missing: list[str] = []
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name in sizes or name in PYTHON_OWN or name in missing:
            continue
        measured_as, optional = SAME_FILES.get(name, (name, frozenset()))
        try:
            dist = md.distribution(measured_as)
        except md.PackageNotFoundError:
            missing.append(name)
            continue
        sizes[name] = _dist_bytes(dist)
        todo += [n for n in (_name(r) for r in (dist.requires or []) if _applies(r))
                 if n not in optional]
    sizes["fedge"] = _fedge_own_bytes()
    return {
        "mb": round(sum(sizes.values()) / 1e6, 1),
        "by_package_mb": {k: round(v / 1e6, 1) for k, v in sorted(sizes.items(),
                                                                  key=lambda kv: -kv[1])},
        "missing": sorted(missing),
        "has_torch": "torch" in sizes,
    }


def onnx_measurements(
    *,
    images: int = 10_000,
    train_examples: int | None = None,
    latency_calls: int = 300,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The `onnx` object: agreement, installed size, batch-1 latency (see the module doc)."""
    import torch

    from fedge.common.inference import load_predictor
    from fedge.common.onnx_export import to_onnx
    from fedge.common.onnx_runtime import load_onnx_predictor

    cache = cache_dir or Path(tempfile.gettempdir()) / "fedge-bench-cache"
    overrides = {"examples": train_examples} if train_examples else {}
    arrays = trained_cnn(cache, **overrides)
    x, y = load_idx(split="test")
    x, y = x[:images], y[:images]
    pb = {fmt: export_model(arrays, fmt=fmt, task="fashion-mnist", input_shape=INPUT_SHAPE,
                            labels=FASHION_MNIST_LABELS, source_version="bench")
          for fmt in ("fp32", "int8")}
    onnx_files = {"onnx": to_onnx(parse_model_file(pb["fp32"]), "onnx"),
                  "onnx-int8": to_onnx(parse_model_file(pb["int8"]), "onnx-int8")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch_p = {fmt: load_predictor(data) for fmt, data in pb.items()}
        ort_p = {fmt: load_onnx_predictor(data, threads=1, runtime="onnxruntime")
                 for fmt, data in onnx_files.items()}
        np_p = {f"numpy-{fmt}": load_onnx_predictor(data, runtime="numpy")
                for fmt, data in onnx_files.items()}
        classes = {name: p.predict(x, batch_size=256).classes
                   for name, p in [*torch_p.items(), *ort_p.items(), *np_p.items()]}
        with _one_blas_thread():
            timed = latency({"onnxruntime": ort_p["onnx"], "torch": torch_p["fp32"],
                             "numpy": np_p["numpy-onnx"],
                             "onnxruntime_int8": ort_p["onnx-int8"],
                             "torch_int8": torch_p["int8"], "numpy_int8": np_p["numpy-onnx-int8"]},
                            x, batch_sizes=(1,), calls={1: latency_calls})
    finally:
        torch.set_num_threads(threads)
    install, install_ort = inference_install(EXTRA), inference_install(EXTRA_ORT)
    ms = {name: t["batch_1"]["median_ms"] for name, t in timed.items()}

    def agree(a: str, b: str) -> float:
        return float((classes[a] == classes[b]).mean())

    result = {
        "fp32_agreement": agree("onnx", "fp32"),
        "int8_agreement": agree("onnx-int8", "int8"),
        "inference_only_installed_mb": install["mb"],
        "batch1_ms": {"onnxruntime": ms["onnxruntime"], "torch": ms["torch"],
                      "numpy": ms["numpy"]},
        "batch1_ms_int8": {"onnxruntime": ms["onnxruntime_int8"], "torch": ms["torch_int8"],
                           "numpy": ms["numpy_int8"]},
        "numpy_runner": {"fp32_agreement": agree("numpy-onnx", "fp32"),
                         "int8_agreement": agree("numpy-onnx-int8", "int8"),
                         "same_as_onnxruntime": agree("numpy-onnx", "onnx") == 1.0
                         and agree("numpy-onnx-int8", "onnx-int8") == 1.0},
        "images": len(x),
        "accuracy": {name: round(float((c == y).mean()), 4) for name, c in classes.items()},
        "file_bytes": {**{k: len(v) for k, v in pb.items()},
                       **{k: len(v) for k, v in onnx_files.items()}},
        "torch_int8_kernels": torch_p["int8"].kernels,
        "threads": 1,
        "installed_by_package_mb": install["by_package_mb"],
        "installed_has_torch": install["has_torch"] or install_ort["has_torch"],
        "installed_missing": install["missing"],
        "inference_only_installed_mb_with_onnxruntime": install_ort["mb"],
        "installed_platform": platform.machine(),
    }
    result["checks"] = {
        "fp32_agreement": result["fp32_agreement"] >= BARS["fp32_agreement"]
        and result["numpy_runner"]["fp32_agreement"] >= BARS["fp32_agreement"],
        "int8_agreement": result["int8_agreement"] >= BARS["int8_agreement"]
        and result["numpy_runner"]["int8_agreement"] >= BARS["int8_agreement"],
        "inference_only_installed_mb": install["mb"] <= BARS["inference_only_installed_mb"]
        and not result["installed_has_torch"] and not install["missing"],
    }
    return result


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """numpy's BLAS on one thread while latency is timed, as torch and ONNX Runtime are."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn brings it; without it, BLAS keeps its default
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


if __name__ == "__main__":
    import json
    import sys

    sys.stdout.write(json.dumps(onnx_measurements(), indent=1) + "\n")
