"""The coordinator's fused int8 path: lazy decoding and folding int8 values into the sum.

`decode_update(..., lazy=True)` leaves dense int8 tensors quantized and the
streaming mean folds them in without decoding them first; the sum must be bit
for bit the one decoding first gives, and every check of eager decoding must
still refuse bad input before anything is folded.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedge.common import quantize as qz
from fedge.common.errors import UpdateRejected
from fedge.common.tensor_codec import QuantizedArray
from fedge.common.update_codec import decode_update, encode_update
from fedge.server.streaming_mean import STAGE_REPLIES, StreamingMean

SHAPES = {"big": (300, 700), "odd": (12_345,), "bias": (7,), "steps": (3,)}


def _model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {k: rng.normal(scale=0.05, size=s).astype(np.float32) for k, s in SHAPES.items()}
    out["steps"] = np.array([1, 2, 3], dtype=np.int64)
    return out


def _expected() -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {k: (tuple(a.shape), a.dtype) for k, a in _model(0).items()}


@pytest.mark.parametrize("codec", ["int8", "int8:block=64", "int8:block=0"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lazy_decoding_folds_to_the_same_mean(codec: str, dtype: type) -> None:
    """float32 sums: bit for bit; float64 (through the float32 staging sum, flushed every
    STAGE_REPLIES replies): equal to float32 precision of the summed deltas."""
    base = _model(0)
    eager, lazy = StreamingMean(base, dtype), StreamingMean(base, dtype)
    kinds: set[str] = set()
    for i in range(STAGE_REPLIES + 3):
        delta = {k: (a - base[k]) if a.dtype.kind == "f" else a * 0
                 for k, a in _model(i + 1).items()}
        update, _ = encode_update(delta, codec, run_id="r", round=1, num_examples=1)
        data = update.SerializeToString()
        weight = 3.0 + i
        plain = decode_update(data, expected=_expected()).arrays
        quantized = decode_update(data, expected=_expected(), lazy=True).arrays
        assert all(isinstance(a, np.ndarray) for a in plain.values())
        kinds |= {type(a).__name__ for a in quantized.values()}
        for k, q in quantized.items():  # np.asarray decodes a lazy tensor to the eager one
            np.testing.assert_array_equal(np.asarray(q), plain[k])
            assert q.shape == plain[k].shape and q.dtype == plain[k].dtype
        eager.add_delta(plain, weight)
        lazy.add_delta(quantized, weight)
    assert "QuantizedArray" in kinds  # the fused path was taken
    got, want = lazy.result(), eager.result()
    assert got is not None and want is not None
    for k in want:
        if dtype == np.float32 or want[k].dtype.kind != "f":
            np.testing.assert_array_equal(got[k], want[k])
        else:
            # float32 staging: off by float32 rounding of the weighted sum of deltas (|delta|
            # here up to ~0.2), far below the int8 quantization step (|delta| / 127)
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-7)
    assert lazy.count == eager.count == STAGE_REPLIES + 3


def test_fused_kernel_equals_decode_then_add_int4_too() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=200_001).astype(np.float32)
    for bits, block in ((8, 256), (4, 32), (8, 0)):
        absmax = qz.block_absmax(x, block)
        scales, _ = qz.choose_scales(absmax, bits)
        q = qz.quantize(x, scales, block, bits)
        acc = rng.normal(size=x.size)
        want = acc + np.multiply(qz.dequantize(q, x.size, scales, block, bits), 0.37,
                                 dtype=np.float64)
        qz.dequantize_accumulate(q, x.size, scales, block, bits, acc, 0.37)
        np.testing.assert_array_equal(acc, want)


def test_lazy_decoding_still_refuses_minus_128() -> None:
    update, _ = encode_update({"w": np.ones(1000, np.float32)}, "int8", num_examples=1)
    q = update.tensors[0].quantized
    values = bytearray(q.values)
    values[10] = 0x80  # -128: outside the symmetric range
    q.values = bytes(values)
    expected = {"w": ((1000,), np.dtype(np.float32))}
    for lazy in (False, True):
        with pytest.raises(UpdateRejected) as err:
            decode_update(update.SerializeToString(), expected=expected, lazy=lazy)
        assert err.value.reason == "bad_values"


def test_quantized_array_refuses_a_wrong_accumulator() -> None:
    update, _ = encode_update({"w": np.ones(5000, np.float32)}, "int8", num_examples=1)
    arr = decode_update(update, lazy=True).arrays["w"]
    assert isinstance(arr, QuantizedArray) and arr.size == 5000 and arr.ndim == 1
    with pytest.raises(ValueError):
        arr.accumulate_into(np.zeros(5001), 1.0)
