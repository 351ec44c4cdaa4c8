"""Compressed downlink, device side: keep the anchor model, rebuild the global from deltas.

A train message with `fedge.downlink-codec` in its config comes in two forms
(`fedge.server.downlink` sends them; docs/compression.md):

- plain weights: the device keeps them as its anchor, in `context.state`
  (ArrayRecord `fedge.downlink-anchor` plus ConfigRecord `fedge.downlink` with
  its version), so it survives rounds and, on the edge runtime, restarts;
- one array `fedge.downlink`: a delta against the anchor the config names.
  The device rebuilds `anchor + delta` with the same function the server used,
  checks the result's version against the config's, and puts the plain weights
  back into the message, so the ClientApp never sees the difference. A delta
  against `ZERO_ANCHOR` (a compressed first contact) is the model itself,
  quantized: the rebuilt model also becomes the device's anchor.

A delta against an anchor the device does not hold, or a rebuilt model whose
version differs, raises `DownlinkError`: the reply becomes an error reply, the
server forgets the node's anchor and sends the plain model next time, so a
lost or corrupted state costs one round, never a silently wrong model.

The reply gets a ConfigRecord `fedge.downlink` naming the anchor held: that is
how the server learns what to send next.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType

from fedge.client.flower_compat import ClientAppCallable, Mod
from fedge.common.arrays import arrays_to_record
from fedge.common.contract import ANCHOR_META_STATE_KEY, ANCHOR_STATE_KEY, ZERO_ANCHOR
from fedge.common.downlink import DownlinkFields, apply_model_delta, packed_delta, tag_held
from fedge.common.errors import UpdateRejected
from fedge.common.model_version import model_version
from fedge.common.records import config_record, model_record

log = logging.getLogger(__name__)

#: keys of the ConfigRecord kept at `ANCHOR_META_STATE_KEY`
ANCHOR_VERSION = "anchor-version"
MODEL_VERSION = "model-version"  # version of the model last rebuilt or received


class DownlinkError(RuntimeError):
    """A compressed downlink this device cannot turn into the server's model."""


def is_downlink(message: Message) -> bool:
    """True for a train message sent with a compressed downlink in force."""
    if message.metadata.message_type.split(".")[0] != MessageType.TRAIN:
        return False
    found = config_record(message.content)
    return found is not None and DownlinkFields.read(found[1]) is not None


def held_version(context: Context) -> str:
    """Version of the anchor this device holds ("" when none)."""
    meta = context.state.get(ANCHOR_META_STATE_KEY)
    anchor = context.state.get(ANCHOR_STATE_KEY)
    if not isinstance(meta, ConfigRecord) or not isinstance(anchor, ArrayRecord):
        return ""
    return str(meta.get(ANCHOR_VERSION, ""))


def _forget(context: Context) -> None:
    for key in (ANCHOR_STATE_KEY, ANCHOR_META_STATE_KEY):
        if key in context.state:
            del context.state[key]


def _held_anchor(context: Context, anchor_version: str) -> dict[str, np.ndarray]:
    """The anchor a delta names, if this device holds it (else `DownlinkError`)."""
    held = held_version(context)
    anchor = context.state.get(ANCHOR_STATE_KEY)
    if held != anchor_version or not isinstance(anchor, ArrayRecord):
        _forget(context)
        raise DownlinkError(
            f"delta against {anchor_version[:12] or '?'}, device holds {held[:12] or 'none'}"
        )
    return {k: a.numpy() for k, a in anchor.items()}


def receive(message: Message, context: Context) -> None:
    """Turn a downlink train message into a plain one in place, updating the anchor."""
    config = config_record(message.content)
    found = model_record(message.content)
    fields = DownlinkFields.read(config[1]) if config is not None else None
    if fields is None or found is None:
        raise DownlinkError("not a downlink message: no downlink config or no arrays")
    key, record = found
    anchor_version = fields.anchor
    delta = packed_delta(record)
    if delta is not None:
        first = anchor_version == ZERO_ANCHOR
        anchor = None if first else _held_anchor(context, anchor_version)
        try:
            model = apply_model_delta(anchor, delta)
        except UpdateRejected as ex:
            raise DownlinkError(f"undecodable downlink delta: {ex}") from None
        version = model_version(model)
        if version != fields.target:
            _forget(context)
            raise DownlinkError("rebuilt model differs from the server's (version mismatch)")
        message.content[key] = arrays_to_record(model)
        if first:  # the quantized model is this device's anchor from now on
            anchor_version = version
            context.state[ANCHOR_STATE_KEY] = message.content[key]
    else:
        version = model_version({k: a.numpy() for k, a in record.items()})
        if version != anchor_version:
            log.warning("downlink: full model's version differs from the config; not kept")
            _forget(context)
            return
        context.state[ANCHOR_STATE_KEY] = record
    context.state[ANCHOR_META_STATE_KEY] = ConfigRecord(
        {ANCHOR_VERSION: anchor_version, MODEL_VERSION: version}
    )


def tag_reply(reply: Message, context: Context) -> Message:
    """Tell the server which anchor this device holds (nothing on an error reply)."""
    if not reply.has_error():
        tag_held(reply.content, held_version(context))
    return reply


def with_downlink(mod: Mod) -> Mod:
    """Wrap a client mod so downlink deltas are rebuilt before it and the reply is tagged."""

    def downlink_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if not is_downlink(message):
            return mod(message, context, call_next)
        receive(message, context)
        return tag_reply(mod(message, context, call_next), context)

    return downlink_mod
