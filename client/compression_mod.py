"""The compression mod: a Flower client `Mod` that sends encoded deltas, not weights.

Add it to any ClientApp whose train handler replies with full weights (one
ArrayRecord and one MetricRecord with `num-examples`, as Flower's strategies
expect): `ClientApp(mods=[compression_mod])`. On a `train` message it

1. remembers the global weights that came in (a compressed downlink has
   already been rebuilt into plain weights by `fedge.client.downlink_cache`,
   which wraps this mod),
2. calls the app,
3. takes the reply's full weights and computes `delta = local - global`,
4. encodes the delta with the codec named in the train config (`fedge.codec`),
   adding the error-feedback residual kept in `context.state` (a per-tensor
   ArrayRecord, so it survives between rounds and, on a device, restarts);
   with the codec option ``ahead=A`` (default 1 for top-k) A x the residual
   is added to the incoming model before step 2 instead, so the app trains
   from where the server would be had the device's unsent update arrived,
5. stores the new residual and replaces the reply's arrays with a single uint8
   array `fedge.update`: the serialized `ModelUpdate` (docs/CONTRACTS.md).

Under differential privacy (the train config names `fedge.dp-clip`, docs/privacy.md)
what is sent, the update plus the error-feedback residual, is clipped to that
L2 norm before quantizing (with `none`, the reply's full weights become
global + clipped update), and the reply carries a ConfigRecord `fedge.dp`
saying whether the unclipped norm was within it (adaptive clipping's bit).
What clipping cuts off is dropped, not kept in the residual.

When the config names no codec (or `none`), when the reply is an error, or
when it does not have the expected shape, the reply passes through untouched,
so a server without fedge's wrapper still gets what it asked for. Evaluate and
query messages always pass through.
"""

from __future__ import annotations

import contextvars
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
)

from fedge.client.downlink_cache import is_downlink, with_downlink
from fedge.client.flower_compat import ClientAppCallable, Mod
from fedge.common.codec_spec import parse_codec
from fedge.common.contract import (
    BASE_VERSION_KEY,
    CODEC_KEY,
    DP_BELOW_CLIP_KEY,
    DP_CLIP_KEY,
    DP_REPLY_KEY,
    RESET_RESIDUAL_KEY,
    RESIDUAL_STATE_KEY,
    RUN_ID_KEY,
    UPDATE_KEY,
)
from fedge.common.dp_clip import clip_to_norm
from fedge.common.records import config_record, model_record, records_of
from fedge.common.update_array import pack_update
from fedge.common.update_codec import encode_update

log = logging.getLogger(__name__)

WEIGHT_KEY = "num-examples"


def incoming_global(message: Message) -> dict[str, np.ndarray] | None:
    """The global weights a train message carries, as numpy.

    A compressed downlink is rebuilt into plain weights before this runs
    (`fedge.client.downlink_cache.with_downlink` wraps the mod).
    """
    found = model_record(message.content)
    if found is None:
        return None
    return {k: a.numpy() for k, a in found[1].items()}


def load_residual(context: Context, key: str = RESIDUAL_STATE_KEY) -> dict[str, np.ndarray]:
    """The error-feedback residual kept in `context.state` (empty if none yet)."""
    record = records_of(context.state, ArrayRecord).get(key)
    return {} if record is None else {k: a.numpy() for k, a in record.items()}


def store_residual(
    context: Context, residual: Mapping[str, np.ndarray], key: str = RESIDUAL_STATE_KEY
) -> None:
    """Keep the residual in `context.state` as an ArrayRecord (or clear it when empty)."""
    if residual:
        context.state[key] = ArrayRecord(
            {k: Array(np.asarray(v)) for k, v in residual.items()}
        )
    elif key in context.state:
        del context.state[key]


def _usable_residual(
    residual: dict[str, np.ndarray], model: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray] | None:
    """The residual if it fits this model tensor for tensor, else None (start afresh)."""
    if not residual:
        return None
    fits = all(k in model and residual[k].shape == model[k].shape for k in residual)
    return residual if fits else None


