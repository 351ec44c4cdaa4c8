"""The coordinator's only door into Flower internals (flwr 1.42).

Everything fedge's server side needs from Flower that is not public API lives
here, so a Flower upgrade touches this file (and `client/flower_compat.py`)
and nothing else. Public API (`flwr.app`, `flwr.serverapp`) is used directly
elsewhere.

What is used, and where it lives in flwr 1.42:

- `flwr.supercore.task_identity.TaskIdentity`: `Message(content, dst, type)`
  reads the sender's run id, node id and task id from this class-level
  identity, so a ServerApp must not build a message before it is set. Flower's
  own runtimes set it in `superlink/runtime/run_serverapp.py` and
  `simulation/run_simulation.py` (task_id=1, node_id=SUPERLINK_NODE_ID).
- `flwr.supercore.run.Run`: what `Grid.set_run` takes.
- `Metadata._message_id`: message ids are assigned by the link, never by the
  sender; Flower's grids write `msg.metadata.__dict__["_message_id"]`.
- `flwr.common.serde.message_to_proto` / `message_from_proto` and
  `context_to_proto` / `context_from_proto` with `flwr.proto.message_pb2`:
  Flower's own protobuf for a whole Message (metadata, content, error), the
  form in which messages cross process boundaries.
- `flwr.common.constant.ErrorCode` and `SUPERLINK_NODE_ID`.
- `flwr.common.serde.recorddict_to_proto` and
  `flwr.common.serde_utils.metadata_to_proto` / `error_to_proto`: a task is
  sent as two pre-serialized parts (the content, shared by every device of a
  round, and each device's metadata), see `message_parts`.
"""

from __future__ import annotations

import re

from flwr.app import Context, Error, Message, Metadata
from flwr.common.config import parse_config_args
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
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
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = [
    "SERVER_NODE_ID",
    "ErrorCode",
    "Run",
    "context_from_bytes",
    "context_to_bytes",
    "error_reply",
    "make_run",
    "message_from_bytes",
    "message_from_parsed",
    "message_parts",
    "message_to_bytes",
    "parse_message",
    "parsed_metadata",
    "set_message_id",
    "set_task_identity",
]

#: The node id Flower gives the server side (the SuperLink) in every runtime.
SERVER_NODE_ID: int = SUPERLINK_NODE_ID


def set_task_identity(run_id: int, node_id: int = SERVER_NODE_ID, task_id: int = 1) -> None:
    """Declare who is sending: `Message(...)` constructors read this global identity."""
    TaskIdentity.run_id = int(run_id)
    TaskIdentity.node_id = int(node_id)
    TaskIdentity.task_id = int(task_id)


def make_run(run_id: int, run_config: dict | None = None) -> Run:
    """A `Run` record (what `Grid.set_run` expects) carrying `run_config` as overrides."""
    run = Run.create_empty(run_id=int(run_id))
    run.override_config = dict(run_config or {})
    run.primary_task_id = 1
    return run


def set_message_id(message: Message, message_id: str) -> None:
    """Assign the link-side message id (Flower has no public setter for it)."""
    message.metadata.__dict__["_message_id"] = message_id


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


def error_reply(
    message: Message, reason: str, code: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
) -> Message:
    """The reply a Flower runtime sends when a ClientApp fails on `message`."""
    return Message(Error(code=int(code), reason=reason), reply_to=message)


#: one KEY=VALUE pair as `parse_config_args` finds them (flwr/common/config.py)
RUN_CONFIG_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")

__all__ += ["RUN_CONFIG_PAIR", "parse_config_args"]
