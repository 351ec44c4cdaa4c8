"""The coordinator's only door into Flower internals (flwr 1.42).

Everything fedge's server side needs from Flower that is not public API is
reached through here, so a Flower upgrade touches this file,
`client/flower_compat.py` and `common/flower_compat.py` (the message
serializer both sides share, re-exported below) and nothing else. Public API
(`flwr.app`, `flwr.serverapp`) is used directly elsewhere.

Server-only internals, and where they live in flwr 1.42:

- `flwr.supercore.task_identity.TaskIdentity`: `Message(content, dst, type)`
  reads the sender's run id, node id and task id from this class-level
  identity, so a ServerApp must not build a message before it is set. Flower's
  own runtimes set it in `superlink/runtime/run_serverapp.py` and
  `simulation/run_simulation.py` (task_id=1, node_id=SUPERLINK_NODE_ID).
- `flwr.supercore.run.Run`: what `Grid.set_run` takes.
- `flwr.common.constant.SUPERLINK_NODE_ID`.
"""

from __future__ import annotations

from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedge.common.flower_compat import (
    ErrorCode,
    ProtoMessage,
    context_from_bytes,
    context_to_bytes,
    error_reply,
    message_from_bytes,
    message_from_parsed,
    message_parts,
    message_to_bytes,
    parse_message,
    parsed_metadata,
    recorddict_to_proto,
    set_message_id,
)

__all__ = [
    "SERVER_NODE_ID",
    "ErrorCode",
    "ProtoMessage",
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
    "recorddict_to_proto",
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