def _with_residual_applied(
    message: Message,
    global_: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray],
    ahead: float,
) -> Message:
    """`message` with its model replaced by global + ahead x residual (codec option).

    The app then trains from (near) the model the server would hold had this
    device's unsent update arrived, so its new update does not repeat what the
    residual already carries; `delta = local - global` includes that part. A new
    ArrayRecord replaces the old one, which the downlink cache may hold as its
    anchor, so nothing it keeps is changed.
    """
    found = model_record(message.content)
    if found is None:  # cannot happen: global_ came from it
        return message
    key, record = found
    arrays: dict[str, Array] = {}
    for name, array in record.items():
        if name in residual:
            g = global_[name]
            arrays[name] = Array(np.asarray(g + ahead * residual[name], dtype=g.dtype))
        else:
            arrays[name] = array
    message.content[key] = ArrayRecord(arrays)
    return message


def _scaled(residual: dict[str, np.ndarray], factor: float) -> dict[str, np.ndarray] | None:
    """`factor` x the residual; None when nothing of it is left."""
    if factor == 0.0:
        return None
    return {k: (v * np.float32(factor)).astype(v.dtype) for k, v in residual.items()}


def _delta(
    local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray] | None:
    """`local - global` per tensor in the global's dtype; None if they disagree.

    `local` is consumed: where dtypes agree the subtraction happens in place,
    so the device holds one copy of the model less.
    """
    if local.keys() != global_.keys():
        return None
    out: dict[str, np.ndarray] = {}
    for k, x in local.items():
        g = global_[k]
        if x.shape != g.shape or x.dtype.kind == "b" or g.dtype.kind == "b":
            return None
        if x.dtype == g.dtype and x.flags.writeable and x.ndim > 0:
            out[k] = np.subtract(x, g, out=x)
        elif x.dtype.kind == g.dtype.kind == "f" or x.dtype == g.dtype:
            out[k] = np.asarray(np.subtract(x, g, dtype=g.dtype))
        else:
            return None
    return out


