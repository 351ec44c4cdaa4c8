"""A weighted mean of model updates that holds one running sum, not the updates.

FedAvg's new model is `sum_i w_i * x_i / sum_i w_i`. Stock Flower builds it
from a list of every reply's arrays, so the coordinator's memory grows with the
number of devices. Here each update is folded into one float64 sum per tensor
as it arrives and can be dropped right after: memory is O(model) whatever the
number of replies.

The sum is kept relative to the global model the round started from
(`sum_i w_i * (x_i - g)`): compressed replies arrive as deltas anyway, plain
replies (full weights from stock clients) are turned into deltas one tensor at
a time, and `g + sum / W` loses less precision than averaging full weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class StreamingMean:
    """Running weighted mean of updates against a fixed base model `base`.

    Non-float tensors (integer buffers) are averaged the same way and rounded
    back to their dtype, so the result has exactly the base's names, shapes
    and dtypes, in the base's order.
    """

    def __init__(self, base: Mapping[str, np.ndarray], dtype: np.dtype | type = np.float64):
        self.base = base
        self.dtype = np.dtype(dtype)
        self._sum: dict[str, np.ndarray] | None = None
        self.total_weight = 0.0
        self.count = 0

    def _accumulators(self) -> dict[str, np.ndarray]:
        if self._sum is None:
            self._sum = {k: np.zeros(v.shape, dtype=self.dtype) for k, v in self.base.items()}
        return self._sum

    def _check(self, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        if not np.isfinite(weight) or weight <= 0:
            raise ValueError(f"weight must be finite and > 0, got {weight}")
        if arrays.keys() != self.base.keys():
            raise ValueError("update tensors differ from the base model's")

    def add_delta(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold in an update given as `x - base` with weight `weight`."""
        self._check(delta, weight)
        acc = self._accumulators()
        for name, d in delta.items():
            if d.shape != acc[name].shape:
                raise ValueError(f"{name}: shape {d.shape} != {acc[name].shape}")
            acc[name] += np.multiply(d, weight, dtype=self.dtype)
        self.total_weight += float(weight)
        self.count += 1

    def add_full(self, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold in an update given as full weights `x` with weight `weight`."""
        self._check(arrays, weight)
        acc = self._accumulators()
        for name, x in arrays.items():
            if x.shape != acc[name].shape:
                raise ValueError(f"{name}: shape {x.shape} != {acc[name].shape}")
            tmp = np.subtract(x, self.base[name], dtype=self.dtype)
            tmp *= weight
            acc[name] += tmp
        self.total_weight += float(weight)
        self.count += 1

    def result(self) -> dict[str, np.ndarray] | None:
        """The weighted mean (base dtypes), or None when nothing was added."""
        if self._sum is None or self.total_weight <= 0:
            return None
        out: dict[str, np.ndarray] = {}
        for name, base in self.base.items():
            mean = np.asarray(base, dtype=self.dtype) + self._sum[name] / self.total_weight
            if not np.issubdtype(base.dtype, np.floating):
                mean = np.rint(mean)
            out[name] = np.asarray(mean, dtype=base.dtype)
        return out
