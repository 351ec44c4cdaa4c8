"""The device's only door into Flower internals (flwr 1.42).

A device never imports the coordinator's code, so it has its own copy of the
few internals it needs; a Flower upgrade touches this file and
`server/flower_compat.py` and nothing else. The compression mod needs none of
them (it only uses `flwr.app`); the edge runtime uses these to carry Flower
messages inside fedge's gRPC envelopes and to keep `context.state` on disk.

Used from flwr 1.42: `flwr.common.serde.message_to_proto` /
`message_from_proto` / `context_to_proto` / `context_from_proto`,
`flwr.proto.message_pb2.Message` / `Context`, `flwr.common.constant.ErrorCode`,
and `Metadata._message_id` (ids are assigned by the link, not the sender).
"""

from __future__ import annotations

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

__all__ = [
    "ErrorCode",
    "context_from_bytes",
    "context_to_bytes",
    "error_reply",
    "message_from_bytes",
    "message_to_bytes",
    "set_message_id",
]


def message_to_bytes(message: Message) -> bytes:
    """A whole Message (metadata, content or error) as Flower's own protobuf bytes."""
    return message_to_proto(message).SerializeToString()


def message_from_bytes(data: bytes) -> Message:
    """Inverse of `message_to_bytes`."""
    return message_from_proto(ProtoMessage.FromString(data))


def context_to_bytes(context: Context) -> bytes:
    """A Context, including its persistent `state` (e.g. error-feedback residuals)."""
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
    """The reply a Flower runtime sends when the ClientApp fails on `message`."""
    return Message(Error(code=int(code), reason=reason), reply_to=message)
