"""`bench/onnx_bench.py` at a tiny size: the `onnx` object's shape and what it can claim."""

from __future__ import annotations

from pathlib import Path

from fedge.bench.onnx_bench import inference_install, onnx_measurements


def test_inference_only_install_has_no_torch() -> None:
    install = inference_install()
    assert not install["has_torch"] and "torch" not in install["by_package_mb"]
    assert "flwr" not in install["by_package_mb"] and "ray" not in install["by_package_mb"]
    assert {"onnxruntime", "numpy", "protobuf", "fedge"} <= set(install["by_package_mb"])
    assert install["missing"] == []
    parts = install["by_package_mb"].values()
    assert install["mb"] > 0 and abs(install["mb"] - sum(parts)) <= 0.05 * len(parts) + 0.1


def test_tiny_onnx_measurement(tmp_path: Path) -> None:
    result = onnx_measurements(images=300, train_examples=256, latency_calls=5,
                               cache_dir=tmp_path)
    for key in ("fp32_agreement", "int8_agreement"):
        assert 0.0 <= result[key] <= 1.0
    assert result["fp32_agreement"] >= 0.99  # same float graph: only rounding differs
    assert result["images"] == 300
    assert set(result["batch1_ms"]) == {"onnxruntime", "torch"}
    assert all(v > 0 for v in result["batch1_ms"].values())
    assert result["inference_only_installed_mb"] > 0 and not result["installed_has_torch"]
    assert result["file_bytes"]["onnx-int8"] < 0.3 * result["file_bytes"]["onnx"]
    assert set(result["checks"]) == {"fp32_agreement", "int8_agreement",
                                     "inference_only_installed_mb"}
