"""Model weights as data: torch state_dict <-> ordered numpy dict <-> Flower ArrayRecord.

One ordered `dict[str, np.ndarray]` (state_dict order, names kept) is the form
the codec, the strategies and the store all speak; these helpers are the only
place a model's tensors are turned into it and back, with shape checks so a
wrong-model update fails loudly instead of broadcasting.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn


def model_to_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state_dict as independent numpy copies, in state_dict order.

    Floating tensors become float32 (what the codec and aggregation expect);
    integer buffers (e.g. BatchNorm's `num_batches_tracked`) keep their dtype.
    """
    out: dict[str, np.ndarray] = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.to(torch.float32)
        out[name] = t.numpy().copy()
    return out


def arrays_to_model(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> nn.Module:
    """Load `arrays` into `model` in place (and return it).

    Keys must match the state_dict exactly and every shape must agree; a
    `ValueError` names what differs. Values are cast to each tensor's dtype.
    """
    state = model.state_dict()
    missing = [k for k in state if k not in arrays]
    unexpected = [k for k in arrays if k not in state]
    if missing or unexpected:
        raise ValueError(
            f"arrays do not match the model: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}"
        )
    new_state: dict[str, torch.Tensor] = {}
    for name, ref in state.items():
        a = np.asarray(arrays[name])
        if tuple(a.shape) != tuple(ref.shape):
            raise ValueError(
                f"shape mismatch for {name!r}: model has {tuple(ref.shape)}, "
                f"arrays have {tuple(a.shape)}"
            )
        new_state[name] = torch.as_tensor(np.array(a, copy=True)).to(ref.dtype)
    model.load_state_dict(new_state, strict=True)
    return model


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord holding `arrays` under their own names, order kept."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The ArrayRecord's arrays as numpy, keyed and ordered as stored.

    Flower deserialises with `allow_pickle=False`, so object arrays are refused.
    """
    return {name: arr.numpy() for name, arr in record.items()}


def model_to_record(model: nn.Module) -> ArrayRecord:
    """Shortcut: `arrays_to_record(model_to_arrays(model))`."""
    return arrays_to_record(model_to_arrays(model))


def record_to_model(model: nn.Module, record: ArrayRecord) -> nn.Module:
    """Shortcut: `arrays_to_model(model, record_to_arrays(record))`."""
    return arrays_to_model(model, record_to_arrays(record))
