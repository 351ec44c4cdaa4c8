"""Fuzz decode_update with thousands of damaged updates: only UpdateRejected may come out.

Seeded and deterministic. Byte-level damage (truncation, bit flips, overwrites,
insertions, splices) mostly breaks the protobuf framing; field-level tampering
(parse, change one field to a hostile value, re-serialize) reaches the codec's
own checks. A decode that succeeds must match `expected` exactly when given.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from fedge.common.errors import UpdateRejected
from fedge.common.update_codec import decode_update, encode_update
from fedge.v1 import tensor_pb2, update_pb2

CASES = 2400
CODECS = (
    "none",
    "fp16:small=0",
    "int8:small=16",
    "int4:small=0",
    "int8:block=0:small=0",
    "topk=0.05+int4:small=0",
    "topk=0.2+int8:block=16:small=0",
    "nf4:small=0",
    "nf4:block=0:small=0",
    "topk=0.2+nf4:block=16:small=0",
)
# hostile values for numeric fields
NASTY = (0, 1, 2, 3, 4, 7, 8, 9, 16, 127, 128, 255, 2**31, 2**32 - 1, 2**40, 2**62, 2**64 - 1)


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "fc.weight": rng.standard_normal((10, 41)).astype(np.float32),
        "fc.bias": rng.standard_normal(10).astype(np.float64),
        "bn.count": np.array(3, np.int64),
        "mask": np.array([True, False, True]),
    }


def _seeds() -> list[bytes]:
    arrays = _arrays()
    out = []
    for codec in CODECS:
        update, _ = encode_update(
            arrays, codec, run_id="r", round=3, metrics={"loss": 0.5}, num_examples=10
        )
        out.append(update.SerializeToString())
    return out


def _byte_mutation(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    op = int(rng.integers(6))
    if op == 0:  # truncate
        return bytes(buf[: int(rng.integers(len(buf)))])
    if op == 1:  # flip 1-8 bits
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(len(buf)))
            buf[i] ^= 1 << int(rng.integers(8))
        return bytes(buf)
    if op == 2:  # overwrite a byte with a nasty value
        buf[int(rng.integers(len(buf)))] = int(rng.choice([0x00, 0x7F, 0x80, 0xFF]))
        return bytes(buf)
    if op == 3:  # insert random bytes
        i = int(rng.integers(len(buf) + 1))
        return bytes(buf[:i]) + rng.bytes(int(rng.integers(1, 9))) + bytes(buf[i:])
    if op == 4:  # duplicate a slice (repeats fields, or breaks framing)
        i, j = sorted(int(v) for v in rng.integers(len(buf), size=2))
        return bytes(buf[:j]) + bytes(buf[i:j]) + bytes(buf[j:])
    # delete a slice
    i, j = sorted(int(v) for v in rng.integers(len(buf), size=2))
    return bytes(buf[:i]) + bytes(buf[j:])


def _field_mutation(data: bytes, rng: np.random.Generator) -> bytes:
    update = update_pb2.ModelUpdate.FromString(data)
    i = int(rng.integers(len(update.tensors)))
    enc = update.tensors[i]
    kind = enc.WhichOneof("kind")
    t = enc.dense if kind == "dense" else enc.quantized
    nasty = NASTY[int(rng.integers(len(NASTY)))]

    def shape() -> None:
        if len(t.shape) and rng.random() < 0.7:
            t.shape[int(rng.integers(len(t.shape)))] = nasty
        else:
            t.shape.append(nasty)

    def blob(field: str) -> Callable[[], None]:
        def run() -> None:
            old = getattr(t, field)
            choice = int(rng.integers(4))
            if choice == 0:
                new = old[: int(rng.integers(len(old) + 1))]
            elif choice == 1:
                new = old + rng.bytes(int(rng.integers(1, 5)))
            elif choice == 2:
                new = rng.bytes(len(old))
            else:
                new = bytes([0x00, 0x7C, 0x00, 0x7E, 0xFF, 0x7F, 0x80, 0xFF]) * (len(old) // 8 + 1)
                new = new[: len(old)]
            setattr(t, field, new)

        return run

    ops: list[Callable[[], None]] = [
        shape,
        lambda: t.ClearField("shape"),
        lambda: setattr(t, "dtype", int(rng.integers(0, 12))),
        lambda: setattr(t, "name", str(rng.choice(["", "conv.bias", "fc.weight", "x"]))),
        lambda: update.tensors.append(update.tensors[int(rng.integers(len(update.tensors)))]),
        lambda: update.tensors.__delitem__(i),
        lambda: enc.ClearField(kind),
        lambda: setattr(update, "codec", str(rng.choice(["", "int3", "topk=2+int8", "int8"]))),
        lambda: update.metrics.__setitem__("loss", float(rng.choice([np.nan, np.inf, 1.0]))),
    ]
    if kind == "dense":
        ops.append(blob("data"))
    else:
        ops += [
            lambda: setattr(t, "bits", nasty % 2**32),
            lambda: setattr(t, "block_size", nasty % 2**32),
            lambda: setattr(t, "scale_dtype", int(rng.integers(0, 12))),
            blob("scales"),
            blob("values"),
            blob("codebook"),
            lambda: t.ClearField("codebook"),
            lambda: setattr(t.indices, "count", nasty),
            blob_indices(t, rng),
            lambda: t.ClearField("indices"),
        ]
    for _ in range(int(rng.integers(1, 3))):
        ops[int(rng.integers(len(ops)))]()
    return update.SerializeToString()


def blob_indices(t: tensor_pb2.QuantizedTensor, rng: np.random.Generator) -> Callable[[], None]:
    def run() -> None:
        old = t.indices.delta_varint
        options = [
            old[:-1],
            old + b"\x80",
            old + b"\x01",
            b"\x00" + old[1:],
            b"\xff" * 10 + old,
            rng.bytes(max(1, len(old))),
            bytes(rng.integers(1, 3, size=t.indices.count, dtype=np.uint8)),
        ]
        t.indices.delta_varint = options[int(rng.integers(len(options)))]

    return run


def _check(data: bytes, expected: dict | None, reasons: Counter) -> bool:
    """Decode; True if accepted. Fails the test on any exception but UpdateRejected."""
    try:
        out = decode_update(data, expected=expected, max_elements=1 << 16)
    except UpdateRejected as e:
        assert e.reason != "decode_error", e  # a missing check, caught only by the net
        reasons[e.reason] += 1
        return False
    if expected is not None:
        assert sorted(out.arrays) == sorted(expected)  # matched by name, wire order kept
        for name, (shape, dtype) in expected.items():
            assert out.arrays[name].shape == shape and out.arrays[name].dtype == dtype
    for a in out.arrays.values():
        assert a.dtype.kind != "f" or np.isfinite(a).all()
    return True


def test_fuzz_decode_only_raises_update_rejected() -> None:
    rng = np.random.default_rng(20240601)
    seeds = _seeds()
    arrays = _arrays()
    expected = {k: (v.shape, v.dtype) for k, v in arrays.items()}
    reasons: Counter = Counter()
    accepted = 0
    for case in range(CASES):
        seed = seeds[case % len(seeds)]
        mutate = _byte_mutation if rng.random() < 0.5 else _field_mutation
        data = mutate(seed, rng)
        accepted += _check(data, expected, reasons)
        accepted += _check(data, None, reasons)
    # the fuzzer must reach the codec's own checks, not only protobuf's framing
    reach = ("malformed", "bad_scales", "bad_length", "bad_indices", "shape_mismatch")
    for reason in (*reach, "bad_codebook"):
        assert reasons[reason] > 0, reasons
    assert len(reasons) >= 10, reasons
    assert 0 < accepted < 2 * CASES
