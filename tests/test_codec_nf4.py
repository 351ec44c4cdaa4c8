"""The nf4 codec: 4-bit indices into 16 levels fitted per tensor (common/codebook.py).

Spec grammar, the wire form decoded independently, the nearest-level error
bound, beating bitsandbytes' NF4 at fewer bytes, error feedback, malformed
input, and the bench's cnn-delta path at a tiny size.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge.bench import codec_bench
from fedge.common import codebook as cb
from fedge.common.codec_spec import CodecSpec, parse_codec
from fedge.common.errors import CodecSpecError, UpdateRejected
from fedge.common.update_codec import decode_update, encode_update
from fedge.v1 import tensor_pb2, update_pb2

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _one(x: np.ndarray, spec: str, **kw) -> tuple[tensor_pb2.QuantizedTensor, np.ndarray, dict]:
    update, residual = encode_update({"t": x}, spec, **kw)
    decoded = decode_update(update.SerializeToString()).arrays["t"]
    return update.tensors[0].quantized, decoded, residual


def _wire_decode(q: tensor_pb2.QuantizedTensor) -> np.ndarray:
    """The wire format read from its description alone, element by element in numpy."""
    n = math.prod(q.shape)
    levels = np.frombuffer(q.codebook, "<f4")
    scales = np.frombuffer(q.scales, "<f2").astype(np.float32)
    packed = np.frombuffer(q.values, np.uint8)
    index = np.empty(packed.size * 2, np.uint8)
    index[0::2] = packed & 0x0F  # low nibble first
    index[1::2] = packed >> 4
    block = q.block_size if 0 < q.block_size < n else max(n, 1)
    per_value = np.repeat(scales, block)[:n]
    return (per_value * levels[index[:n]]).astype(np.float32).reshape(tuple(q.shape))


def _rel_l2(x: np.ndarray, y: np.ndarray) -> float:
    x64 = x.astype(np.float64)
    return float(np.linalg.norm(y.astype(np.float64) - x64) / np.linalg.norm(x64))


# ---------------------------------------------------------------- spec


def test_spec_spellings() -> None:
    assert parse_codec("nf4").canonical == "nf4"
    assert parse_codec(" NF4:block=64 ").canonical == "nf4"  # 64 is nf4's default
    assert parse_codec("nf4:block=128").canonical == "nf4:block=128"
    assert parse_codec("nf4:noef+topk=0.01").canonical == "topk=0.01+nf4:noef"
    spec = parse_codec("nf4")
    assert spec.bits == 4 and spec.codebook and spec.block == 64 and spec.uses_error_feedback
    assert parse_codec("int4").block == 128 and not parse_codec("int4").codebook
    assert parse_codec(CodecSpec(bits=4, codebook=True, block=32).canonical).block == 32


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nf4:stochastic", "'stochastic' applies to int8/int4, not 'nf4'"),
        ("nf4+int4", "more than one value codec"),
        ("nf3", "unknown codec 'nf3'"),
        ("fp16:block=64", "'block' applies to int8/int4/nf4"),
    ],
)
def test_spec_refusals(spec: str, message: str) -> None:
    with pytest.raises(CodecSpecError, match=message):
        parse_codec(spec)


def test_spec_fields_refused() -> None:
    with pytest.raises(CodecSpecError, match="needs bits=4"):
        CodecSpec(bits=8, codebook=True)
    with pytest.raises(CodecSpecError, match="not nf4"):
        CodecSpec(bits=4, codebook=True, stochastic=True)


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 1001, 70_000, 300_001])
@pytest.mark.parametrize("block", [0, 1, 7, 64])
def test_decode_is_the_wire_format_and_the_residual_is_exact(n: int, block: int) -> None:
    rng = np.random.default_rng(n + block)
    x = (rng.standard_normal(n) * rng.choice([1e-3, 1.0], size=n)).astype(np.float32)
    q, decoded, residual = _one(x, f"nf4:block={block}:small=0")
    assert q.bits == 4 and len(q.codebook) == cb.CODEBOOK_BYTES
    assert q.scale_dtype == tensor_pb2.DTYPE_FLOAT16 and q.block_size == block
    assert len(q.values) == (n + 1) // 2
    assert np.array_equal(decoded, _wire_decode(q))
    # error feedback keeps exactly what the coordinator did not get
    assert np.array_equal(residual["t"], x - decoded)


magnitudes = st.sampled_from([1e-30, 1e-12, 1e-6, 1e-3, 1.0, 1e3, 1e8, 1e30])
float_arrays = hnp.arrays(
    np.float32,
    st.integers(min_value=1, max_value=700),
    elements=st.floats(-1.0, 1.0, width=32),
)


@SETTINGS
@given(x=float_arrays, scale=magnitudes, block=st.sampled_from([0, 1, 7, 64, 128, 1000]))
def test_each_value_gets_a_nearest_level(x: np.ndarray, scale: float, block: int) -> None:
    """Within 4 fine bins of the nearest level its block can express (bins are
    1/127 of the block's range; a level is chosen per bin, by the bin's mean)."""
    x = (x * np.float32(scale)).astype(np.float32)
    q, decoded, _ = _one(x, f"nf4:block={block}:small=0:noef")
    levels = np.frombuffer(q.codebook, "<f4").astype(np.float64)
    scales = np.frombuffer(q.scales, "<f2").astype(np.float64)
    kb = block if 0 < block < x.size else x.size
    per_value = np.repeat(scales, kb)[: x.size]
    x64 = x.astype(np.float64)
    nearest = np.abs(x64[:, None] - per_value[:, None] * levels[None, :]).min(axis=1)
    top = float(np.abs(x64).max())
    err = np.abs(decoded.astype(np.float64) - x64)
    # a block of subnormal-range magnitude (scale * M < GRID / float32 max) has its
    # inverse step capped at float32's max (codebook.inverse_steps): bins that much coarser
    eff = per_value * top
    coarser = np.maximum(1.0, cb.GRID / np.maximum(eff * np.finfo(np.float32).max, 1e-300))
    slack = per_value * top * 4 / cb.GRID * coarser
    assert np.all(err <= nearest + slack + 1e-6 * np.abs(x64) + 1e-44)
    assert np.all(np.abs(decoded) <= top * (1 + 1e-6))


def test_a_block_near_the_smallest_normal_keeps_its_values() -> None:
    """Such a block's step is capped (codebook.inverse_steps); its levels must still be
    fitted in the block's units (found by hypothesis: 5.96e-38 came back as 9.5e-39)."""
    for v in (5.9604645e-38, 1.1920929e-37, -2.0e-37):
        x = np.array([v], np.float32)
        _, decoded, _ = _one(x, "nf4:block=0:small=0:noef")
        assert decoded[0] == x[0]


