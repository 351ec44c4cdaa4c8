"""Each client's accuracy on its own local test split: global model and personal model.

The central test set says how good the one global model is; a device's user
sees it on their own (label-skewed) data. After a run the scenario takes the
final global model and, for every client, measures it on the client's local
test split (never trained on), then fits the client's personal part from that
model on the client's training split, exactly as the device's personalization
mod does on its next contact (`fedge.common.personal.personalize`, same
settings from the run config), and measures that.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedge.common.personal import DEFAULTS, apply_personal, personalize
from fedge.common.task import resolve_task
from fedge.common.training import evaluate


def client_accuracies(
    config: Mapping[str, Any], arrays: Mapping[str, np.ndarray], clients: int, limit: int = 0
) -> dict[str, list[float]]:
    """`{"global": [...], "personalized": [...]}` per client (personalized: when the run
    config's `personalize` is head|full); the first `limit` clients only when limit > 0."""
    import torch

    task = resolve_task(str(config.get("task", "digits")))
    model = task.make_model()
    state = model.state_dict()
    model.load_state_dict({k: torch.from_numpy(np.array(arrays[k])).to(state[k].dtype)
                           for k in state})
    mode = str(config.get("personalize", "none") or "none").lower()
    out: dict[str, list[float]] = {"global": []}
    if mode != "none":
        out["personalized"] = []
    for pid in range(min(clients, limit) if limit > 0 else clients):
        data = task.load_partition(pid, clients, config)
        if data.num_test == 0:
            continue
        out["global"].append(round(evaluate(model, data.x_test, data.y_test)[1], 4))
        if mode == "none":
            continue
        part = personalize(
            model, data.x_train, data.y_train, mode=mode,
            epochs=int(config.get("personal-epochs", DEFAULTS["epochs"])),
            lr=float(config.get("personal-lr", DEFAULTS["lr"])),
            batch_size=int(config.get("batch-size", DEFAULTS["batch-size"])),
            seed=int(config.get("seed", 0)) + pid,
        )
        mine = apply_personal(copy.deepcopy(model), part)
        out["personalized"].append(round(evaluate(mine, data.x_test, data.y_test)[1], 4))
    return out
