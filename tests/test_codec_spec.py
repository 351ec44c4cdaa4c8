"""Codec spec strings: what parses, to what, and what error a bad one gets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedge.common.codec_spec import DEFAULT_BLOCKS, DEFAULT_SMALL, CodecSpec, parse_codec
from fedge.common.errors import CodecSpecError


@pytest.mark.parametrize(
    ("text", "fields", "canonical"),
    [
        ("none", {"bits": None, "float16": False, "lossy": False}, "none"),
        ("fp16", {"float16": True, "bits": None, "error_feedback": True}, "fp16"),
        ("int8", {"bits": 8, "block": DEFAULT_BLOCKS[8], "stochastic": False}, "int8"),
        ("int4", {"bits": 4, "topk": None, "error_feedback": True}, "int4"),
        ("int8:block=64", {"bits": 8, "block": 64}, "int8:block=64"),
        ("int8:block=0", {"bits": 8, "block": 0}, "int8:block=0"),
        ("int4:stochastic", {"bits": 4, "stochastic": True}, "int4:stochastic"),
        ("topk=0.01+int4", {"bits": 4, "topk": 0.01}, "topk=0.01+int4"),
        (
            "topk=0.05+int8:block=512",
            {"bits": 8, "topk": 0.05, "block": 512},
            "topk=0.05+int8:block=512",
        ),
        ("int8:noef", {"bits": 8, "error_feedback": False}, "int8:noef"),
        ("fp16:small=0", {"float16": True, "small": 0}, "fp16:small=0"),
        # order of stages and options does not matter; the canonical form fixes it
        (
            "int4:noef+topk=1e-3:stochastic",
            {"bits": 4, "topk": 0.001, "stochastic": True, "error_feedback": False},
            "topk=0.001+int4:stochastic:noef",
        ),
        (" INT8 ", {"bits": 8}, "int8"),
        ("topk=1+int8", {"topk": 1.0}, "topk=1.0+int8"),
        ("topk=0.01+int4", {"topk_per_tensor": False}, "topk=0.01+int4"),
        ("topk=0.01:pertensor+int4", {"topk_per_tensor": True}, "topk=0.01+int4:pertensor"),
        ("int4", {"ahead": 0.0}, "int4"),
        ("int4:ahead=0.5", {"ahead": 0.5}, "int4:ahead=0.5"),
        ("topk=0.01+int4", {"ahead": 1.0}, "topk=0.01+int4"),
        ("topk=0.01+int4:ahead=1", {"ahead": 1.0}, "topk=0.01+int4"),
        ("topk=0.01+int4:ahead=0", {"ahead": 0.0}, "topk=0.01+int4:ahead=0.0"),
        ("topk=0.01+int4:noef", {"ahead": 0.0}, "topk=0.01+int4:noef"),
    ],
)
def test_good_specs(text: str, fields: dict, canonical: str) -> None:
    spec = parse_codec(text)
    for key, value in fields.items():
        assert getattr(spec, key) == value, key
    assert spec.canonical == canonical
    assert parse_codec(spec.canonical) == spec
    assert str(spec) == canonical


def test_lossy_and_error_feedback_defaults() -> None:
    assert not parse_codec("none").lossy
    assert not parse_codec("none").uses_error_feedback
    for text in ("fp16", "int8", "int4", "topk=0.1+int8"):
        spec = parse_codec(text)
        assert spec.lossy and spec.error_feedback and spec.uses_error_feedback
    assert not parse_codec("int8:noef").uses_error_feedback
    assert parse_codec("int8").small == DEFAULT_SMALL


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("topk=0.01+int3", "unknown codec 'int3' in 'topk=0.01+int3'"),
        ("int3", "'int3'"),
        ("", "empty codec spec"),
        ("int8+", "empty stage"),
        ("topk=0.01", "needs a value codec"),
        ("topk=0+int8", "'0'"),
        ("topk=1.5+int8", "'1.5'"),
        ("topk=abc+int8", "'abc'"),
        ("topk=nan+int8", "'nan'"),
        ("topk+int8", "topk needs a fraction"),
        ("topk=0.1+topk=0.2+int8", "topk given twice"),
        ("int8:pertensor", "'pertensor' applies to topk specs only"),
        ("int8:noef:ahead=1", "'ahead' needs error feedback"),
        ("int8:ahead", "needs a value"),
        ("int8:ahead=1.5", "expected 0 <= ahead <= 1"),
        ("int8:ahead=x", "expected 0 <= ahead <= 1"),
        ("topk=0.1+int8:pertensor=1", "takes no value"),
        ("int8+int4", "'int8' and 'int4'"),
        ("none+int8", "'none' and 'int8'"),
        ("topk=0.1+fp16", "not 'fp16'"),
        ("int8:block=x", "'x' for block"),
        ("int8:block=-4", "'-4' for block"),
        ("int8:block=99999999", "exceeds"),
        ("int8:block", "needs a value"),
        ("int8:frob", "unknown option 'frob'"),
        ("int8:stochastic=1", "'stochastic' takes no value"),
        ("int8:block=4:block=8", "'block' given twice"),
        ("fp16:block=64", "'block' applies to int8/int4"),
        ("fp16:stochastic", "'stochastic' applies to int8/int4"),
        ("none:noef", "'none' takes no options"),
        ("int8:small=lots", "'lots' for small"),
    ],
)
def test_bad_specs_name_the_part(text: str, named: str) -> None:
    with pytest.raises(CodecSpecError) as info:
        parse_codec(text)
    assert named in str(info.value)


def test_non_string_is_rejected() -> None:
    with pytest.raises(CodecSpecError):
        parse_codec(8)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 3},
        {"bits": 8, "float16": True},
        {"bits": 8, "block": -1},
        {"stochastic": True},
        {"topk": 0.1},
        {"bits": 8, "topk": 0.0},
        {"bits": 8, "topk": 2.0},
        {"bits": 8, "small": -1},
        {"bits": 8, "topk_per_tensor": True},
        {"bits": 8, "error_feedback": False, "ahead": 1.0},
        {"ahead": 0.5},
        {"bits": 8, "ahead": -0.1},
        {"bits": 8, "ahead": 2.0},
    ],
)
def test_direct_construction_is_validated(kwargs: dict) -> None:
    with pytest.raises(CodecSpecError):
        CodecSpec(**kwargs)


def test_ineffective_fields_are_normalised() -> None:
    # equal canonical strings must mean equal specs
    assert CodecSpec() == parse_codec("none")
    assert CodecSpec(small=3) == parse_codec("none")
    assert CodecSpec(float16=True, block=7) == parse_codec("fp16")


@given(
    value=st.sampled_from(["fp16", "int8", "int4"]),
    topk=st.one_of(st.none(), st.floats(min_value=1e-6, max_value=1.0)),
    block=st.integers(min_value=0, max_value=4096),
    stochastic=st.booleans(),
    noef=st.booleans(),
    small=st.integers(min_value=0, max_value=10**6),
    pertensor=st.booleans(),
    ahead=st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0)),
)
def test_canonical_round_trip(
    value: str,
    topk: float | None,
    block: int,
    stochastic: bool,
    noef: bool,
    small: int,
    pertensor: bool,
    ahead: float | None,
) -> None:
    is_int = value != "fp16"
    opts = [f"small={small}"]
    if is_int:
        opts.append(f"block={block}")
        if stochastic:
            opts.append("stochastic")
    if noef:
        opts.append("noef")
    elif ahead is not None:
        opts.append(f"ahead={ahead!r}")
    text = ":".join([value, *opts])
    if topk is not None and is_int:
        text = f"topk={topk!r}+{text}" + (":pertensor" if pertensor else "")
    spec = parse_codec(text)
    assert parse_codec(spec.canonical) == spec
    assert spec.error_feedback is not noef
    assert spec.small == small
    if ahead is not None and not noef:
        assert spec.ahead == ahead
    if is_int:
        assert spec.block == block and spec.bits == int(value[3:])
