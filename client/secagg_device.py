"""The device's side of secure aggregation: a Flower mod any ClientApp can add.

`secagg_mod` answers the four stages of a secure-aggregation round
(`fedge.common.secagg_protocol`). Only the `masked-input` stage calls the app:
it trains as usual and replies with full weights; the mod turns that reply into
the masked, quantized delta. Every other message passes through untouched.

The round's secrets (two X25519 secret keys, the self-mask seed, the shares
received) live in `context.state` between stages, because a Flower runtime may
run each message in a fresh process; they are deleted when the round unmasks
or a new round starts. Under DP (the train config names `fedge.dp-clip` = C) the
delta plus the error-feedback residual is clipped to L2 norm C and its quantized
form kept within C (`quantize_to_ring(max_norm=C)`), since the coordinator,
which sees only the sum, cannot clip it. Refusals become Flower error replies naming the reason
(`SecAggRefused`), so the coordinator treats the device as dropped.

    app = ClientApp(mods=[secagg_mod])
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedge.client.compression_mod import dp_clip_of
from fedge.client.flower_compat import ClientAppCallable
from fedge.common import secagg_crypto as sc
from fedge.common import secagg_protocol as sp
from fedge.common.contract import DP_REPLY_KEY
from fedge.common.dp_clip import clip_to_norm
from fedge.common.flower_compat import error_reply
from fedge.common.records import config_record, model_record, records_of
from fedge.common.secagg_errors import SecAggRefused
from fedge.common.secagg_ring import RingSpec, pack_words, quantize_to_ring

log = logging.getLogger(__name__)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: handle secure-aggregation stages, pass everything else on."""
    if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
        return call_next(msg, context)
    record = records_of(msg.content, ConfigRecord).get(sp.SECAGG_RECORD)
    if record is None:
        return call_next(msg, context)
    try:
        return _handle(msg, record, context, call_next)
    except SecAggRefused as exc:
        log.warning("%s", exc)
        return error_reply(msg, str(exc))


def _handle(
    msg: Message, record: ConfigRecord, context: Context, call_next: ClientAppCallable
) -> Message:
    stage = record.get(sp.STAGE)
    if stage == sp.ADVERTISE:
        return _advertise(msg, record, context)
    state = _state(context, record)
    if stage == sp.SHARE_KEYS:
        return _share_keys(msg, record, state, context)
    if stage == sp.MASKED_INPUT:
        return _masked_input(msg, record, state, context, call_next)
    if stage == sp.UNMASK:
        return _unmask(msg, record, state, context)
    raise SecAggRefused("bad_stage", f"unknown stage {stage!r}")


def _reply(msg: Message, fields: dict) -> Message:
    return Message(RecordDict({sp.SECAGG_RECORD: ConfigRecord(fields)}), reply_to=msg)


def _int(record: ConfigRecord, key: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SecAggRefused("bad_config", f"{key} must be an integer, got {value!r}")
    return value


def _list(record: ConfigRecord, key: str, kind: type) -> list:
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        raise SecAggRefused("bad_config", f"{key} must be a list of {kind.__name__}")
    return value


def _bytes(record: ConfigRecord, key: str) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes):
        raise SecAggRefused("bad_config", f"{key} must be bytes")
    return value


def _state(context: Context, record: ConfigRecord) -> ConfigRecord:
    state = records_of(context.state, ConfigRecord).get(sp.STATE_KEY)
    if state is None:
        raise SecAggRefused("bad_stage", f"stage {record.get(sp.STAGE)!r} before advertise")
    if state.get(sp.ROUND_TAG) != record.get(sp.ROUND_TAG):
        raise SecAggRefused("bad_stage", "message of another secure-aggregation round")
    return state


