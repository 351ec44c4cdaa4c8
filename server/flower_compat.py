"""The coordinator's only door into Flower internals (flwr 1.42).

Everything only fedge's server side needs from Flower that is not public API
lives here; the message serializer both sides share is
`fedge.common.flower_compat`, and the device's own internals are in
`fedge.client.flower_compat`. A Flower upgrade touches these three files and
nothing else. Public API (`flwr.app`, `flwr.serverapp`) is used directly
elsewhere.

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

__all__ = ["SERVER_NODE_ID", "Run", "make_run", "set_task_identity"]

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

