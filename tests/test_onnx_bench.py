"""`bench/onnx_bench.py` at a tiny size: the `onnx` object's shape and what it can claim."""

from __future__ import annotations

from pathlib import Path

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


def test_arm64_size_script_installs_what_the_extras_name() -> None:
    """scripts/inference_install_size.py reads the extras from pyproject.toml: the same
    packages as the installed metadata the bench walks (nothing to download here)."""
    import importlib.util

    from fedge.bench.onnx_bench import _extra_requirements, _name

    spec = importlib.util.spec_from_file_location(
        "inference_install_size",
        Path(__file__).resolve().parent.parent / "scripts" / "inference_install_size.py")
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for extra in script.EXTRAS:
        assert sorted(_name(r) for r in script.requirements(extra)) == sorted(
            _extra_requirements(extra))
    assert "onnxruntime" not in {_name(r) for r in script.requirements("inference")}
