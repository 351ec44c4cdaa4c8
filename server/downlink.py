"""Compressed downlink, server side: send each device the global model as a delta
against the full model it already holds (its *anchor*).

Scheme (docs/compression.md, "Compressed downlink"):

- A device that holds no anchor the server still keeps (first contact,
  evicted, too old, or a stock Flower client) gets the plain global model
  `G_t`, exactly as without this module. A fedge device keeps it as its anchor
  `A`, named by `model_version(G_t)` (the round's `fedge.base-version`), and the
  server keeps `A` too.
- A device holding a kept anchor `A` gets `Q = int8(G_t - A)` and rebuilds
  `R = A + dequant(Q)` with `fedge.common.downlink.apply_model_delta`. The
  server runs the same function on the same bytes, so it knows `R` exactly and
  sends `model_version(R)`; the device checks it and refuses a mismatch.
- Every delta is taken from the exact global model to an exact anchor, so `R`
  is one quantization away from `G_t` however many rounds went by: nothing
  accumulates. The device does not move its anchor on a delta.
- Replies are aggregated onto the exact `G_t`; the device's update is taken
  against `R` (the model it trained), so the downlink's rounding is not folded
  into the global model.

First contacts (`first_contact`): `"full"` (the default) sends a device that
holds nothing the plain `G_t`, which any ClientApp can read. `"compressed"`
sends it `Q0 = int8(G_t)`, a delta against the all-zero model every device
holds (`ZERO_ANCHOR`); it rebuilds `R0 = dequant(Q0)` and keeps `R0` as its
anchor, and so does the server. Later deltas are taken from the exact `G_t'`
to that exact `R0`, so again one rounding, nothing accumulated. A node whose
last reply carried no anchor (a stock ClientApp, which cannot read `Q0` and
answers with an error, or a device that lost its state) gets the plain model
until a reply names an anchor: a stock client costs one round, once.

Which anchor a device holds is learned from its replies (a `fedge.downlink`
ConfigRecord naming it), by node id. A reply without it (a stock ClientApp) or
an error reply means "holds nothing usable": the next message is plain.

Memory: at most `keep` anchors (each one fp32 model), whatever the fleet size;
anchors no device is known to hold are dropped at once, then the least-held.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedge.common.codec_spec import parse_codec
from fedge.common.contract import ZERO_ANCHOR
from fedge.common.downlink import (
    DownlinkFields,
    apply_model_delta,
    delta_record,
    encode_model_delta,
    held_of,
)
from fedge.common.model_version import model_version
from fedge.common.records import ARRAYS_RECORD, CONFIG_RECORD, config_record, model_record

log = logging.getLogger(__name__)

DEFAULT_KEEP = 32
DEFAULT_MAX_AGE = 100
#: what a device holding no anchor gets: the plain model, or the model quantized
FIRST_CONTACTS = ("full", "compressed")


@dataclass
class Anchor:
    """A full model some devices hold: what deltas to them are taken against."""

    version: str
    arrays: dict[str, np.ndarray]
    round: int


@dataclass
class DownlinkRound:
    """What one round's train messages carried: plain (full) and delta sends."""

    round: int
    full_messages: int = 0
    delta_messages: int = 0
    first_messages: int = 0  # compressed first contacts (the model quantized)
    full_bytes: int = 0
    delta_bytes: int = 0
    first_bytes: int = 0
    returning: int = 0  # messages to nodes that had replied before
    anchors_kept: int = 0
    targets: dict[int, str] = field(default_factory=dict)  # node -> version it must rebuild

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "targets"}


def _array_bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


