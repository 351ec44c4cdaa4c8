"""Training and evaluation on CUDA when asked and there; the CPU otherwise (issue 18)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedge.common.task import DIGITS
from fedge.common.training import (
    DEVICE_ENV,
    evaluate,
    resolve_device,
    train,
    use_device,
)


def _data() -> tuple[np.ndarray, np.ndarray]:
    d = DIGITS.load_partition(0, 4, {"seed": 0})
    return d.x_train, d.y_train


def test_auto_and_cuda_fall_back_to_the_cpu_without_a_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    assert resolve_device("cuda").type == "cpu"
    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setenv(DEVICE_ENV, "auto")
    assert resolve_device().type == "cpu"
    with pytest.raises(ValueError, match="unknown torch device 'tpu'"):
        resolve_device("tpu")


def test_default_is_the_cpu_and_use_device_sets_it(monkeypatch) -> None:
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    try:
        assert use_device(None).type == "cpu"
        expected = "cuda" if torch.cuda.is_available() else "cpu"
        assert use_device("auto").type == expected
        with pytest.raises(ValueError):
            use_device("abacus")
    finally:
        use_device(None)


def test_the_fallback_trains_exactly_as_the_cpu(monkeypatch) -> None:
    """Asking for a GPU where there is none gives the CPU's result, bit for bit."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    x, y = _data()
    results = []
    for device in ("cpu", "auto", "cuda"):
        model = DIGITS.make_model()
        out = train(model, x, y, epochs=2, batch_size=16, lr=0.3, seed=3, device=device)
        results.append((out["train_loss"], [p.detach().clone() for p in model.parameters()],
                        evaluate(model, x, y, device=device)))
    for loss, params, ev in results[1:]:
        assert loss == results[0][0] and ev == results[0][2]
        assert all(torch.equal(a, b) for a, b in zip(params, results[0][1], strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_trains_and_hands_back_a_cpu_model() -> None:
    x, y = _data()
    cpu, gpu = DIGITS.make_model(), DIGITS.make_model()
    train(cpu, x, y, epochs=2, batch_size=16, lr=0.3, seed=3, device="cpu")
    out = train(gpu, x, y, epochs=2, batch_size=16, lr=0.3, seed=3, device="cuda")
    assert all(p.device.type == "cpu" for p in gpu.parameters())
    assert out["num_examples"] == len(y)
    for a, b in zip(cpu.parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert abs(evaluate(gpu, x, y, device="cuda")[1] - evaluate(cpu, x, y)[1]) < 0.01


def test_ray_backend_asks_for_gpus_only_when_told() -> None:
    from fedge.simulations.engine import ray_backend_config

    plain = ray_backend_config()
    assert plain["client_resources"]["num_gpus"] == 0.0
    assert "runtime_env" not in plain["init_args"]
    gpu = ray_backend_config(num_gpus_per_client=0.25)
    assert gpu["client_resources"]["num_gpus"] == 0.25
    assert gpu["init_args"]["runtime_env"]["env_vars"] == {DEVICE_ENV: "auto"}


def test_gpus_per_client_is_refused_below_zero() -> None:
    from typer.testing import CliRunner

    from fedge.cli import app

    result = CliRunner().invoke(app, ["simulate", "--gpus-per-client", "-1"])
    assert result.exit_code == 2 and "gpus-per-client" in result.output
