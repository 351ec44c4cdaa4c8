"""Property tests of the codec: error bounds, unbiasedness, shapes, top-k, error feedback."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge.common.codec_spec import parse_codec
from fedge.common.tensor_codec import WIRE_TO_NUMPY
from fedge.common.topk import decode_positions, topk_count
from fedge.common.update_codec import decode_update, encode_update
from fedge.v1 import tensor_pb2

EPS32 = float(np.finfo(np.float32).eps)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _one(x: np.ndarray, spec: str, **kw) -> tuple[tensor_pb2.EncodedTensor, np.ndarray, dict]:
    """Encode one tensor named "t"; return its wire form, the decoded array, the residual."""
    update, residual = encode_update({"t": x}, spec, **kw)
    decoded = decode_update(update.SerializeToString()).arrays["t"]
    return update.tensors[0], decoded, residual


def _steps(q: tensor_pb2.QuantizedTensor, m: int) -> np.ndarray:
    """The stored scale (one quantization step) of each of the m quantized values."""
    scales = np.frombuffer(q.scales, WIRE_TO_NUMPY[q.scale_dtype]).astype(np.float64)
    if m == 0:
        return np.zeros(0)
    if q.block_size == 0:
        return np.full(m, scales[0])
    return np.repeat(scales, q.block_size)[:m]


magnitudes = st.sampled_from([1e-30, 1e-12, 1e-6, 1e-3, 1.0, 1e3, 1e8, 1e30])
float_arrays = hnp.arrays(
    np.float32,
    st.integers(min_value=0, max_value=700),
    elements=st.floats(-1.0, 1.0, width=32),
)


@SETTINGS
@given(
    x=float_arrays,
    scale=magnitudes,
    bits=st.sampled_from([8, 4]),
    block=st.sampled_from([0, 1, 7, 64, 128, 1000]),
)
def test_deterministic_error_within_half_a_step(
    x: np.ndarray, scale: float, bits: int, block: int
) -> None:
    x = (x * np.float32(scale)).astype(np.float32)
    wire, decoded, _ = _one(x, f"int{bits}:block={block}:small=0:noef")
    q = wire.quantized
    assert q.bits == bits
    step = _steps(q, x.size)
    err = np.abs(decoded.astype(np.float64) - x.astype(np.float64))
    # half the stored step, plus float32 rounding of x / s and of q * s
    assert np.all(err <= 0.5 * step + 2 * EPS32 * np.abs(x.astype(np.float64)))
    qmax = 127 if bits == 8 else 7
    assert np.all(np.abs(x.astype(np.float64)) <= qmax * step * (1 + 4 * EPS32) + 1e-300)


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased(bits: int) -> None:
    # values sitting at awkward fractions of a step, so a deterministic or biased
    # rounding would be off by up to 0.45 step on average
    qmax = 127 if bits == 8 else 7
    frac = np.linspace(0.05, 0.95, 63)
    x = np.concatenate([[qmax], np.arange(63) % (qmax - 1) + frac]).astype(np.float32)
    x[1::2] *= -1
    trials = 2000
    rng = np.random.default_rng(1234)
    total = np.zeros(x.size)
    step = None
    for _ in range(trials):
        wire, decoded, _ = _one(x, f"int{bits}:stochastic:small=0:noef", rng=rng)
        step = _steps(wire.quantized, x.size)
        err = decoded.astype(np.float64) - x
        assert np.all(np.abs(err) < step * (1 + 1e-6))  # within one step
        total += err
    mean = total / trials
    # each trial's error is in {-f, 1-f} steps: variance <= step^2 / 4, so the mean has
    # std <= step / (2 sqrt(T)); 6 sigma per element keeps 64 elements' false alarm ~1e-7
    assert np.all(np.abs(mean) <= 6 * step / (2 * np.sqrt(trials)))
    # ...and the rounding is really random: the largest fractional error is 0.45 step
    deterministic = _one(x, f"int{bits}:small=0:noef")[1].astype(np.float64) - x
    assert np.max(np.abs(deterministic)) > 10 * np.max(np.abs(mean))


SHAPES = [(), (1,), (7,), (0,), (3, 0, 2), (5, 3), (2, 3, 5)]
CODECS = [
    "none",
    "fp16",
    "int8",
    "int4",
    "int4:block=0",
    "topk=0.3+int4",
    "int8:stochastic",
    "nf4",
    "nf4:block=0",
    "topk=0.3+nf4",
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_shape_and_dtype_survive_float(shape: tuple, codec: str, dtype: type) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    expected = {"t": (x.shape, x.dtype)}
    update, _ = encode_update({"t": x}, codec + ("" if codec == "none" else ":small=0"), rng=rng)
    data = update.SerializeToString()
    with_expected = decode_update(data, expected=expected).arrays["t"]
    assert with_expected.shape == x.shape and with_expected.dtype == x.dtype
    plain = decode_update(data).arrays["t"]
    assert plain.shape == x.shape
    # the fp16 codec sends float16 on the wire; without `expected` that is what comes back
    assert plain.dtype == (np.float16 if codec == "fp16" else x.dtype)
    if codec == "none":
        assert np.array_equal(plain, x)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int8, np.uint8, np.bool_])
def test_non_float_tensors_stay_exact(shape: tuple, dtype: type) -> None:
    x = (np.arange(int(np.prod(shape))).reshape(shape) % 3).astype(dtype)
    update, residual = encode_update({"t": x}, "topk=0.01+int4:small=0")
    assert update.tensors[0].WhichOneof("kind") == "dense"
    out = decode_update(update.SerializeToString(), expected={"t": (x.shape, x.dtype)})
    assert out.arrays["t"].dtype == x.dtype and np.array_equal(out.arrays["t"], x)
    assert residual == {}


@SETTINGS
@given(
    x=hnp.arrays(
        np.float32,
        st.integers(min_value=1, max_value=400),
        # few distinct magnitudes: ties at the k-th value are common
        elements=st.sampled_from([0.0, 1.0, -1.0, 2.0, -2.0, 0.5, 3.0]),
    ),
    fraction=st.floats(min_value=0.001, max_value=1.0),
)
def test_topk_keeps_exactly_the_k_largest(x: np.ndarray, fraction: float) -> None:
    wire, decoded, _ = _one(x, f"topk={fraction!r}+int8:small=0:noef")
    q = wire.quantized
    k = topk_count(x.size, fraction)
    assert q.indices.count == k
    kept = decode_positions(q.indices.delta_varint, q.indices.count, x.size)
    assert kept.size == k and np.all(np.diff(kept) > 0)
    mag = np.abs(x)
    dropped = np.setdiff1d(np.arange(x.size), kept)
    if dropped.size:
        threshold = mag[kept].min()
        assert mag[dropped].max() <= threshold
        # ties at the threshold go to the lowest positions
        tied_dropped = dropped[mag[dropped] == threshold]
        tied_kept = kept[mag[kept] == threshold]
        if tied_dropped.size and tied_kept.size:
            assert tied_kept.max() < tied_dropped.min()
    assert np.all(decoded[dropped] == 0)


@SETTINGS
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=5),
    scales=st.lists(st.sampled_from([0.01, 1.0, 100.0]), min_size=5, max_size=5),
    fraction=st.floats(min_value=0.001, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_topk_keeps_the_k_largest_of_the_whole_update(
    sizes: list[int], scales: list[float], fraction: float, seed: int
) -> None:
    # tensors of different magnitudes, some values repeated so that ties occur
    rng = np.random.default_rng(seed)
    arrays = {
        f"t{i}": (rng.integers(-3, 4, n) * np.float32(scale)).astype(np.float32)
        for i, (n, scale) in enumerate(zip(sizes, scales, strict=False))
    }
    update, _ = encode_update(arrays, f"topk={fraction!r}+int8:small=0:noef")
    kept = {}
    for t in update.tensors:
        q = t.quantized
        n = arrays[q.name].size
        kept[q.name] = decode_positions(q.indices.delta_varint, q.indices.count, n)
    names = list(arrays)
    # the update's elements in tensor order: (magnitude, -tensor index, -position), largest first
    ranked = sorted(
        ((abs(float(v)), -i, -p) for i, name in enumerate(names)
         for p, v in enumerate(arrays[name])),
        reverse=True,
    )
    k = topk_count(sum(sizes), fraction)
    want = {(names[-i], -p) for _, i, p in ranked[:k]}
    got = {(name, int(p)) for name, positions in kept.items() for p in positions}
    assert got == want


def test_pertensor_keeps_the_fraction_of_each_tensor() -> None:
    rng = np.random.default_rng(0)
    arrays = {"big": rng.standard_normal(5000).astype(np.float32),
              "loud": (100 * (1 + rng.random(300))).astype(np.float32)}
    counts = {}
    for spec in ("topk=0.1+int8", "topk=0.1+int8:pertensor"):
        update, _ = encode_update(arrays, spec)
        counts[spec] = {t.quantized.name: t.quantized.indices.count for t in update.tensors}
    # update-wide: the loud small tensor goes whole, the rest of k from the big one
    assert counts["topk=0.1+int8"] == {"loud": 300, "big": 230}
    assert counts["topk=0.1+int8:pertensor"] == {"loud": 30, "big": 500}


@SETTINGS
@given(
    codec=st.sampled_from(
        [
            "int8",
            "int4",
            "fp16",
            "topk=0.05+int4",
            "topk=0.2+int8:block=16",
            "int4:stochastic",
            "nf4",
            "nf4:block=7",
            "topk=0.1+nf4",
        ]
    ),
    rounds=st.integers(min_value=1, max_value=6),
    n=st.integers(min_value=1, max_value=3000),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_error_feedback_conserves_the_sum(codec: str, rounds: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    spec = parse_codec(codec + ":small=0")
    residual: dict[str, np.ndarray] = {}
    total_in = np.zeros(n)
    total_out = np.zeros(n)
    bound = 0.0
    for _ in range(rounds):
        x = (rng.standard_normal(n) * rng.choice([1e-4, 1.0, 100.0])).astype(np.float32)
        bound += float(np.abs(x).max() + (np.abs(residual["t"]).max() if residual else 0.0))
        update, residual = encode_update({"t": x}, spec, residual=residual or None, rng=rng)
        total_in += x
        total_out += decode_update(update.SerializeToString()).arrays["t"].astype(np.float64)
        assert residual["t"].dtype == np.float32 and residual["t"].shape == x.shape
    # each round rounds (x + r) and (x + r) - decoded once in float32
    tol = 4 * EPS32 * bound + 1e-30
    assert np.allclose(total_out + residual["t"], total_in, rtol=0, atol=tol)


def test_error_feedback_off_returns_no_residual() -> None:
    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    for codec in ("none", "int8:noef", "topk=0.1+int4:noef", "fp16:noef", "nf4:noef"):
        _, residual = encode_update({"t": x}, codec)
        assert residual == {}


def test_encode_does_not_touch_inputs() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(5000).astype(np.float32)
    r = rng.standard_normal(5000).astype(np.float32)
    x0, r0 = x.copy(), r.copy()
    for codec in ("int8", "int4", "topk=0.01+int4", "fp16", "int8:noef", "nf4", "topk=0.01+nf4"):
        _, new = encode_update({"t": x}, codec, residual={"t": r})
        assert np.array_equal(x, x0) and np.array_equal(r, r0)
        if new:
            assert not np.shares_memory(new["t"], x) and not np.shares_memory(new["t"], r)
