"""What fedge's Grids share: holding the Flower `Run` they serve.

`GrpcGrid` and `InProcessGrid` differ in how messages travel, not in how a
run is adopted, so that part of Flower's abstract `Grid` is written once here.
"""

from __future__ import annotations

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedge.server import flower_compat as fc


class RunGrid(Grid):
    """A Flower `Grid` that adopts a run; subclasses deliver the messages."""

    _run: fc.Run

    def set_run(self, run: fc.Run) -> None:
        """Adopt `run` (Flower calls this before handing the grid to a ServerApp)."""
        if not isinstance(run, fc.Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run
        self._adopted(run)
        fc.set_task_identity(run.run_id)

    def _adopted(self, run: fc.Run) -> None:
        """Hook for what a subclass ties to the run id (nothing by default)."""

    @property
    def run(self) -> fc.Run:
        """A copy of the run this grid serves."""
        return fc.Run(**vars(self._run))

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Deprecated in Flower in favour of `Message(...)`; kept for the abstract API."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)
