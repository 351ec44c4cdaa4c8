"""Personal models: the global model's body with a head fitted to the device's own data.

Why: under label skew one global model is a compromise; a device that sees
mostly three classes predicts better with a classifier fitted to them. The
device keeps the federation's body (every layer up to the last Linear) and
fits only the last Linear layer, the head, on its local training split
(FedBABU/FedPer-style fine-tuning). The head stays on the device: it is
written to the device's state and folder, never into a reply, so the
coordinator never sees it.

Two ways were measured at small size (simulations/BENCHMARKS.md): `head`
(fit the head on the body's features, computed once: a few ms of compute)
and `full` (a few local epochs of the whole model from the global weights,
stored whole: 6.6 MB on a Fashion-MNIST device instead of 20 kB). `head` is
the default; `full` stays for comparison.

The personal part travels as a plain `.npz` of float32 arrays (read with
`allow_pickle=False`), named by the model's own state-dict keys.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedge.common.atomic_file import atomic_write
from fedge.common.contract import PERSONAL_FILE_NAME, PERSONAL_MODES
from fedge.common.training import resolve_device, train

#: the file a device keeps its personal part in, next to its model file
PERSONAL_FILE = PERSONAL_FILE_NAME
MODES = tuple(m for m in PERSONAL_MODES if m != "none")
DEFAULTS: dict[str, Any] = {"mode": "head", "epochs": 10, "lr": 0.05, "batch-size": 32}
MAX_PERSONAL_FILE_BYTES = 256 << 20


class PersonalError(ValueError):
    """A personal-model file or array set that does not fit the model."""


def head_name(model: nn.Module) -> str:
    """The module name of the model's head: its last `nn.Linear` (in registration order)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise PersonalError(f"{type(model).__name__} has no Linear layer to personalize")
    return names[-1]


def head_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the head's tensors (e.g. fc2.weight, fc2.bias)."""
    name = head_name(model)
    return [f"{name}.{k}" for k, _ in model.get_submodule(name).named_parameters()]


@torch.no_grad()
def head_inputs(model: nn.Module, x: np.ndarray | torch.Tensor, *, batch_size: int = 512,
                device: str | torch.device | None = None) -> torch.Tensor:
    """What the head receives for each example (the body's features), on the CPU."""
    head = model.get_submodule(head_name(model))
    dev = resolve_device(device)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].detach()))
    model.eval()
    model.to(dev)
    try:
        xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        for start in range(0, len(xt), batch_size):
            model(xt[start:start + batch_size].to(dev))
    finally:
        hook.remove()
        model.to("cpu")
    if not captured:
        return torch.zeros((0, int(getattr(head, "in_features", 0))))
    return torch.cat(captured).to("cpu")


def personalize(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    mode: str = DEFAULTS["mode"],
    epochs: int = DEFAULTS["epochs"],
    lr: float = DEFAULTS["lr"],
    batch_size: int = DEFAULTS["batch-size"],
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, np.ndarray]:
    """The personal part fitted from `model` (left unchanged) on (x, y).

    `head`: the head's tensors, trained `epochs` on the body's features;
    `full`: every tensor, after `epochs` of local SGD on the whole model.
    """
    if mode not in MODES:
        raise PersonalError(f"unknown personalization {mode!r}; choose {', '.join(MODES)}")
    if mode == "full":
        mine = copy.deepcopy(model)
        train(mine, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device)
        return {k: v.detach().cpu().numpy().copy() for k, v in mine.state_dict().items()}
    name = head_name(model)
    head = copy.deepcopy(model.get_submodule(name))
    features = head_inputs(model, x, device=device)
    train(head, features, np.asarray(y), epochs=epochs, batch_size=batch_size, lr=lr,
          seed=seed, device=device)
    return {f"{name}.{k}": v.detach().cpu().numpy().copy()
            for k, v in head.state_dict().items()}


def check_personal(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Refuse arrays whose names or shapes do not fit `model` (PersonalError)."""
    state = model.state_dict()
    if not arrays:
        raise PersonalError("the personal part holds no tensors")
    for key, value in arrays.items():
        if key not in state:
            raise PersonalError(f"personal tensor {key!r} is not in the model; "
                                "delete the personal file to predict with the global model")
        if tuple(np.shape(value)) != tuple(state[key].shape):
            raise PersonalError(f"personal tensor {key!r} has shape {np.shape(value)}, the "
                                f"model {tuple(state[key].shape)}")
        if not np.all(np.isfinite(value)):
            raise PersonalError(f"personal tensor {key!r} holds NaN or Inf")


def apply_personal(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> nn.Module:
    """Load the personal part into `model` (in place) and return it.

    A head that an int8 predictor swapped for a quantized layer is put back as
    a float `nn.Linear` with the personal weights (a 20 kB layer: float is fine).
    """
    name = head_name(model)
    prefix = f"{name}."
    current = model.get_submodule(name)
    head_only = all(k.startswith(prefix) for k in arrays)
    if head_only and not isinstance(current, nn.Linear):
        weight = np.asarray(arrays[f"{name}.weight"])
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=f"{name}.bias" in arrays)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer)
    check_personal(model, arrays)
    with torch.no_grad():  # tensor by tensor: other layers may be quantized, with no such keys
        for key, value in arrays.items():
            owner, _, attr = key.rpartition(".")
            target = getattr(model.get_submodule(owner) if owner else model, attr)
            target.copy_(torch.from_numpy(np.array(value, dtype=np.float32)).to(target.dtype))
    return model


def personal_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The personal part as `.npz` bytes (no pickled objects)."""
    buf = io.BytesIO()
    save: Any = np.savez  # numpy's stub types **arrays as its own keyword arguments
    save(buf, **{k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
    return buf.getvalue()


def save_personal(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write the personal part atomically (a crash leaves the old file or the new one)."""
    atomic_write(Path(path), personal_bytes(arrays), prefix=".tmp-personal-", make_parents=True)


def load_personal(path: Path) -> dict[str, np.ndarray]:
    """Read a personal-part file written by `save_personal` (PersonalError if unusable)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_PERSONAL_FILE_BYTES:
            raise PersonalError(f"{path}: {size} bytes is over {MAX_PERSONAL_FILE_BYTES}")
        with np.load(path, allow_pickle=False) as npz:
            return {k: np.asarray(npz[k], dtype=np.float32) for k in npz.files}
    except PersonalError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise PersonalError(f"{path}: not a personal-model file ({e})") from None


def personal_path(model_file: Path) -> Path:
    """The personal part a device keeps next to its model file: `<folder>/personal-head.npz`."""
    return Path(model_file).parent / PERSONAL_FILE
