"""`bench/onnx_bench.py` at a tiny size: the `onnx` object's shape and what it can claim."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from fedge.bench.onnx_bench import inference_install, onnx_measurements


def test_inference_only_install_has_no_torch() -> None:
    install = inference_install()
    assert not install["has_torch"] and "torch" not in install["by_package_mb"]
    assert "flwr" not in install["by_package_mb"] and "ray" not in install["by_package_mb"]
    # the small install: numpy runs the ONNX file, typer without rich
    assert {"numpy", "protobuf", "typer-slim", "fedge"} <= set(install["by_package_mb"])
    assert not {"onnxruntime", "rich", "pygments", "typer"} & set(install["by_package_mb"])
    assert install["missing"] == []
    parts = install["by_package_mb"].values()
    assert install["mb"] > 0 and abs(install["mb"] - sum(parts)) <= 0.05 * len(parts) + 0.1
    with_ort = inference_install("inference-onnxruntime")
    assert set(with_ort["by_package_mb"]) >= set(install["by_package_mb"]) | {"onnxruntime"}
    assert with_ort["mb"] > install["mb"] + with_ort["by_package_mb"]["onnxruntime"] - 0.2


def test_tiny_onnx_measurement(tmp_path: Path) -> None:
    result = onnx_measurements(images=300, train_examples=256, latency_calls=5,
                               cache_dir=tmp_path)
    for key in ("fp32_agreement", "int8_agreement"):
        assert 0.0 <= result[key] <= 1.0
    assert result["fp32_agreement"] >= 0.99  # same float graph: only rounding differs
    assert result["images"] == 300
    assert set(result["batch1_ms"]) == {"onnxruntime", "torch", "numpy"}
    assert result["numpy_runner"]["same_as_onnxruntime"]  # same top-1 on every image
    assert result["numpy_runner"]["fp32_agreement"] == result["fp32_agreement"]
    assert all(v > 0 for v in result["batch1_ms"].values())
    assert result["inference_only_installed_mb"] > 0 and not result["installed_has_torch"]
    assert result["file_bytes"]["onnx-int8"] < 0.3 * result["file_bytes"]["onnx"]
    assert set(result["checks"]) == {"fp32_agreement", "int8_agreement",
                                     "inference_only_installed_mb"}


def _script(name: str) -> ModuleType:
    """A module of scripts/ (not a package), loaded from its file."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arm64_size_script_installs_what_the_extras_name() -> None:
    """scripts/inference_install_size.py reads the extras from pyproject.toml: the same
    packages as the installed metadata the bench walks (nothing to download here)."""
    from fedge.bench.onnx_bench import _extra_requirements, _name

    script = _script("inference_install_size")
    for extra in script.EXTRAS:
        assert sorted(_name(r) for r in script.requirements(extra)) == sorted(
            _extra_requirements(extra))
    assert "onnxruntime" not in {_name(r) for r in script.requirements("inference")}


def test_the_emulated_runs_inference_size_is_the_one_reported(tmp_path: Path) -> None:
    """pi-emulate's files for the inference-only venv become the `arm64` object's part, and
    `fedge bench edge --arm64` reports that size (with its check), this machine's beside it."""
    import json

    from fedge.bench.edge_bench import on_arm64

    check = _script("pi_emulate_check")
    assert check._inference_only(tmp_path) == {}  # no inference-only run: nothing claimed
    (tmp_path / "inference-only.json").write_text(json.dumps(
        {"installed_mb": 98.5, "torch_flower_or_onnxruntime_installed": 0}))
    same = {"examples": 4, "same_labels": 4, "match": True}
    (tmp_path / "compare-onnx.json").write_text(json.dumps(same))
    (tmp_path / "compare-onnx-torch.json").write_text(json.dumps({**same, "same_labels": 3,
                                                                  "match": False}))
    arm64 = check._inference_only(tmp_path)
    part = arm64["inference_only"]
    assert part["predictions_match_x86"] and part["agreement_with_torch_int8"] == 0.75
    onnx = {"inference_only_installed_mb": 113.0, "checks": {"inference_only_installed_mb": False}}
    on_arm64(onnx, arm64)
    assert onnx["inference_only_installed_mb"] == 98.5
    assert onnx["inference_only_installed_mb_here"] == 113.0
    assert onnx["checks"]["inference_only_installed_mb"] is True
    part["installed_mb"] = 100.1
    on_arm64(onnx, arm64)
    assert onnx["checks"]["inference_only_installed_mb"] is False
