"""Flower messages as bytes (flwr 1.42 internals): the serializer both sides share.

Coordinator and device exchange Flower `Message`s (and the device keeps its
`Context`) in Flower's own protobuf form (`FLOWER_MESSAGE_FORMAT` in
`fedge.common.contract`); this module is the one place that turns them into
bytes and back, so both ends use the same serializer and a Flower upgrade that
moves it touches one file. What only one side needs stays in that side's
door: `fedge.server.flower_compat` (task identity, runs) and
`fedge.client.flower_compat` (mod types).

Used from flwr 1.42:

- `flwr.common.serde.message_to_proto` / `message_from_proto` /
  `context_to_proto` / `context_from_proto` with `flwr.proto.message_pb2`
  `Message` / `Context`: Flower's own protobuf for a whole Message (metadata,
  content, error), the form in which messages cross process boundaries.
- `flwr.common.serde.recorddict_to_proto` and
  `flwr.common.serde_utils.metadata_to_proto` / `metadata_from_proto` /
  `error_to_proto`: a task is sent as two pre-serialized parts (the content,
  shared by every device of a round, and each device's metadata), see
  `message_parts`.
- `flwr.common.config.parse_config_args`: Flower's own parser of
  `--run-config` and `--node-config` (`'k1=v1 k2=v2'` with TOML values, or a
  TOML file), so fedge reads them as `flwr run` and `flower-supernode` do.
- `flwr.common.constant.ErrorCode`, and `Metadata._message_id` (ids are
  assigned by the link, not the sender; Flower's grids write
  `msg.metadata.__dict__["_message_id"]`).
"""

from __future__ import annotations

import re

from flwr.app import Context, Error, Message, Metadata
from flwr.common.config import parse_config_args
from flwr.common.constant import ErrorCode
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_to_proto,
)
from flwr.common.serde_utils import error_to_proto, metadata_from_proto, metadata_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

__all__ = [
    "RUN_CONFIG_PAIR",
    "ErrorCode",
    "ProtoMessage",
    "context_from_bytes",
    "context_to_bytes",
    "error_reply",
    "message_from_bytes",
    "message_from_parsed",
    "message_parts",
    "message_to_bytes",
    "parse_config_args",
    "parse_message",
    "parsed_metadata",
    "recorddict_to_proto",
    "set_message_id",
]


#: one KEY=VALUE pair as `parse_config_args` finds them (flwr/common/config.py)
RUN_CONFIG_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def message_to_bytes(message: Message) -> bytes:
    """A whole Message (metadata, content or error) as Flower's own protobuf bytes."""
    return message_to_proto(message).SerializeToString()


def message_from_bytes(data: bytes) -> Message:
    """Inverse of `message_to_bytes`; the message id travels inside the metadata."""
    return message_from_proto(ProtoMessage.FromString(data))


def message_parts(
    message: Message, content_cache: dict[int, bytes] | None = None
) -> tuple[bytes, bytes]:
    """A Message as two protobuf fragments whose concatenation parses as the whole message.

    The first holds only the content (field 2 of `flwr.proto.Message`), the
    second the metadata and error. Protobuf parsers accept fields in any order
    and merge concatenated messages, so `message_from_bytes(a + b)` equals the
    message. A strategy hands every device of a round the same `RecordDict`
    object; `content_cache` (keyed by `id(content)`, valid while those objects
    live) serializes it once, so N devices cost one model copy, not N.
    """
    content = b""
    if message.has_content():
        key = id(message.content)
        cached = None if content_cache is None else content_cache.get(key)
        if cached is None:
            cached = ProtoMessage(content=recorddict_to_proto(message.content)).SerializeToString()
            if content_cache is not None:
                content_cache[key] = cached
        content = cached
    rest = ProtoMessage(
        metadata=metadata_to_proto(message.metadata),
        error=error_to_proto(message.error) if message.has_error() else None,
    ).SerializeToString()
    return content, rest


def parse_message(data: bytes) -> ProtoMessage:
    """Parse Message bytes into Flower's protobuf object, without converting the content.

    Raises what protobuf raises for bytes that are not a `flwr.proto.Message`.
    """
    return ProtoMessage.FromString(data)


def parsed_metadata(proto: ProtoMessage) -> Metadata:
    """The Metadata of a parsed message (cheap: the content's arrays are not touched)."""
    return metadata_from_proto(proto.metadata)


def message_from_parsed(proto: ProtoMessage) -> Message:
    """The Message of a parsed message (what `message_from_bytes` does after parsing)."""
    return message_from_proto(proto)


def context_to_bytes(context: Context) -> bytes:
    """A Context (ids, configs and the persistent `state` RecordDict) as protobuf bytes."""
    return context_to_proto(context).SerializeToString()


def context_from_bytes(data: bytes) -> Context:
    """Inverse of `context_to_bytes`."""
    return context_from_proto(ProtoContext.FromString(data))


def set_message_id(message: Message, message_id: str) -> None:
    """Assign a message id (Flower has no public setter; links assign ids)."""
    message.metadata.__dict__["_message_id"] = message_id


def error_reply(
    message: Message, reason: str, code: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
) -> Message:
    """The reply a Flower runtime sends when a ClientApp fails on `message`."""
    return Message(Error(code=int(code), reason=reason), reply_to=message)