def _advertise(msg: Message, record: ConfigRecord, context: Context) -> Message:
    tag = _bytes(record, sp.ROUND_TAG)
    index, clients = _int(record, sp.INDEX), _int(record, sp.CLIENTS)
    bits, threshold = _int(record, sp.BITS), _int(record, sp.THRESHOLD)
    if not 0 <= index < clients:
        raise SecAggRefused("bad_config", f"index {index} of {clients} clients")
    RingSpec(bits, clients)  # validates bits and ring size
    c_sk, s_sk = sc.new_private_key(), sc.new_private_key()
    context.state[sp.STATE_KEY] = ConfigRecord(
        {
            sp.ROUND_TAG: tag,
            sp.INDEX: index,
            sp.CLIENTS: clients,
            sp.BITS: bits,
            sp.THRESHOLD: threshold,
            "c-sk": c_sk,
            "s-sk": s_sk,
        }
    )
    return _reply(msg, {sp.C_PK: sc.public_key(c_sk), sp.S_PK: sc.public_key(s_sk)})


def _pair_info(kind: str, tag: bytes, a: int, b: int) -> bytes:
    lo, hi = min(a, b), max(a, b)
    return sc.mask_info(tag, lo, hi) if kind == "mask" else sc.share_key_info(tag, lo, hi)


def _share_keys(
    msg: Message, record: ConfigRecord, state: ConfigRecord, context: Context
) -> Message:
    tag, me = state[sp.ROUND_TAG], _int(state, sp.INDEX)
    assert isinstance(tag, bytes)
    neighbours = _list(record, sp.NEIGHBOURS, int)
    c_pks, s_pks = _list(record, sp.C_PKS, bytes), _list(record, sp.S_PKS, bytes)
    threshold = _int(state, sp.THRESHOLD)
    clients = _int(state, sp.CLIENTS)
    if not len(neighbours) == len(c_pks) == len(s_pks):
        raise SecAggRefused("bad_config", "neighbours and their keys differ in number")
    if len(set(neighbours)) != len(neighbours) or me in neighbours:
        raise SecAggRefused("bad_config", "neighbour list repeats a device or names this one")
    if any(not 0 <= j < clients for j in neighbours):
        raise SecAggRefused("bad_config", "neighbour index outside the round")
    if not 1 <= threshold <= len(neighbours):
        raise SecAggRefused(
            "too_few_neighbours", f"threshold {threshold} with {len(neighbours)} neighbours"
        )
    seed = sc.new_seed()
    s_sk = state["s-sk"]
    c_sk = state["c-sk"]
    assert isinstance(s_sk, bytes) and isinstance(c_sk, bytes)
    xs = [sp.share_point(j) for j in neighbours]
    seed_shares = sc.shamir_split(seed, xs, threshold)
    key_shares = sc.shamir_split(s_sk, xs, threshold)
    bundles = []
    for j, c_pk, seed_share, key_share in zip(
        neighbours, c_pks, seed_shares, key_shares, strict=True
    ):
        key = sc.agree(c_sk, c_pk, _pair_info("share", tag, me, j))
        plain = sp.ShareBundle(me, j, seed_share, key_share).to_bytes()
        bundles.append(sc.seal(key, plain, sc.share_ad(tag, me, j)))
    state["seed"] = seed
    state[sp.NEIGHBOURS] = neighbours
    state[sp.C_PKS] = c_pks
    state[sp.S_PKS] = s_pks
    context.state[sp.STATE_KEY] = state
    return _reply(
        msg, {sp.TO: neighbours, sp.BUNDLES: bundles, sp.COMMIT: sc.commitment(seed, tag, me)}
    )