def _num_examples(metrics: Mapping[str, Any]) -> int:
    value = metrics.get(WEIGHT_KEY, 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0
    return int(value)


def _rng(context: Context, server_round: int) -> np.random.Generator:
    """Seeded per (run seed, partition or node, round): stochastic rounding is reproducible."""
    who = context.node_config.get("partition-id", context.node_id)
    seed = int(context.run_config.get("seed", 0))
    return np.random.default_rng([seed, int(who), int(server_round)])


def dp_clip_of(cfg: Mapping[str, Any]) -> float | None:
    """The clipping norm the train config asks for (`fedge.dp-clip`), None when none/invalid."""
    value = cfg.get(DP_CLIP_KEY)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def clip_for_sending(
    delta: dict[str, np.ndarray], residual: Mapping[str, np.ndarray] | None, clip: float
) -> tuple[dict[str, np.ndarray], bool]:
    """(clip(delta + residual) to L2 norm `clip`, whether the unclipped norm was within it).

    DP-FedAvg bounds what a device sends; with error feedback that is the update
    plus the residual, so both are clipped together before quantizing. `delta`
    is consumed; dtypes are kept (the codec expects the model's).
    """
    if residual:
        for k, r in residual.items():
            d = delta[k]
            delta[k] = np.add(d, r, out=d) if d.dtype == r.dtype and d.flags.writeable \
                else np.asarray(d + r, dtype=d.dtype)
    clipped, norm = clip_to_norm(delta, clip, keep_dtype=True)
    return clipped, norm <= clip


def _tag_below_clip(reply: Message, below: bool) -> None:
    reply.content[DP_REPLY_KEY] = ConfigRecord({DP_BELOW_CLIP_KEY: bool(below)})


def _clip_plain_reply(message: Message, reply: Message, clip: float) -> Message:
    """A plain (`none`) reply under DP: full weights global + clip(local - global)."""
    global_ = incoming_global(message)
    found = model_record(reply.content)
    if global_ is None or reply.has_error() or found is None:
        return reply
    key, record = found
    delta = _delta({k: a.numpy() for k, a in record.items()}, global_)
    if delta is None:
        return reply
    clipped, below = clip_for_sending(delta, None, clip)
    reply.content[key] = ArrayRecord({
        k: Array(np.asarray(global_[k] + v, dtype=global_[k].dtype)) for k, v in clipped.items()})
    _tag_below_clip(reply, below)
    return reply


def make_compression_mod(
    default_codec: str | None = None, *, state_key: str = RESIDUAL_STATE_KEY
) -> Mod:
    """A compression `Mod`; `default_codec` applies when the train config names none."""

    def compression_mod(
        message: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        if message.metadata.message_type.split(".")[0] != MessageType.TRAIN:
            return call_next(message, context)
        found_config = config_record(message.content)
        cfg: Mapping[str, Any] = found_config[1] if found_config is not None else {}
        spec = str(cfg.get(CODEC_KEY, default_codec or "") or "").strip()
        # a model that came as a downlink delta: reply with an exact delta even for `none`,
        # so the server adds it to the exact global model (docs/compression.md)
        codec = parse_codec(spec) if spec else None
        dp_clip = dp_clip_of(cfg)
        if codec is None or (not codec.lossy and not is_downlink(message)):
            if dp_clip is None:
                return call_next(message, context)  # `none`: full weights, as a stock client
            return _clip_plain_reply(message, call_next(message, context), dp_clip)

        global_ = incoming_global(message)
        residual = None
        if global_ is not None and not cfg.get(RESET_RESIDUAL_KEY):
            residual = _usable_residual(load_residual(context, state_key), global_)
        if global_ is not None and residual is not None and codec.ahead:
            message = _with_residual_applied(message, global_, residual, codec.ahead)
            # the local update now holds `ahead` of the residual; the rest is added as usual
            residual = _scaled(residual, 1.0 - codec.ahead)
        reply = call_next(message, context)
        if global_ is None or reply.has_error():
            return reply
        found = model_record(reply.content)
        metric_records = records_of(reply.content, MetricRecord)
        if found is None or len(metric_records) != 1:
            log.warning("compression mod: reply is not one ArrayRecord + MetricRecord; sent as is")
            return reply
        array_key, record = found
        delta = _delta({k: a.numpy() for k, a in record.items()}, global_)
        del global_
        if delta is None:
            log.warning("compression mod: reply tensors differ from the global model; sent as is")
            return reply
        server_round = int(cfg.get("server-round", 0))
        below_clip = None
        if dp_clip is not None:  # what is sent, update + residual, within C before quantizing
            delta, below_clip = clip_for_sending(delta, residual, dp_clip)
            residual = None
        try:
            update, residual = encode_update(
                delta,
                codec,
                residual=residual,
                rng=_rng(context, server_round),
                run_id=str(cfg.get(RUN_ID_KEY, "")),
                round=server_round,
                base_version=str(cfg.get(BASE_VERSION_KEY, "")),
                num_examples=_num_examples(next(iter(metric_records.values()))),
                metrics=None,  # they travel in the reply's MetricRecord; not sent twice
                is_delta=True,
            )
        except ValueError as ex:  # NaN/Inf after training, a dtype the wire cannot carry
            # the delta was taken on copies: the reply still holds the full weights
            log.warning("compression mod: cannot encode (%s); reply sent as is", ex)
            return reply
        del delta
        store_residual(context, residual, state_key)
        packed = pack_update(update.SerializeToString())
        reply.content[array_key] = ArrayRecord({UPDATE_KEY: packed})
        if below_clip is not None:
            _tag_below_clip(reply, below_clip)
        return reply

    # rebuilds downlink deltas first (downlink_cache); compresses once however often installed
    return _once(with_downlink(compression_mod))


#: set while a compression mod handles a message (this thread / context only); read only
#: through the module-level functions below, so a mod pickled for Ray refers to it by name
_COMPRESSING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fedge_compressing", default=False
)


def _run_once(
    mod: Mod, message: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    if _COMPRESSING.get():
        return call_next(message, context)
    token = _COMPRESSING.set(True)
    try:
        return mod(message, context, call_next)
    finally:
        _COMPRESSING.reset(token)


def _once(mod: Mod) -> Mod:
    """`mod`, or a pass-through when a compression mod already handles this message.

    fedge's ClientApp carries the mod; an app that adds another around it (or calls
    it from its own handler) must still send one encoded delta, not re-encode one.
    """

    def once(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        return _run_once(mod, message, context, call_next)

    return once


#: The mod with no default codec: it compresses only when the server asks (`fedge.codec`).
compression_mod: Mod = make_compression_mod()
