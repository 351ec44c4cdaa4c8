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

An int8 delta that arrives still quantized (`QuantizedArray`, from
`decode_update(..., lazy=True)`) is folded in straight from its int8 values:
the float32 tensor it decodes to is never built. It goes into a float32
staging sum that is added to the float64 sum every `STAGE_REPLIES` (16) replies:
the running sum is the coordinator's main memory traffic per reply, and a
float32 one halves it. Sixteen int8 updates (8 significant bits each) summed
in float32 (24) lose nothing they carry; the float64 sum still takes
thousands of replies without drift.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

import numpy as np

from fedge.common.tensor_codec import QuantizedArray

#: What an update's tensor may be: an array, or an int8 tensor not yet decoded.
Tensor: TypeAlias = np.ndarray | QuantizedArray

#: Elements per step when folding an update in: float64 temporaries stay at 512 KiB instead
#: of 2x the largest tensor (a 4 M-float fc layer would otherwise need a 32 MB scratch copy
#: per reply, and the final mean three of them).
CHUNK = 1 << 16
#: Quantized replies summed in the float32 staging sum before it is added to the float64 sum.
STAGE_REPLIES = 16


class StreamingMean:
    """Running weighted mean of updates against a fixed base model `base`.

    Non-float tensors (integer buffers) are averaged the same way and rounded
    back to their dtype, so the result has exactly the base's names, shapes
    and dtypes, in the base's order. Updates are folded in chunk by chunk
    through one small scratch buffer, so besides the running sum nothing
    model-sized is allocated; the arithmetic is the same as whole-array numpy.
    """

    def __init__(self, base: Mapping[str, np.ndarray], dtype: np.dtype | type = np.float64):
        self.base = base
        self.dtype = np.dtype(dtype)
        self._sum: dict[str, np.ndarray] | None = None
        self._stage: dict[str, np.ndarray] = {}  # float32 staging sums of quantized tensors
        self._staged = 0  # replies in the staging sums
        self._scratch = np.empty(CHUNK, dtype=self.dtype)
        self.total_weight = 0.0
        self.count = 0

    def _accumulators(self) -> dict[str, np.ndarray]:
        if self._sum is None:
            self._sum = {k: np.zeros(v.shape, dtype=self.dtype) for k, v in self.base.items()}
        return self._sum

    def _check(self, arrays: Mapping[str, Tensor], weight: float) -> None:
        if not np.isfinite(weight) or weight <= 0:
            raise ValueError(f"weight must be finite and > 0, got {weight}")
        if arrays.keys() != self.base.keys():
            raise ValueError("update tensors differ from the base model's")
        acc = self._accumulators()
        for name, a in arrays.items():
            if np.shape(a) != acc[name].shape:
                raise ValueError(f"{name}: shape {np.shape(a)} != {acc[name].shape}")

    def _fold(self, name: str, x: Tensor, weight: float, full: bool) -> None:
        """`sum[name] += weight * (x - base)` (or `weight * x` for a delta), chunk by chunk."""
        acc = self._accumulators()[name].reshape(-1)
        if isinstance(x, QuantizedArray):
            if not full:
                x.accumulate_into(self._staging(name, acc), weight)
                return
            x = np.asarray(x)
        xf: np.ndarray = np.ravel(x)
        bf = np.ravel(self.base[name]) if full else None
        for lo in range(0, acc.size, CHUNK):
            hi = min(lo + CHUNK, acc.size)
            tmp = self._scratch[: hi - lo]
            if bf is None:
                np.multiply(xf[lo:hi], weight, out=tmp, dtype=self.dtype)
            else:
                np.subtract(xf[lo:hi], bf[lo:hi], out=tmp, dtype=self.dtype)
                tmp *= weight
            acc[lo:hi] += tmp

    def _staging(self, name: str, acc: np.ndarray) -> np.ndarray:
        """The float32 staging sum of tensor `name` (the float64 sum itself if it is float32)."""
        if self.dtype.itemsize <= 4:
            return acc
        stage = self._stage.get(name)
        if stage is None:
            stage = self._stage[name] = np.zeros(acc.size, np.float32)
        return stage

    def _flush(self) -> None:
        """Add the staging sums to the running sum and empty them."""
        if self._sum is not None:
            for name, stage in self._stage.items():
                acc = self._sum[name].reshape(-1)
                for lo in range(0, acc.size, CHUNK):
                    acc[lo : lo + CHUNK] += stage[lo : lo + CHUNK]
                stage.fill(0)
        self._staged = 0

    def add_delta(self, delta: Mapping[str, Tensor], weight: float) -> None:
        """Fold in an update given as `x - base` with weight `weight`."""
        self._check(delta, weight)
        for name, d in delta.items():
            self._fold(name, d, float(weight), full=False)
        self.total_weight += float(weight)
        self.count += 1
        if self._stage:
            self._staged += 1
            if self._staged >= STAGE_REPLIES:
                self._flush()

    def add_sum(self, delta_sum: Mapping[str, np.ndarray], count: int) -> None:
        """Fold in the sum of `count` deltas, each of weight 1 (secure aggregation releases
        only that sum: server/secagg_server.py)."""
        self._check(delta_sum, float(count))
        for name, d in delta_sum.items():
            self._fold(name, d, 1.0, full=False)
        self.total_weight += float(count)
        self.count += int(count)

    def add_full(self, arrays: Mapping[str, Tensor], weight: float) -> None:
        """Fold in an update given as full weights `x` with weight `weight`."""
        self._check(arrays, weight)
        for name, x in arrays.items():
            self._fold(name, x, float(weight), full=True)
        self.total_weight += float(weight)
        self.count += 1

    def add_noise(self, std: float, rng: np.random.Generator) -> None:
        """Add N(0, std^2) to every coordinate of the running sum (DP-FedAvg, server/dp.py).

        Drawn chunk by chunk into the scratch buffer: no model-sized temporary.
        """
        if std <= 0:
            return
        for acc in self._accumulators().values():
            flat = acc.reshape(-1)
            for lo in range(0, flat.size, CHUNK):
                hi = min(lo + CHUNK, flat.size)
                tmp = self._scratch[: hi - lo]
                rng.standard_normal(out=tmp, dtype=tmp.dtype)
                tmp *= std
                flat[lo:hi] += tmp

    def result(self) -> dict[str, np.ndarray] | None:
        """The weighted mean (base dtypes), or None when nothing was added.

        Computed chunk by chunk straight into the output arrays: the only
        model-sized allocation is the result itself.
        """
        if self._sum is None or self.total_weight <= 0:
            return None
        self._flush()
        out: dict[str, np.ndarray] = {}
        for name, base in self.base.items():
            base_arr = np.asarray(base)
            mean = np.empty(base_arr.shape, dtype=base_arr.dtype)
            flat_out, flat_base = mean.reshape(-1), np.ravel(base_arr)
            flat_sum = self._sum[name].reshape(-1)
            rounded = not np.issubdtype(base_arr.dtype, np.floating)
            for lo in range(0, flat_out.size, CHUNK):
                hi = min(lo + CHUNK, flat_out.size)
                tmp = self._scratch[: hi - lo]
                np.divide(flat_sum[lo:hi], self.total_weight, out=tmp)
                np.add(tmp, flat_base[lo:hi], out=tmp, dtype=self.dtype)
                if rounded:
                    np.rint(tmp, out=tmp)
                flat_out[lo:hi] = tmp
            out[name] = mean
        return out