def _masked_input(
    msg: Message,
    record: ConfigRecord,
    state: ConfigRecord,
    context: Context,
    call_next: ClientAppCallable,
) -> Message:
    tag, me = state[sp.ROUND_TAG], _int(state, sp.INDEX)
    c_sk, s_sk, seed = state["c-sk"], state["s-sk"], state.get("seed")
    assert isinstance(tag, bytes) and isinstance(c_sk, bytes) and isinstance(s_sk, bytes)
    if not isinstance(seed, bytes):
        raise SecAggRefused("bad_stage", "masked-input before share-keys")
    neighbours = _list(state, sp.NEIGHBOURS, int)
    c_pks = _list(state, sp.C_PKS, bytes)
    s_pks = _list(state, sp.S_PKS, bytes)
    senders = _list(record, sp.FROM, int)
    bundles = _list(record, sp.BUNDLES, bytes)
    if len(senders) != len(bundles) or len(set(senders)) != len(senders):
        raise SecAggRefused("bad_config", "share senders and bundles disagree")
    seed_shares: list[bytes] = []
    key_shares: list[bytes] = []
    for sender, sealed in zip(senders, bundles, strict=True):
        if sender not in neighbours:
            raise SecAggRefused("share_misaddressed", f"shares from non-neighbour {sender}")
        pos = neighbours.index(sender)
        key = sc.agree(c_sk, c_pks[pos], _pair_info("share", tag, me, sender))
        bundle = sp.ShareBundle.from_bytes(
            sc.open_sealed(key, sealed, sc.share_ad(tag, sender, me))
        )
        if bundle.sender != sender or bundle.recipient != me:
            raise SecAggRefused(
                "share_misaddressed",
                f"bundle {bundle.sender}->{bundle.recipient} delivered as {sender}->{me}",
            )
        seed_shares.append(bundle.seed_share)
        key_shares.append(bundle.key_share)
    threshold = _int(state, sp.THRESHOLD)
    if len(senders) < threshold:
        raise SecAggRefused(
            "too_few_neighbours", f"{len(senders)} live neighbours, threshold {threshold}"
        )
    bits, clients = _int(state, sp.BITS), _int(state, sp.CLIENTS)
    spec = RingSpec(bits, clients)
    clip = _list(record, sp.CLIP, float)
    error_feedback = bool(record.get(sp.ERROR_FEEDBACK, False))

    found = model_record(msg.content)
    if found is None:
        raise SecAggRefused("bad_config", "masked-input message carries no model")
    found_config = config_record(msg.content)
    # DP (docs/privacy.md): the coordinator cannot clip a masked update, so the device does
    dp_clip = dp_clip_of(found_config[1]) if found_config is not None else None
    incoming = {k: a.numpy() for k, a in found[1].items()}
    reply = call_next(_without_secagg(msg), context)
    if reply.has_error():
        return Message(reply.error, reply_to=msg)
    trained = model_record(reply.content)
    if trained is None:
        raise SecAggRefused("bad_input", "the app's train reply holds no ArrayRecord")
    delta, scales = _flat_delta(incoming, {k: a.numpy() for k, a in trained[1].items()}, clip, spec)
    residual = _load_residual(context, delta.size) if error_feedback else None
    if residual is not None:
        delta += residual
    if dp_clip is not None:  # what is sent, update plus residual, within C; the cut is dropped
        delta = clip_to_norm({"delta": delta}, dp_clip)[0]["delta"]
    new_residual = np.empty_like(delta) if error_feedback else None
    words = quantize_to_ring(delta, scales, spec, np.random.default_rng(), new_residual,
                             max_norm=dp_clip)
    words += sc.expand_mask(seed, words.size, spec.word_bits)
    for sender in senders:
        pos = neighbours.index(sender)
        pair_seed = sc.agree(s_sk, s_pks[pos], _pair_info("mask", tag, me, sender))
        mask = sc.expand_mask(pair_seed, words.size, spec.word_bits)
        if me < sender:
            words += mask
        else:
            words -= mask
    words &= spec.dtype(spec.modulus_mask)
    if new_residual is not None:
        context.state[sp.RESIDUAL_STATE_KEY] = ArrayRecord({"residual": Array(new_residual)})
    state["live"] = senders
    state["seed-shares"] = seed_shares
    state["key-shares"] = key_shares
    context.state[sp.STATE_KEY] = state
    packed = pack_words(words, spec.word_bits)
    content = RecordDict(
        {
            "arrays": ArrayRecord(
                {
                    sp.MASKED_KEY: Array(
                        dtype="uint8", shape=(len(packed),), stype=sp.MASKED_STYPE, data=packed
                    )
                }
            ),
            sp.SECAGG_RECORD: ConfigRecord({sp.WORDS: int(words.size)}),
        }
    )
    for key, value in reply.content.items():
        # the DP clipping bit (compression mod) would tell one device's norm: not sent
        if key not in content and key != DP_REPLY_KEY and not isinstance(value, ArrayRecord):
            content[key] = value
    return Message(content, reply_to=msg)


