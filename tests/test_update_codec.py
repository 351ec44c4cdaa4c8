"""encode_update / decode_update: round trips, metadata, and each way an update is rejected."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.common.codec_spec import parse_codec
from fedge.common.errors import UpdateRejected
from fedge.common.topk import decode_positions, encode_positions
from fedge.common.update_codec import (
    DEFAULT_MAX_UPDATE_BYTES,
    DecodedUpdate,
    decode_tensors,
    decode_update,
    encode_arrays,
    encode_update,
)
from fedge.common.varint import decode_uvarints, encode_uvarints
from fedge.v1 import tensor_pb2, update_pb2


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((8, 1, 5, 5)).astype(np.float32),
        "conv.bias": rng.standard_normal(8).astype(np.float32),
        "fc.weight": rng.standard_normal((10, 300)).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, np.int64),
    }


def _expected(arrays: dict[str, np.ndarray]) -> dict:
    return {k: (v.shape, v.dtype) for k, v in arrays.items()}


def _reject(data: bytes | update_pb2.ModelUpdate, reason: str, **kw) -> UpdateRejected:
    with pytest.raises(UpdateRejected) as info:
        decode_update(data, **kw)
    assert info.value.reason == reason, info.value
    return info.value


def test_round_trip_keeps_metadata_and_order() -> None:
    arrays = _model()
    update, _ = encode_update(
        arrays,
        "int8",
        run_id="run-1",
        round=42,
        base_version="sha256:abc",
        num_examples=640,
        metrics={"train-loss": 0.25, "num-examples": 640},
        is_delta=False,
    )
    out = decode_update(update.SerializeToString(), expected=_expected(arrays))
    assert isinstance(out, DecodedUpdate)
    assert list(out.arrays) == list(arrays)
    assert (out.run_id, out.round, out.base_version) == ("run-1", 42, "sha256:abc")
    assert (out.codec, out.is_delta, out.num_examples) == ("int8", False, 640)
    assert out.metrics == {"train-loss": 0.25, "num-examples": 640.0}
    assert out.arrays["bn.num_batches_tracked"] == 7
    # small tensors (the bias) go dense in fp16
    assert np.array_equal(out.arrays["conv.bias"], arrays["conv.bias"].astype(np.float16))
    assert np.abs(out.arrays["fc.weight"] - arrays["fc.weight"]).max() < 0.05
    # a parsed message is accepted as well as bytes
    assert list(decode_update(update).arrays) == list(arrays)


def test_codec_field_is_canonical() -> None:
    update, _ = encode_update(_model(), "int4:noef+topk=0.1")
    assert update.codec == "topk=0.1+int4:noef"
    update, _ = encode_update(_model(), parse_codec("int8:block=64"))
    assert update.codec == "int8:block=64"


def test_encode_arrays_and_decode_tensors_for_snapshots() -> None:
    arrays = _model()
    tensors, residual = encode_arrays(arrays, "none")
    assert residual == {}
    assert all(isinstance(t, tensor_pb2.EncodedTensor) for t in tensors)
    out = decode_tensors(tensors, expected=_expected(arrays))
    assert all(np.array_equal(out[k], arrays[k]) for k in arrays)
    with pytest.raises(UpdateRejected) as info:
        decode_tensors(tensors, max_elements=100)
    assert info.value.reason == "too_large"


def test_bytes_ratio_int8_and_int4() -> None:
    x = {"w": np.random.default_rng(0).standard_normal(128 * 1000).astype(np.float32)}
    for codec, bar in (("int8", 0.255), ("int4", 0.13), ("topk=0.01+int4", 0.01)):
        update, _ = encode_update(x, codec)
        assert len(update.SerializeToString()) / (4 * 128 * 1000) <= bar


def test_float32_scales_when_float16_cannot_hold_them() -> None:
    rng = np.random.default_rng(0)
    for magnitude in (1e7, 1e-9):
        x = (rng.standard_normal(4096) * magnitude).astype(np.float32)
        update, _ = encode_update({"t": x}, "int8:noef")
        q = update.tensors[0].quantized
        assert q.scale_dtype == tensor_pb2.DTYPE_FLOAT32
        step = np.repeat(np.frombuffer(q.scales, "<f4"), 256)
        out = decode_update(update.SerializeToString()).arrays["t"]
        assert np.all(np.abs(out - x) <= 0.5 * step + 1e-6 * np.abs(x))
    update, _ = encode_update({"t": rng.standard_normal(4096).astype(np.float32)}, "int8")
    assert update.tensors[0].quantized.scale_dtype == tensor_pb2.DTYPE_FLOAT16


def test_fp16_clips_to_its_range_and_feeds_back_the_rest() -> None:
    for n in (10, 100_000):  # numpy and torch conversion paths
        x = np.full(n, 1e6, np.float32)
        x[1::2] = -3.0
        update, residual = encode_update({"t": x}, "fp16:small=0")
        out = decode_update(
            update.SerializeToString(), expected={"t": ((n,), np.dtype(np.float32))}
        ).arrays["t"]
        assert out.dtype == np.float32
        assert np.all(out[0::2] == 65504.0) and np.all(out[1::2] == -3.0)
        assert np.allclose(out + residual["t"], x)


def test_all_zero_tensor() -> None:
    x = np.zeros(5000, np.float32)
    for codec in ("int8", "int4", "topk=0.01+int4", "fp16"):
        update, residual = encode_update({"t": x}, codec)
        out = decode_update(update.SerializeToString()).arrays["t"]
        assert np.array_equal(out, x) and not residual["t"].any()


# ---------------------------------------------------------------- encoder errors


@pytest.mark.parametrize(
    ("arrays", "residual", "message"),
    [
        ({"t": np.array([1.0, np.nan] * 3000, np.float32)}, None, "NaN or Inf"),
        ({"t": np.array([1.0, np.inf], np.float32)}, None, "NaN or Inf"),
        ({"t": np.ones(3, np.complex64)}, None, "cannot be sent"),
        ({"": np.ones(3, np.float32)}, None, "non-empty"),
        ({"t": np.ones(3, np.float32)}, {"t": np.ones(4, np.float32)}, "shape"),
        ({"t": np.ones(3, np.float32)}, {"u": np.ones(3, np.float32)}, "not in the update"),
        ({"t": np.ones(3, np.int64)}, {"t": np.ones(3, np.float32)}, "non-float"),
    ],
)
def test_encoder_refuses_bad_input(arrays: dict, residual: dict | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_update(arrays, "int8", residual=residual)


def test_encoder_refuses_non_finite_metrics() -> None:
    with pytest.raises(ValueError, match="loss"):
        encode_update(_model(), "int8", metrics={"loss": float("nan")})


# ---------------------------------------------------------------- rejections


def _tampered(
    mutate: Callable[[update_pb2.ModelUpdate], None], codec: str = "int8:small=0"
) -> tuple[bytes, dict]:
    arrays = _model()
    update, _ = encode_update(arrays, codec)
    mutate(update)
    return update.SerializeToString(), _expected(arrays)


def _q(update: update_pb2.ModelUpdate, i: int = 0) -> tensor_pb2.QuantizedTensor:
    return update.tensors[i].quantized


def _set_varints(update: update_pb2.ModelUpdate, deltas: list[int], count: int) -> None:
    q = _q(update)
    q.indices.count = count
    q.indices.delta_varint = encode_uvarints(np.array(deltas, np.uint64))


TAMPERING = {
    "bits": (lambda u: setattr(_q(u), "bits", 3), "bad_bits"),
    "bits_zero": (lambda u: setattr(_q(u), "bits", 0), "bad_bits"),
    "scale_count": (lambda u: setattr(_q(u), "scales", _q(u).scales[:-2]), "bad_scales"),
    "scale_dtype": (lambda u: setattr(_q(u), "scale_dtype", tensor_pb2.DTYPE_INT8), "bad_scales"),
    "scale_nan": (
        lambda u: setattr(_q(u), "scales", b"\x00\x7e" + _q(u).scales[2:]),
        "non_finite",
    ),
    "scale_negative": (
        lambda u: setattr(_q(u), "scales", b"\x00\xbc" + _q(u).scales[2:]),
        "bad_scales",
    ),
    "block_size": (lambda u: setattr(_q(u), "block_size", 7), "bad_scales"),
    "values_short": (lambda u: setattr(_q(u), "values", _q(u).values[:-1]), "bad_length"),
    "values_long": (lambda u: setattr(_q(u), "values", _q(u).values + b"\x00"), "bad_length"),
    "int8_minus_128": (
        lambda u: setattr(_q(u), "values", b"\x80" + _q(u).values[1:]),
        "bad_values",
    ),
    "restore_dtype": (lambda u: setattr(_q(u), "dtype", tensor_pb2.DTYPE_INT64), "bad_dtype"),
    "unspecified_dtype": (
        lambda u: setattr(_q(u), "dtype", tensor_pb2.DTYPE_UNSPECIFIED),
        "bad_dtype",
    ),
    "unknown_enum": (lambda u: setattr(u.tensors[3].dense, "dtype", 99), "bad_dtype"),
    "shape": (lambda u: _q(u).shape.__setitem__(0, 9), "shape_mismatch"),
    "ndim": (lambda u: _q(u).shape.append(1), "shape_mismatch"),
    "dense_length": (
        lambda u: setattr(u.tensors[3].dense, "data", u.tensors[3].dense.data[:-1]),
        "bad_length",
    ),
    "dense_dtype": (
        lambda u: setattr(u.tensors[3].dense, "dtype", tensor_pb2.DTYPE_INT32),
        "dtype_mismatch",
    ),
    "duplicate": (lambda u: u.tensors.append(u.tensors[0]), "duplicate_tensor"),
    "missing": (lambda u: u.tensors.pop(), "missing_tensor"),
    "unexpected": (lambda u: setattr(_q(u), "name", "other"), "unexpected_tensor"),
    "empty_name": (lambda u: setattr(_q(u), "name", ""), "malformed"),
    "no_kind": (lambda u: u.tensors[0].ClearField("quantized"), "malformed"),
    "codec": (lambda u: setattr(u, "codec", "int3"), "bad_codec"),
    "metric_nan": (lambda u: u.metrics.__setitem__("loss", float("nan")), "non_finite"),
    "indices_on_dense_quantized": (lambda u: _set_varints(u, [1], 1), "bad_length"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_update_is_rejected(case: str) -> None:
    mutate, reason = TAMPERING[case]
    data, expected = _tampered(mutate)
    _reject(data, reason, expected=expected)


def test_tampered_without_expected() -> None:
    # needs no model knowledge to catch
    for case in ("bits", "scale_count", "scale_nan", "values_short", "duplicate", "codec"):
        mutate, reason = TAMPERING[case]
        data, _ = _tampered(mutate)
        _reject(data, reason)


def _sparse(mutate: Callable[[update_pb2.ModelUpdate], None], codec: str) -> bytes:
    x = {"t": np.random.default_rng(0).standard_normal(1000).astype(np.float32)}
    update, _ = encode_update(x, codec + ":small=0")
    mutate(update)
    return update.SerializeToString()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda u: _set_varints(u, [1, 0, 2] + [1] * 7, 10), "bad_indices"),  # not ascending
        (lambda u: _set_varints(u, [995] + [1] * 9, 10), "bad_indices"),  # past the end
        (lambda u: _set_varints(u, [1] * 10, 11), "bad_indices"),  # count disagrees
        (lambda u: _set_varints(u, [1] * 10, 2000), "bad_indices"),  # more than n
        (
            lambda u: setattr(_q(u).indices, "delta_varint", _q(u).indices.delta_varint[:-1]),
            "bad_indices",
        ),
        (
            lambda u: setattr(_q(u).indices, "delta_varint", b"\x81" * 10),
            "bad_indices",
        ),  # stream ends inside a varint
        (
            lambda u: setattr(_q(u).indices, "delta_varint", b"\x81\x00" + b"\x01" * 9),
            "bad_indices",
        ),  # overlong
        (
            lambda u: setattr(_q(u).indices, "delta_varint", b"\xff\xff\x7f" + b"\x01" * 9),
            "bad_indices",
        ),  # a 3-byte varint where 1000 elements need at most 2
    ],
)
def test_bad_sparse_indices(mutate: Callable, reason: str) -> None:
    data = _sparse(mutate, "topk=0.01+int8")
    _reject(data, reason, expected={"t": ((1000,), np.dtype(np.float32))})
    _reject(data, reason)


def test_int4_out_of_range_nibbles() -> None:
    def minus_eight(u: update_pb2.ModelUpdate) -> None:
        _q(u).values = b"\x08" + _q(u).values[1:]

    _reject(_sparse(minus_eight, "int4"), "bad_values")

    def padding(u: update_pb2.ModelUpdate) -> None:
        _q(u).values = _q(u).values[:-1] + bytes([_q(u).values[-1] | 0x10])

    x = {"t": np.random.default_rng(0).standard_normal(1001).astype(np.float32)}
    update, _ = encode_update(x, "int4:small=0")
    padding(update)
    _reject(update.SerializeToString(), "bad_values")


def test_dense_nan_and_bad_bool() -> None:
    update, _ = encode_update({"t": np.ones(4, np.float32)}, "none")
    update.tensors[0].dense.data = np.array([1, np.nan, 1, 1], "<f4").tobytes()
    _reject(update.SerializeToString(), "non_finite")
    update, _ = encode_update({"t": np.ones(4, np.bool_)}, "none")
    update.tensors[0].dense.data = b"\x01\x02\x00\x01"
    _reject(update.SerializeToString(), "bad_values")


def test_scales_that_overflow_are_rejected() -> None:
    update, _ = encode_update({"t": np.ones(2000, np.float32)}, "int8:block=128:small=0:noef")
    q = update.tensors[0].quantized
    q.scale_dtype = tensor_pb2.DTYPE_FLOAT32
    q.scales = np.full(16, 3e38, "<f4").tobytes()
    _reject(update.SerializeToString(), "non_finite")


def test_garbage_and_wrong_types() -> None:
    _reject(b"\xff\xff\xff\xff", "malformed")
    _reject(b"\x0a\x05ab", "malformed")  # truncated string field
    _reject("not bytes", "malformed")  # type: ignore[arg-type]


# ---------------------------------------------------------------- size and allocation


def test_size_cap() -> None:
    update, _ = encode_update(_model(), "none")
    data = update.SerializeToString()
    assert DEFAULT_MAX_UPDATE_BYTES >= 256 << 20
    _reject(data, "too_large", max_bytes=len(data) - 1)
    _reject(update, "too_large", max_bytes=len(data) - 1)
    assert decode_update(data, max_bytes=len(data)).arrays


def _huge(kind: str, dims: list[int]) -> bytes:
    update = update_pb2.ModelUpdate(codec="topk=0.01+int8")
    t = update.tensors.add()
    if kind == "dense":
        t.dense.name = "t"
        t.dense.shape.extend(dims)
        t.dense.dtype = tensor_pb2.DTYPE_FLOAT32
        t.dense.data = b"\x00\x00\x80\x3f"
    else:
        q = t.quantized
        q.name = "t"
        q.shape.extend(dims)
        q.dtype = tensor_pb2.DTYPE_FLOAT32
        q.bits = 8
        q.block_size = 128
        q.scale_dtype = tensor_pb2.DTYPE_FLOAT16
        q.scales = np.array([1.0], "<f2").tobytes()
        q.values = b"\x01"
        q.indices.count = 1
        q.indices.delta_varint = encode_uvarints(np.array([dims[0]], np.uint64))
    return update.SerializeToString()


@pytest.mark.parametrize(
    ("kind", "dims", "reason"),
    [
        ("sparse", [2**33], "too_large"),  # 32 GiB dense from a 40-byte message
        ("sparse", [2**20, 2**20], "too_large"),
        ("sparse", [2**62], "too_large"),
        ("dense", [2**40], "too_large"),
        ("dense", [2**20], "bad_length"),
        ("dense", [2**63, 2**63], "too_large"),
        ("dense", [0, 2**63], "too_large"),
        ("dense", [1] * 40, "shape_mismatch"),
    ],
)
def test_huge_declared_shapes_rejected_without_allocation(
    kind: str, dims: list[int], reason: str
) -> None:
    data = _huge(kind, dims)
    tracemalloc.start()
    try:
        _reject(data, reason)
        _reject(data, "shape_mismatch", expected={"t": ((10,), np.dtype(np.float32))})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_element_budget_is_total_over_tensors() -> None:
    arrays = {f"t{i}": np.zeros(1000, np.float32) for i in range(5)}
    update, _ = encode_update(arrays, "topk=0.01+int8:small=0")
    data = update.SerializeToString()
    assert len(decode_update(data, max_elements=5000).arrays) == 5
    _reject(data, "too_large", max_elements=4999)


def test_decode_returns_writable_arrays() -> None:
    update, _ = encode_update(_model(), "int8")
    for codec_update in (update, encode_update(_model(), "none")[0]):
        out = decode_update(codec_update.SerializeToString())
        for a in out.arrays.values():
            assert a.flags.writeable


def test_varint_round_trip_and_limits() -> None:
    values = np.array([0, 1, 127, 128, 16383, 16384, 2**35, 2**63 - 1], np.uint64)
    data = encode_uvarints(values)
    assert np.array_equal(decode_uvarints(data, values.size, 2**63 - 1), values)
    assert encode_uvarints(np.array([300], np.uint64)) == b"\xac\x02"  # protobuf's example
    with pytest.raises(UpdateRejected):
        decode_uvarints(data, values.size, 2**40)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=2**63 - 1), max_size=200),
)
def test_varints_round_trip(values: list[int]) -> None:
    arr = np.array(values, np.uint64)
    data = encode_uvarints(arr)
    assert np.array_equal(decode_uvarints(data, arr.size, 2**63 - 1), arr)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=10**7),
    picks=st.lists(st.integers(min_value=0, max_value=10**7 - 1), max_size=100),
)
def test_positions_round_trip(n: int, picks: list[int]) -> None:
    positions = np.unique(np.array([p % n for p in picks], np.int64))
    data = encode_positions(positions)
    assert np.array_equal(decode_positions(data, positions.size, n), positions)


def test_malloc_tuning_is_idempotent_and_can_be_turned_off() -> None:
    code = "from fedge.common.alloc import tune_malloc as t; print(t(), t())"
    env = {**os.environ, "FEDGE_MALLOC_TUNING": "0"}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert off.stdout.split() == ["False", "False"]
    env["FEDGE_MALLOC_TUNING"] = "1"
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    first, second = on.stdout.split()
    assert first == second and (first == "True" or not sys.platform.startswith("linux"))


def test_device_memory_policy_turns_the_speed_policy_off() -> None:
    code = (
        "import os; from fedge.common.alloc import limit_heap_growth, release_memory, tune_malloc;"
        "print(limit_heap_growth(), tune_malloc(), os.environ.get('FEDGE_MALLOC_TUNING', '-'));"
        "release_memory()"
    )
    env = {k: v for k, v in os.environ.items() if k != "FEDGE_MALLOC_TUNING"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if sys.platform.startswith("linux"):
        assert done.stdout.split() == ["True", "False", "0"]
    else:
        assert done.stdout.split() == ["False", "False", "-"]
