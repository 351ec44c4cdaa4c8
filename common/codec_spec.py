"""Codec spec strings such as ``int8``, ``int4:stochastic`` or ``topk=0.01+int4``.

A spec names how a device compresses its update. Devices and coordinator pass
it around as a string (config key ``fedge.codec``, field ``ModelUpdate.codec``),
so parsing is strict and every spec has one canonical spelling.

Grammar: stages joined by ``+``, each ``name[:opt[:opt...]]``.

- value stages (exactly one): ``none`` (dense, lossless), ``fp16`` (dense
  float16), ``int8``, ``int4`` (symmetric absmax scales per block), ``nf4``
  (4-bit indices into 16 levels fitted to each tensor, a scale per block;
  common/codebook.py);
- ``topk=F`` (0 < F <= 1): keep the ``max(1, round(F*n))`` largest magnitudes
  of the update's n sparsified elements, chosen across all its tensors at once
  (``pertensor``: F of each tensor instead); needs ``int8``, ``int4`` or
  ``nf4`` for the kept values;
- options, on any stage, each at most once: ``block=N`` (elements per scale,
  0 = one scale per tensor; int and nf4 stages only), ``stochastic`` (unbiased
  rounding; int stages only), ``noef`` (no error feedback; lossy specs only),
  ``small=N`` (tensors with fewer than N elements stay dense and lossless;
  lossy specs only), ``pertensor`` (topk specs only), ``ahead=A`` (0 <= A <= 1:
  the device trains from the global model plus A x its residual, so local
  training starts where its unsent update points; the rest of the residual is
  added to the update as usual. Default 1 for topk specs with error feedback,
  whose residual is most of an update, else 0; error feedback specs only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedge.common.errors import CodecSpecError

# One fp16 scale per block. int4 (coarse steps, so outliers hurt more) keeps
# blocks of 128: 3 % over raw (~0.129 on the CNN, bar 0.135). int8 (fine steps)
# takes 256: 0.8 % over raw (~0.252, bar 0.255), which also leaves room for the
# fixed per-update overhead on tiny models (digits MLP: ~0.258, bar 0.26).
DEFAULT_BLOCKS = {8: 256, 4: 128}
DEFAULT_BLOCK = DEFAULT_BLOCKS[4]
# nf4 stores its block scales relative to the tensor's largest, so they always fit
# float16: blocks of 64 cost 4.25 bits a value (~0.133 of fp32 on the CNN, bar
# 0.135), and halve the error an outlier spreads against int4's 128 (docs/codec.md).
DEFAULT_CODEBOOK_BLOCK = 64
# Biases and norm parameters are a sliver of a model; below 256 elements a tensor
# under a lossy codec is sent dense in fp16 (a block scale would cost more than it
# saves, and error feedback keeps what fp16 rounding drops). The digits MLP's
# 640-element output layer is then quantized, which its uplink bar needs.
DEFAULT_SMALL = 256
# Top-k keeps ~99 % of an update on the device; training from global + residual
# (rather than adding the residual to an update trained without it) ended 1.5
# points higher on fashion-mnist-100 (docs/codec.md). Dense quantizers' residuals
# are rounding noise: 0 leaves them as they were measured.
DEFAULT_TOPK_AHEAD = 1.0
MAX_BLOCK = 1 << 24

#: the value stages a spec names exactly one of
VALUE_CODECS = ("none", "fp16", "int8", "int4", "nf4")
_QUANTIZED_STAGES = ("int8", "int4", "nf4")


@dataclass(frozen=True)
class CodecSpec:
    """A parsed codec spec; construct with `parse_codec` or directly (validated)."""

    bits: int | None = None
    float16: bool = False
    block: int | None = None  # None: the default for `bits` (DEFAULT_BLOCKS)
    stochastic: bool = False
    topk: float | None = None
    error_feedback: bool = True
    small: int = DEFAULT_SMALL
    topk_per_tensor: bool = False  # F of each tensor, not F of the whole update
    ahead: float | None = None  # None: `default_ahead`; see client/compression_mod.py
    codebook: bool = False  # nf4: 4-bit indices into fitted levels (needs bits=4)

    def __post_init__(self) -> None:
        if self.bits not in (None, 4, 8):
            raise CodecSpecError(f"bits must be None, 4 or 8, not {self.bits!r}")
        if self.float16 and self.bits is not None:
            raise CodecSpecError("fp16 and int quantization are exclusive")
        if self.codebook and self.bits != 4:
            raise CodecSpecError(f"a codebook (nf4) needs bits=4, not {self.bits!r}")
        if self.codebook and self.stochastic:
            raise CodecSpecError("stochastic rounding needs int8 or int4, not nf4")
        block = self.default_block if self.block is None else self.block
        object.__setattr__(self, "block", block)
        if not 0 <= block <= MAX_BLOCK:
            raise CodecSpecError(f"block must be in [0, {MAX_BLOCK}], not {self.block}")
        if self.small < 0:
            raise CodecSpecError(f"small must be >= 0, not {self.small}")
        if self.stochastic and self.bits is None:
            raise CodecSpecError("stochastic rounding needs int8 or int4")
        if self.topk is not None:
            if not (isinstance(self.topk, float | int) and 0.0 < self.topk <= 1.0):
                raise CodecSpecError(f"topk fraction must be in (0, 1], not {self.topk!r}")
            if self.bits is None:
                raise CodecSpecError("topk needs int8, int4 or nf4 for the kept values")
            object.__setattr__(self, "topk", float(self.topk))
        elif self.topk_per_tensor:
            raise CodecSpecError("pertensor applies to topk specs only")
        # Normalise fields that have no effect, so equal canonical strings mean equal specs.
        if self.bits is None:
            object.__setattr__(self, "block", DEFAULT_BLOCK)
        ahead = self.default_ahead if self.ahead is None else self.ahead
        if self.ahead is not None:
            if not (isinstance(ahead, float | int) and 0.0 <= ahead <= 1.0):
                raise CodecSpecError(f"ahead must be in [0, 1], not {ahead!r}")
            if ahead and not self.uses_error_feedback:
                raise CodecSpecError("ahead needs error feedback (a lossy spec without noef)")
        object.__setattr__(self, "ahead", float(ahead))
        if not self.lossy:
            object.__setattr__(self, "error_feedback", False)
            object.__setattr__(self, "small", DEFAULT_SMALL)

    @property
    def default_block(self) -> int:
        """Elements per scale when `block` is not given."""
        if self.codebook:
            return DEFAULT_CODEBOOK_BLOCK
        return DEFAULT_BLOCKS.get(self.bits, DEFAULT_BLOCK) if self.bits else DEFAULT_BLOCK

    @property
    def lossy(self) -> bool:
        """True when decoding may not give back the input exactly."""
        return self.bits is not None or self.float16 or self.topk is not None

    @property
    def uses_error_feedback(self) -> bool:
        """Whether encoding returns a residual to add next round."""
        return self.lossy and self.error_feedback

    @property
    def default_ahead(self) -> float:
        """1 for topk with error feedback (its residual is most of an update), else 0."""
        return DEFAULT_TOPK_AHEAD if self.topk is not None and self.uses_error_feedback else 0.0

    @property
    def canonical(self) -> str:
        """The one spelling of this spec: topk first, options after the value stage."""
        if not self.lossy:
            return "none"
        value = "fp16" if self.float16 else "nf4" if self.codebook else f"int{self.bits}"
        opts: list[str] = []
        if self.bits is not None and self.block != self.default_block:
            opts.append(f"block={self.block}")
        if self.stochastic:
            opts.append("stochastic")
        if not self.error_feedback:
            opts.append("noef")
        if self.small != DEFAULT_SMALL:
            opts.append(f"small={self.small}")
        if self.topk_per_tensor:
            opts.append("pertensor")
        if self.ahead != self.default_ahead:
            opts.append(f"ahead={self.ahead!r}")
        stage = ":".join([value, *opts])
        if self.topk is not None:
            return f"topk={float(self.topk)!r}+{stage}"
        return stage

    def __str__(self) -> str:
        return self.canonical


def _parse_int(value: str, what: str, part: str, spec: str) -> int:
    if not value.isdigit() or len(value) > 10:
        raise CodecSpecError(
            f"bad value {value!r} for {what} in {part!r} of {spec!r}: expected a whole number"
        )
    return int(value)


def _float_or_nan(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.nan


def _parse_topk(value: str, part: str, spec: str) -> float:
    fraction = _float_or_nan(value)
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise CodecSpecError(
            f"bad topk fraction {value!r} in {part!r} of {spec!r}: expected 0 < F <= 1"
        )
    return fraction


def _parse_fraction(value: str, key: str, spec: str) -> float:
    fraction = _float_or_nan(value)
    if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
        raise CodecSpecError(f"bad {key}={value!r} in {spec!r}: expected 0 <= {key} <= 1")
    return fraction


def parse_codec(spec: str) -> CodecSpec:
    """Parse a codec spec string; `CodecSpecError` names the offending part."""
    if not isinstance(spec, str):
        raise CodecSpecError(f"codec spec must be a string, not {type(spec).__name__}")
    text = spec.strip().lower()
    if not text:
        raise CodecSpecError("empty codec spec")
    value: str | None = None
    topk: float | None = None
    options: dict[str, str | None] = {}
    for stage in text.split("+"):
        if not stage:
            raise CodecSpecError(f"empty stage in {spec!r}")
        name, *opts = stage.split(":")
        if name.startswith("topk="):
            if topk is not None:
                raise CodecSpecError(f"topk given twice in {spec!r}")
            topk = _parse_topk(name[len("topk=") :], stage, spec)
        elif name in VALUE_CODECS:
            if value is not None:
                raise CodecSpecError(
                    f"more than one value codec ({value!r} and {name!r}) in {spec!r}"
                )
            value = name
        elif name == "topk":
            raise CodecSpecError(f"topk needs a fraction, e.g. 'topk=0.01', in {spec!r}")
        else:
            raise CodecSpecError(f"unknown codec {name!r} in {spec!r}")
        for opt in opts:
            key, sep, arg = opt.partition("=")
            if key not in ("block", "small", "stochastic", "noef", "pertensor", "ahead"):
                raise CodecSpecError(f"unknown option {opt!r} in {stage!r} of {spec!r}")
            if key in options:
                raise CodecSpecError(f"option {key!r} given twice in {spec!r}")
            if key in ("block", "small", "ahead") and not sep:
                raise CodecSpecError(f"option {key!r} needs a value ({key}=N) in {spec!r}")
            if key in ("stochastic", "noef", "pertensor") and sep:
                raise CodecSpecError(f"option {key!r} takes no value in {spec!r}")
            options[key] = arg if sep else None
    if value is None:
        if topk is not None:
            raise CodecSpecError(
                f"topk needs a value codec for the kept values: add '+int8' or '+int4' to {spec!r}"
            )
        raise CodecSpecError(f"no value codec (none, fp16, int8, int4, nf4) in {spec!r}")
    ahead: float | None = None
    if "ahead" in options:
        ahead = _parse_fraction(options["ahead"] or "", "ahead", spec)
        if ahead and (value == "none" or "noef" in options):
            raise CodecSpecError(f"option 'ahead' needs error feedback, in {spec!r}")
    if "pertensor" in options and topk is None:
        raise CodecSpecError(f"option 'pertensor' applies to topk specs only, in {spec!r}")
    if topk is not None and value not in _QUANTIZED_STAGES:
        raise CodecSpecError(f"topk combines with int8, int4 or nf4, not {value!r}, in {spec!r}")
    if "block" in options and value not in _QUANTIZED_STAGES:
        raise CodecSpecError(f"option 'block' applies to int8/int4/nf4, not {value!r}, in {spec!r}")
    if "stochastic" in options and value not in ("int8", "int4"):
        raise CodecSpecError(
            f"option 'stochastic' applies to int8/int4, not {value!r}, in {spec!r}"
        )
    if value == "none" and options:
        raise CodecSpecError(f"'none' takes no options ({', '.join(options)}) in {spec!r}")
    block = None
    if "block" in options:
        arg = options["block"] or ""
        block = _parse_int(arg, "block", f"block={arg}", spec)
        if block > MAX_BLOCK:
            raise CodecSpecError(f"block={block} exceeds {MAX_BLOCK} in {spec!r}")
    small = DEFAULT_SMALL
    if "small" in options:
        arg = options["small"] or ""
        small = _parse_int(arg, "small", f"small={arg}", spec)
    return CodecSpec(
        bits={"int8": 8, "int4": 4, "nf4": 4}.get(value),
        float16=value == "fp16",
        block=block,
        stochastic="stochastic" in options,
        topk=topk,
        error_feedback=value != "none" and "noef" not in options,
        small=small,
        topk_per_tensor="pertensor" in options,
        ahead=ahead,
        codebook=value == "nf4",
    )


def as_spec(spec: CodecSpec | str) -> CodecSpec:
    """Accept either form at API boundaries."""
    return spec if isinstance(spec, CodecSpec) else parse_codec(spec)
