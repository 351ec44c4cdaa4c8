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
- `flwr.simulation.run_simulation._run_simulation`: the simulation engine
  `flwr run`'s `flwr-simulation` process calls (`simulation/app.py`), without
  the deprecated `run_simulation` wrapper; `run_simulation_engine` below
  (used by `fedge simulate`, simulations/engine.py).
"""

from __future__ import annotations

from typing import Any

from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["SERVER_NODE_ID", "Run", "make_run", "run_simulation_engine", "set_task_identity"]

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


def run_simulation_engine(
    server_app: Any, client_app: Any, num_supernodes: int, backend_config: dict[str, Any]
) -> None:
    """Flower's simulation engine on Ray, called as `flwr run`'s simulation process calls it."""
    from flwr.simulation.run_simulation import _run_simulation  # Ray: only when simulating
    from flwr.supercore.telemetry import EventType

    _run_simulation(
        num_supernodes=num_supernodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_name="ray",
        backend_config=backend_config,
    )