def test_zero_and_constant_tensors() -> None:
    for x in (np.zeros(1000, np.float32), np.full(1000, -2.5, np.float32)):
        _, decoded, residual = _one(x, "nf4:small=0")
        assert np.array_equal(decoded, x) or _rel_l2(x, decoded) < 0.1
        assert np.array_equal(residual["t"], x - decoded)
    # exact zeros inside a tensor come back exactly (a level settles on 0)
    x = np.random.default_rng(0).standard_normal(20_000).astype(np.float32)
    x[::3] = 0
    _, decoded, _ = _one(x, "nf4:small=0")
    assert np.all(decoded[::3] == 0)


def test_beats_nf4_at_fewer_bytes() -> None:
    """Normal values (NF4's home ground): lower error than bitsandbytes' NF4 in fewer bytes."""
    x = np.random.default_rng(3).standard_normal(1 << 16).astype(np.float32)
    update, _ = encode_update({"t": x}, "nf4:small=0:noef")
    ours = _rel_l2(x, decode_update(update.SerializeToString()).arrays["t"])
    packed, absmax = codec_bench.nf4_reference_encode(x)
    ref = _rel_l2(x, codec_bench.nf4_reference_decode(packed, absmax, x.shape))
    assert ours < 0.97 * ref
    assert update.ByteSize() < packed.nbytes + absmax.nbytes
    assert update.ByteSize() / x.nbytes < 0.135


def test_refuses_nan_and_inf() -> None:
    x = np.ones(500, np.float32)
    for bad in (np.nan, np.inf):
        x[7] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            encode_update({"t": x}, "nf4:small=0")


def test_encode_is_deterministic() -> None:
    x = np.random.default_rng(5).standard_normal(400_000).astype(np.float32)
    first = encode_update({"t": x}, "nf4")[0].SerializeToString()
    assert encode_update({"t": x}, "nf4")[0].SerializeToString() == first


# ---------------------------------------------------------------- malformed input


def _nf4_update(n: int = 301) -> update_pb2.ModelUpdate:
    x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    update, _ = encode_update({"t": x}, "nf4:small=0:block=16")
    return update


def _q(update: update_pb2.ModelUpdate) -> tensor_pb2.QuantizedTensor:
    return update.tensors[0].quantized


def _set_level(update: update_pb2.ModelUpdate, value: float) -> None:
    levels = np.frombuffer(_q(update).codebook, "<f4").copy()
    levels[3] = value
    _q(update).codebook = levels.tobytes()


def _overflow(update: update_pb2.ModelUpdate) -> None:
    """A scale of 2 (float16 0x4000) times a level of 3e38: beyond float32."""
    _set_level(update, 3e38)
    _q(update).scales = b"\x00\x40" + _q(update).scales[2:]