def _without_secagg(msg: Message) -> Message:
    """The train message as the app expects it: the same message, minus the secagg record."""
    del msg.content[sp.SECAGG_RECORD]
    return msg


def _flat_delta(
    incoming: dict[str, np.ndarray],
    trained: dict[str, np.ndarray],
    clip: list[float],
    spec: RingSpec,
) -> tuple[np.ndarray, np.ndarray]:
    """Trained minus incoming over the float tensors, flattened, and each coordinate's scale."""
    names = [k for k, a in incoming.items() if np.issubdtype(a.dtype, np.floating)]
    if len(clip) != len(names):
        raise SecAggRefused(
            "bad_config", f"{len(clip)} clipping ranges for {len(names)} float tensors"
        )
    if any(not (c > 0 and np.isfinite(c)) for c in clip):
        raise SecAggRefused("bad_config", "clipping ranges must be positive and finite")
    parts, scales = [], []
    for name, c in zip(names, clip, strict=True):
        if name not in trained or trained[name].shape != incoming[name].shape:
            raise SecAggRefused("bad_input", f"the app's reply lacks or reshapes tensor {name!r}")
        d = trained[name].astype(np.float32).ravel() - incoming[name].astype(np.float32).ravel()
        parts.append(d)
        scales.append(np.full(d.size, c / spec.qmax, np.float32))
    if not parts:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(parts), np.concatenate(scales)


def _load_residual(context: Context, n: int) -> np.ndarray | None:
    rec = records_of(context.state, ArrayRecord).get(sp.RESIDUAL_STATE_KEY)
    if rec is None or "residual" not in rec:
        return None
    r = rec["residual"].numpy()
    return r.astype(np.float32) if r.size == n else None


def _unmask(msg: Message, record: ConfigRecord, state: ConfigRecord, context: Context) -> Message:
    live = state.get("live")
    if not isinstance(live, list):
        raise SecAggRefused("bad_stage", "unmask before masked-input")
    survivors = set(_list(record, sp.SURVIVORS, int))
    dropped = set(_list(record, sp.DROPPED, int))
    if survivors & dropped:
        raise SecAggRefused(
            "unmask_conflict", f"devices {sorted(survivors & dropped)} both survived and dropped"
        )
    threshold = _int(state, sp.THRESHOLD)
    if len(survivors) < threshold:
        raise SecAggRefused(
            "too_few_neighbours", f"{len(survivors)} survivors, threshold {threshold}"
        )
    seed_shares = _list(state, "seed-shares", bytes)
    key_shares = _list(state, "key-shares", bytes)
    seed_of, seed_out, key_of, key_out = [], [], [], []
    for j, seed_share, key_share in zip(live, seed_shares, key_shares, strict=True):
        if j in survivors:
            seed_of.append(j)
            seed_out.append(seed_share)
        elif j in dropped:
            key_of.append(j)
            key_out.append(key_share)
    del context.state[sp.STATE_KEY]
    return _reply(
        msg,
        {sp.SEED_OF: seed_of, sp.SEED_SHARES: seed_out, sp.KEY_OF: key_of, sp.KEY_SHARES: key_out},
    )