class DownlinkCompressor:
    """Rewrites a round's train messages to carry deltas; learns anchors from replies.

    `codec` is a lossy codec spec (`int8` is what the design targets). `keep`
    bounds the anchors held in memory; `max_age` (rounds) retires old anchors
    so a delta never spans more training than that (its rounding grows with it).
    `first_contact` is `"full"` or `"compressed"` (module docstring).
    """

    def __init__(
        self,
        codec: str = "int8",
        *,
        keep: int = DEFAULT_KEEP,
        max_age: int = DEFAULT_MAX_AGE,
        first_contact: str = "full",
        run_id: str = "",
    ) -> None:
        spec = parse_codec(codec)
        if not spec.lossy:
            raise ValueError(f"downlink codec {codec!r} is lossless: use 'none' to turn it off")
        if keep < 1 or max_age < 1:
            raise ValueError("downlink keep and max-age must be at least 1")
        if first_contact not in FIRST_CONTACTS:
            raise ValueError(f"downlink first contact {first_contact!r}: choose "
                             f"{' or '.join(FIRST_CONTACTS)}")
        self.codec = spec.canonical
        self.keep = int(keep)
        self.max_age = int(max_age)
        self.first_contact = first_contact
        self.run_id = run_id
        self.anchors: dict[str, Anchor] = {}
        self.holders: dict[int, str] = {}  # node id -> anchor version it holds
        self.seen: set[int] = set()  # nodes that ever replied
        self.plain_only: set[int] = set()  # nodes whose last reply named no anchor
        self.history: dict[int, DownlinkRound] = {}

    # ------------------------------------------------------------ sending

    def prepare(
        self, messages: list[Message], global_arrays: Mapping[str, np.ndarray], version: str
    ) -> list[Message]:
        """Give each train message a plain model or a delta against the node's anchor."""
        if not messages:
            return messages
        server_round = self._round_of(messages[0])
        stats = self.history.setdefault(server_round, DownlinkRound(server_round))
        for old in self.history.values():  # per-node targets: the last few rounds only
            if old.round < server_round - 2:
                old.targets.clear()
        self._retire(server_round)
        groups: dict[str | None, list[Message]] = {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            held = self.holders.get(node)
            if held in self.anchors:
                groups.setdefault(held, []).append(msg)
            elif self.first_contact == "compressed" and node not in self.plain_only:
                groups.setdefault(ZERO_ANCHOR, []).append(msg)
            else:
                groups.setdefault(None, []).append(msg)
        if None in groups and version not in self.anchors:
            arrays = {k: np.array(a, copy=True) for k, a in global_arrays.items()}
            self.anchors[version] = Anchor(version, arrays, server_round)
        for anchor_version, group in groups.items():
            if anchor_version is None:
                self._send_full(group, version, stats)
            elif anchor_version == ZERO_ANCHOR:
                self._send_first(group, global_arrays, server_round, stats)
            else:
                self._send_delta(group, self.anchors[anchor_version], global_arrays,
                                 server_round, stats)
        self._evict()
        stats.anchors_kept = len(self.anchors)
        return messages

    def _send_full(self, group: list[Message], version: str, stats: DownlinkRound) -> None:
        for msg in group:
            self._rewrite(msg, None, DownlinkFields(self.codec, version))
            node = msg.metadata.dst_node_id
            self.holders[node] = version  # a fedge device adopts it; its reply confirms
            stats.full_messages += 1
            stats.full_bytes += self._arrays_bytes(msg)
            stats.returning += node in self.seen
            stats.targets[node] = version

    def _send_first(
        self,
        group: list[Message],
        global_arrays: Mapping[str, np.ndarray],
        server_round: int,
        stats: DownlinkRound,
    ) -> None:
        """The model quantized (a delta against zero); the rebuilt model becomes the anchor."""
        packed = encode_model_delta(global_arrays, None, self.codec, anchor_version=ZERO_ANCHOR,
                                    run_id=self.run_id, round=server_round)
        rebuilt = apply_model_delta(None, packed)
        target = model_version(rebuilt)
        if target not in self.anchors:
            self.anchors[target] = Anchor(target, rebuilt, server_round)
        record = delta_record(packed)
        fields = DownlinkFields(self.codec, ZERO_ANCHOR, target)
        for msg in group:
            self._rewrite(msg, record, fields)
            node = msg.metadata.dst_node_id
            self.holders[node] = target  # the device adopts the rebuilt model; its reply confirms
            stats.first_messages += 1
            stats.first_bytes += len(packed.data)
            stats.returning += node in self.seen
            stats.targets[node] = target

    def _send_delta(
        self,
        group: list[Message],
        anchor: Anchor,
        global_arrays: Mapping[str, np.ndarray],
        server_round: int,
        stats: DownlinkRound,
    ) -> None:
        packed = encode_model_delta(global_arrays, anchor.arrays, self.codec,
                                    anchor_version=anchor.version, run_id=self.run_id,
                                    round=server_round)
        target = model_version(apply_model_delta(anchor.arrays, packed))
        record = delta_record(packed)
        fields = DownlinkFields(self.codec, anchor.version, target)
        for msg in group:
            self._rewrite(msg, record, fields)
            node = msg.metadata.dst_node_id
            stats.delta_messages += 1
            stats.delta_bytes += len(packed.data)
            stats.returning += node in self.seen
            stats.targets[node] = target

    @staticmethod
    def _rewrite(msg: Message, arrays: ArrayRecord | None, fields: DownlinkFields) -> None:
        """Give `msg` its own content: a copy of the config plus `fields`, and `arrays`."""
        extra = fields.to_config()
        content = RecordDict()
        config = config_record(msg.content)
        model = model_record(msg.content)
        array_key = model[0] if model is not None else ARRAYS_RECORD
        for key, record in msg.content.items():
            if config is not None and key == config[0]:
                content[key] = ConfigRecord({**dict(config[1]), **extra})
            elif arrays is not None and key == array_key:
                content[key] = arrays
            else:
                content[key] = record
        if config is None:
            content[CONFIG_RECORD] = ConfigRecord(dict(extra))
        msg.content = content

    @staticmethod
    def _arrays_bytes(msg: Message) -> int:
        return sum(_array_bytes(r) for r in msg.content.values() if isinstance(r, ArrayRecord))

    @staticmethod
    def _round_of(msg: Message) -> int:
        found = config_record(msg.content)
        value = found[1].get("server-round", 0) if found else 0
        return int(value) if isinstance(value, int | float) else 0

    # ------------------------------------------------------------ bookkeeping

    def _retire(self, server_round: int) -> None:
        for version, anchor in list(self.anchors.items()):
            if server_round - anchor.round >= self.max_age:
                del self.anchors[version]

    def _evict(self) -> None:
        """Drop anchors nobody holds, then the least-held (oldest first), down to `keep`."""
        counts = Counter(self.holders.values())
        for version in [v for v in self.anchors if counts[v] == 0]:
            del self.anchors[version]
        while len(self.anchors) > self.keep:
            victim = min(self.anchors.values(), key=lambda a: (counts[a.version], a.round))
            del self.anchors[victim.version]

    def observe(self, replies: Iterable[Message]) -> Iterator[Message]:
        """Pass replies through unchanged, learning from each which anchor its node holds."""
        for msg in replies:
            self.learn(msg)
            yield msg
            del msg  # hold no reply while the next one is produced (streaming aggregation)

    def learn(self, reply: Message) -> None:
        """Record the anchor a reply says its node holds (none: the next send is plain)."""
        node = int(reply.metadata.src_node_id)
        self.seen.add(node)
        held = held_of(reply.content) if not reply.has_error() and reply.has_content() else ""
        if held and held in self.anchors:
            self.holders[node] = held
            self.plain_only.discard(node)
        else:
            self.holders.pop(node, None)
            if not held:  # a stock client, or a device that lost its state: plain model
                self.plain_only.add(node)


def downlink_from_config(
    run_config: Mapping[str, Any], *, run_id: str = ""
) -> DownlinkCompressor | None:
    """The compressor the run config asks for (`downlink-codec`, `downlink-keep`,
    `downlink-max-age`, `downlink-first-contact`), or None for the plain downlink
    (`none`, the default)."""
    codec = str(run_config.get("downlink-codec", "none") or "none").strip().lower()
    if codec == "none":
        return None
    return DownlinkCompressor(
        codec,
        keep=int(run_config.get("downlink-keep", DEFAULT_KEEP)),
        max_age=int(run_config.get("downlink-max-age", DEFAULT_MAX_AGE)),
        first_contact=str(run_config.get("downlink-first-contact", "full")).strip().lower(),
        run_id=run_id,
    )