TAMPERING = {
    "short_codebook": (lambda u: setattr(_q(u), "codebook", _q(u).codebook[:-4]), "bad_codebook"),
    "long_codebook": (
        lambda u: setattr(_q(u), "codebook", _q(u).codebook + b"\0" * 4),
        "bad_codebook",
    ),
    "codebook_bits8": (lambda u: setattr(_q(u), "bits", 8), "bad_length"),
    "nan_level": (lambda u: _set_level(u, float("nan")), "non_finite"),
    "inf_level": (lambda u: _set_level(u, float("inf")), "non_finite"),
    "overflow": (lambda u: _overflow(u), "non_finite"),
    "negative_scale": (
        lambda u: setattr(_q(u), "scales", b"\x00\xbc" + _q(u).scales[2:]),
        "bad_scales",
    ),
    "nan_scale": (lambda u: setattr(_q(u), "scales", b"\x00\x7e" + _q(u).scales[2:]), "non_finite"),
    "scale_count": (lambda u: setattr(_q(u), "scales", _q(u).scales[:-2]), "bad_scales"),
    "values_short": (lambda u: setattr(_q(u), "values", _q(u).values[:-1]), "bad_length"),
    "padding_nibble": (
        lambda u: setattr(_q(u), "values", _q(u).values[:-1] + bytes([_q(u).values[-1] | 0xF0])),
        "bad_values",
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_malformed_nf4_is_rejected_with_a_reason(case: str) -> None:
    update = _nf4_update()
    tamper, reason = TAMPERING[case]
    tamper(update)
    data = update.SerializeToString()
    for expected in (None, {"t": ((301,), np.dtype(np.float32))}):
        with pytest.raises(UpdateRejected) as info:
            decode_update(data, expected=expected)
        assert info.value.reason == reason, info.value


def test_codebook_on_int8_values_is_refused() -> None:
    x = np.random.default_rng(1).standard_normal(300).astype(np.float32)
    update, _ = encode_update({"t": x}, "int8:small=0")
    _q(update).codebook = np.zeros(cb.LEVELS, "<f4").tobytes()
    with pytest.raises(UpdateRejected) as info:
        decode_update(update.SerializeToString())
    assert info.value.reason == "bad_codebook"


def test_float16_restore_overflow_is_refused() -> None:
    x = np.random.default_rng(2).standard_normal(300).astype(np.float16)
    update, _ = encode_update({"t": x}, "nf4:small=0")
    assert decode_update(update.SerializeToString()).arrays["t"].dtype == np.float16
    _set_level(update, 1e6)
    with pytest.raises(UpdateRejected) as info:
        decode_update(update.SerializeToString())
    assert info.value.reason == "non_finite"


def test_int4_without_codebook_decodes_as_before() -> None:
    """Backward compatible: an int4 tensor (no codebook) keeps its meaning."""
    x = np.random.default_rng(4).standard_normal(1000).astype(np.float32)
    update, _ = encode_update({"t": x}, "int4:small=0")
    assert _q(update).codebook == b""
    scales = np.frombuffer(_q(update).scales, "<f2").astype(np.float32)
    packed = np.frombuffer(_q(update).values, np.uint8)
    q = np.empty(packed.size * 2, np.int8)
    q[0::2] = ((packed & 0x0F).astype(np.int8) << 4) >> 4
    q[1::2] = packed.astype(np.int8) >> 4
    want = np.repeat(scales, 128)[:1000] * q[:1000]
    assert np.array_equal(decode_update(update.SerializeToString()).arrays["t"], want)


# ---------------------------------------------------------------- bench


def test_bench_cnn_delta_rows_at_a_tiny_size() -> None:
    """The bench's cnn-delta path: a real (2-step) update, nf4 and the NF4 reference."""
    delta, source = codec_bench.cnn_delta_arrays(steps=2, batch_size=8)
    again, _ = codec_bench.cnn_delta_arrays(steps=2, batch_size=8)
    assert source in ("fashion-mnist", "digits")
    assert list(delta) == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
    ]  # fmt: skip
    assert all(np.array_equal(delta[k], again[k]) for k in delta)  # seeded
    assert sum(v.size for v in delta.values()) == 1_663_370
    assert float(np.abs(delta["fc2.bias"]).max()) > 0  # it trained
    ours = codec_bench.measure("nf4", "cnn-delta", delta, repeats=1, budget_s=0.0)
    ref = codec_bench.measure_nf4_reference("cnn-delta", delta, repeats=1, budget_s=0.0)
    assert ours["tensor"] == ref["tensor"] == "cnn-delta"
    assert ref["codec"] == "nf4-reference"
    # bitsandbytes' layout: 4 bits a value and a float32 per 64
    assert ref["bytes_ratio"] == pytest.approx(4.5 / 32, abs=2e-4)
    assert ours["bytes_ratio"] < 0.135
    assert ours["rel_l2"] < ref["rel_l2"] < 0.2
    assert ours["encode_GBps"] > 0 and ref["decode_GBps"] > 0
