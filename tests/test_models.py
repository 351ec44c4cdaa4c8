"""Models, weight conversion (common/arrays.py) and local training (common/training.py)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedge.common.arrays import (
    arrays_to_model,
    arrays_to_record,
    model_to_arrays,
    record_to_arrays,
    record_to_model,
)
from fedge.common.models import DigitsMLP, FedAvgCNN
from fedge.common.task import resolve_task
from fedge.common.training import evaluate, torch_threads, train


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_fedavg_cnn_has_the_papers_parameter_count() -> None:
    model = FedAvgCNN()
    assert _parameters(model) == 1_663_370
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_digits_mlp_is_small_and_takes_images_or_vectors() -> None:
    model = DigitsMLP()
    assert _parameters(model) == 64 * 64 + 64 + 64 * 10 + 10
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    assert model(torch.zeros(5, 64)).shape == (5, 10)


@pytest.mark.parametrize("model_class", [DigitsMLP, FedAvgCNN])
def test_init_is_deterministic_per_seed_and_leaves_global_rng_alone(
    model_class: type[torch.nn.Module],
) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = model_class(seed=7), model_class(seed=7), model_class(seed=8)
    assert torch.equal(torch.rand(3), expected_next)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_model_to_arrays_keeps_order_dtype_and_copies() -> None:
    model = FedAvgCNN(seed=1)
    arrays = model_to_arrays(model)
    assert list(arrays) == list(model.state_dict())
    assert all(a.dtype == np.float32 for a in arrays.values())
    arrays["fc2.bias"][:] = 42.0
    assert not torch.any(model.fc2.bias == 42.0)


def test_arrays_round_trip_through_record_into_a_fresh_model() -> None:
    src, dst = DigitsMLP(seed=1), DigitsMLP(seed=2)
    record = arrays_to_record(model_to_arrays(src))
    assert isinstance(record, ArrayRecord)
    assert list(record) == list(src.state_dict())
    back = record_to_arrays(record)
    assert all(np.array_equal(back[k], v) for k, v in model_to_arrays(src).items())
    record_to_model(dst, record)
    x = torch.rand(4, 64)
    assert torch.equal(src(x), dst(x))


def test_arrays_to_model_rejects_wrong_shape_and_keys() -> None:
    model = DigitsMLP()
    arrays = model_to_arrays(model)
    bad = dict(arrays, **{"fc1.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"shape mismatch for 'fc1.weight'"):
        arrays_to_model(model, bad)
    missing = {k: v for k, v in arrays.items() if k != "fc2.bias"}
    with pytest.raises(ValueError, match="missing"):
        arrays_to_model(model, missing)
    with pytest.raises(ValueError, match="unexpected"):
        arrays_to_model(model, dict(arrays, extra=np.zeros(1, np.float32)))


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread, most of all on a busy CI machine."""
    with torch_threads(1):
        yield


def _digits_train_data():
    data = resolve_task("digits").load_partition(0, 2, {"seed": 0})
    return data.x_train, data.y_train


def test_train_lowers_loss_and_reports_examples() -> None:
    x, y = _digits_train_data()
    model = DigitsMLP(seed=0)
    loss0, acc0 = evaluate(model, x, y)
    out = train(model, x, y, epochs=5, batch_size=16, lr=0.3, seed=0)
    loss1, acc1 = evaluate(model, x, y)
    assert out["num_examples"] == len(y)
    assert loss1 < 0.5 * loss0
    assert acc1 > 0.85 > acc0
    assert out["train_loss"] < loss0


def test_train_is_reproducible_per_seed() -> None:
    x, y = _digits_train_data()
    a, b, c = DigitsMLP(seed=0), DigitsMLP(seed=0), DigitsMLP(seed=0)
    train(a, x, y, epochs=1, batch_size=16, lr=0.1, seed=5)
    train(b, x, y, epochs=1, batch_size=16, lr=0.1, seed=5)
    train(c, x, y, epochs=1, batch_size=16, lr=0.1, seed=6)
    assert torch.equal(a.fc1.weight, b.fc1.weight)
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def _distance(model: torch.nn.Module, ref: dict[str, np.ndarray]) -> float:
    now = model_to_arrays(model)
    return float(sum(np.sum((now[k] - ref[k]) ** 2) for k in ref))


def test_fedprox_term_keeps_weights_near_the_global_model() -> None:
    x, y = _digits_train_data()
    start = model_to_arrays(DigitsMLP(seed=0))
    free, prox = DigitsMLP(seed=0), DigitsMLP(seed=0)
    train(free, x, y, epochs=2, batch_size=16, lr=0.1, seed=0)
    train(prox, x, y, epochs=2, batch_size=16, lr=0.1, seed=0, proximal_mu=1.0)
    assert _distance(prox, start) < 0.5 * _distance(free, start)
    # an explicit anchor (by name) pulls towards it instead of the starting point
    anchored = DigitsMLP(seed=0)
    target = {k: torch.zeros_like(torch.from_numpy(v)) for k, v in start.items()}
    train(
        anchored,
        x,
        y,
        epochs=2,
        batch_size=16,
        lr=0.1,
        seed=0,
        proximal_mu=1.0,
        global_params=target,
    )
    zeros = {k: np.zeros_like(v) for k, v in start.items()}
    assert _distance(anchored, zeros) < _distance(prox, zeros)


def test_evaluate_counts_correct_predictions() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Identity())
    x = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    y = np.array([0, 1, 0, 0])
    loss, acc = evaluate(model, x, y, batch_size=3)
    assert acc == pytest.approx(0.75)
    assert loss > 0
    assert evaluate(model, x[:0], y[:0]) == (0.0, 0.0)
