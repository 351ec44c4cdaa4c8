"""A Flower `Grid` whose nodes are ClientApps called in this process.

Why: tests and quick experiments need to run a real `ServerApp` and real
`ClientApp`s without SuperLink, SuperNodes or Ray. This Grid keeps N virtual
nodes, each with its own `Context` (node config with `partition-id` and
`num-partitions`, the run config, and a `state` RecordDict that persists
across rounds, as a SuperNode keeps it), and calls each node's client callable
`(Message, Context) -> Message` (a `ClientApp` is one) when replies are pulled.

By default every message, reply and context crosses Flower's own protobuf
(`flwr.common.serde`) on the way, exactly as it would between processes, so
a ClientApp cannot share objects with the server by accident and anything
that would not survive the wire fails here too; the bytes are counted.

With `workers > 1` the nodes of one pull run in that many threads (replies
still come back in message order): on a GPU, one client's training leaves
the device idle between small kernels, so a few clients at once fill it.
Each node runs at most one message at a time; on a CPU the default of one
worker keeps runs bit-for-bit as before.

Nodes can be made to fail (`set_failure`): "raise" makes the node's app raise
(the reply becomes a Flower error reply, as Flower's runtimes do), "no-reply"
makes the node vanish for the message (no reply at all, as a dropped device).
"""

from __future__ import annotations

import logging
import random
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedge.common import flower_compat as fc
from fedge.server.flower_compat import SERVER_NODE_ID, Run, make_run, set_task_identity
from fedge.server.run_grid import RunGrid

log = logging.getLogger(__name__)

ClientCallable = Callable[[Message, Context], Message]
Failure = Literal["raise", "no-reply"]


class NodeFailure(RuntimeError):
    """Raised inside a node made to fail with `set_failure(node_id, "raise")`."""


@dataclass
class VirtualNode:
    """One simulated device: its id, app, persistent Context and failure mode."""

    node_id: int
    client: ClientCallable
    context: Context
    failure: Failure | None = None
    messages_handled: int = 0


@dataclass
class _Pending:
    node_id: int
    message: Message
    wire: bytes | None = None


@dataclass
class WireStats:
    """Bytes of Flower protobuf that crossed this grid (only when `serialize=True`)."""

    bytes_down: int = 0
    bytes_up: int = 0
    messages_down: int = 0
    messages_up: int = 0


class InProcessGrid(RunGrid):
    """A `flwr.serverapp.Grid` over in-process virtual nodes.

    `client` is one callable for every node or one per node. Node `i` gets
    `partition-id = i` and `num-partitions = num_nodes` (plus `node_configs[i]`
    if given), and `run_config` as its run config. Messages are executed in
    `pull_messages` (synchronously, one node after the other); with
    `stream_replies=True`, `send_and_receive` returns a generator that runs a
    node only when its reply is consumed, so a streaming aggregator holds one
    reply at a time.
    """

    def __init__(
        self,
        client: ClientCallable | Sequence[ClientCallable],
        num_nodes: int | None = None,
        *,
        run_config: Mapping[str, int | float | str | bool] | None = None,
        node_configs: Sequence[Mapping[str, int | float | str | bool]] | None = None,
        run_id: int = 1,
        seed: int = 0,
        serialize: bool = True,
        stream_replies: bool = False,
        workers: int = 1,
    ) -> None:
        clients = list(client) if isinstance(client, Sequence) else None
        if num_nodes is None:
            if clients is None:
                raise ValueError("num_nodes is required when a single client callable is given")
            num_nodes = len(clients)
        if clients is not None and len(clients) != num_nodes:
            raise ValueError(f"got {len(clients)} client callables for {num_nodes} nodes")
        if num_nodes < 1:
            raise ValueError("an InProcessGrid needs at least one node")
        self.run_config: dict[str, int | float | str | bool] = dict(run_config or {})
        self.serialize = serialize
        self.stream_replies = stream_replies
        self.workers = max(1, int(workers))
        self.wire = WireStats()
        self._run = make_run(run_id, self.run_config)
        self._pending: dict[str, _Pending] = {}
        self._nodes: dict[int, VirtualNode] = {}
        rng = random.Random(seed)
        for i in range(num_nodes):
            node_id = _fresh_node_id(rng, self._nodes)
            node_config: dict[str, int | float | str | bool] = {
                "partition-id": i,
                "num-partitions": num_nodes,
            }
            if node_configs is not None:
                node_config.update(node_configs[i])
            ctx = Context(
                run_id=run_id,
                node_id=node_id,
                node_config=node_config,
                state=RecordDict(),
                run_config=dict(self.run_config),
            )
            app = clients[i] if clients is not None else client
            self._nodes[node_id] = VirtualNode(node_id, app, ctx)  # type: ignore[arg-type]
        # Messages built by a strategy read the sender identity from here.
        set_task_identity(run_id)

    # ------------------------------------------------------------ nodes

    @property
    def nodes(self) -> list[VirtualNode]:
        """The virtual nodes, in partition order."""
        return list(self._nodes.values())

    @property
    def node_ids(self) -> list[int]:
        """Node ids in partition order (node `i` holds partition `i`)."""
        return list(self._nodes)

    def node(self, node_id: int) -> VirtualNode:
        """The virtual node with `node_id` (KeyError if unknown)."""
        return self._nodes[node_id]

    def context(self, node_id: int) -> Context:
        """The node's persistent Context, as its app left it after its last message."""
        return self._nodes[node_id].context

    def set_failure(self, node_id: int, failure: Failure | None) -> None:
        """Make a node fail on every message from now on ("raise"/"no-reply"), or heal it."""
        if failure not in (None, "raise", "no-reply"):
            raise ValueError(f"unknown failure mode {failure!r}")
        self._nodes[node_id].failure = failure

    def set_client(self, node_id: int, client: ClientCallable) -> None:
        """Swap the app a node runs (e.g. a stock ClientApp next to fedge's)."""
        self._nodes[node_id].client = client

    # ------------------------------------------------------------ Grid API

    def _adopted(self, run: Run) -> None:
        for node in self._nodes.values():
            node.context.run_id = run.run_id

    def get_node_ids(self) -> Iterable[int]:
        """Ids of all (healthy or not) nodes, as a SuperLink lists connected nodes."""
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue messages for their nodes; returns their ids (unknown nodes are skipped)."""
        ids: list[str] = []
        for msg in messages:
            md = msg.metadata
            if md.reply_to_message_id or md.ttl <= 0:
                raise ValueError(f"invalid instruction message: {md}")
            if md.run_id != self._run.run_id:
                raise ValueError(f"message for run {md.run_id}, grid serves {self._run.run_id}")
            if md.dst_node_id not in self._nodes:
                log.warning("dropping message for unknown node %d", md.dst_node_id)
                continue
            msg_id = str(uuid4())
            fc.set_message_id(msg, msg_id)
            pending = _Pending(md.dst_node_id, msg)
            if self.serialize:
                # Freeze the content now, as a push to a SuperLink would.
                pending.wire = fc.message_to_bytes(msg)
                pending.message = None  # type: ignore[assignment]
                self.wire.bytes_down += len(pending.wire)
                self.wire.messages_down += 1
            self._pending[msg_id] = pending
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Run the nodes for the given (pending) message ids and return their replies."""
        return list(self._iter_replies(list(message_ids)))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push then pull. Nodes that do not reply are simply missing from the result.

        `timeout` is accepted for the API; every node runs to completion here.
        """
        ids = list(self.push_messages(messages))
        del messages
        if self.stream_replies:
            return self._iter_replies(ids)
        return list(self._iter_replies(ids))

    # ------------------------------------------------------------ execution

    def _iter_replies(self, message_ids: list[str]) -> Iterator[Message]:
        nodes = [self._pending[m].node_id for m in message_ids if m in self._pending]
        if self.workers > 1 and len(nodes) > 1 and len(set(nodes)) == len(nodes):
            yield from self._iter_parallel(message_ids)
            return
        for msg_id in message_ids:
            pending = self._pending.pop(msg_id, None)
            if pending is None:
                continue
            reply = self._execute(pending)
            if reply is not None:
                yield reply

    def _iter_parallel(self, message_ids: list[str]) -> Iterator[Message]:
        """Run the messages' nodes `workers` at a time; yield replies in message order."""
        taken = [self._pending.pop(m) for m in message_ids if m in self._pending]
        with ThreadPoolExecutor(max_workers=self.workers,
                                thread_name_prefix="inprocess-node") as pool:
            futures = [pool.submit(self._execute, p) for p in taken]
            del taken
            for future in futures:
                reply = future.result()
                if reply is not None:
                    yield reply

    def _execute(self, pending: _Pending) -> Message | None:
        node = self._nodes[pending.node_id]
        msg = fc.message_from_bytes(pending.wire) if pending.wire is not None else pending.message
        pending.wire = None
        msg.metadata.delivered_at = datetime.now(UTC).isoformat()
        node.messages_handled += 1
        if node.failure == "no-reply":
            return None
        ctx = node.context
        if self.serialize:
            ctx = fc.context_from_bytes(fc.context_to_bytes(ctx))
        try:
            if node.failure == "raise":
                raise NodeFailure(f"node {node.node_id} was made to fail")
            reply = node.client(msg, ctx)
            if not isinstance(reply, Message):
                raise TypeError(f"client returned {type(reply).__name__}, not a Message")
            if reply.metadata.reply_to_message_id != msg.metadata.message_id:
                raise ValueError("client reply does not answer the message it was given")
            node.context = ctx  # as Flower's runtimes: the context is kept only on success
        except Exception as ex:
            log.warning("node %d failed: %s", node.node_id, ex)
            log.debug("%s", traceback.format_exc())
            reply = fc.error_reply(msg, f"{type(ex).__name__}: {ex}")
        fc.set_message_id(reply, str(uuid4()))
        if self.serialize:
            data = fc.message_to_bytes(reply)
            self.wire.bytes_up += len(data)
            self.wire.messages_up += 1
            reply = fc.message_from_bytes(data)
        return reply


def _fresh_node_id(rng: random.Random, taken: Mapping[int, object]) -> int:
    """A random positive 63-bit id, like a SuperLink's, never the server's own id."""
    while True:
        node_id = rng.getrandbits(63)
        if node_id > SERVER_NODE_ID and node_id not in taken:
            return node_id


def run_server_app_inprocess(
    server_app: ServerApp | Callable[[Grid, Context], None],
    grid: InProcessGrid,
    run_config: Mapping[str, int | float | str | bool] | None = None,
) -> Context:
    """Run a ServerApp to completion against `grid`; return the server's Context.

    This is what Flower's `flwr.server.run_serverapp.run` does (call
    `server_app(grid=..., context=...)`) after the runtime has set the task
    identity and the run. `run_config` defaults to the grid's run config; when
    given, it becomes the nodes' run config too (as a run's config reaches every
    SuperNode). The returned Context carries what the app left in `context.state`.
    """
    config = dict(grid.run_config if run_config is None else run_config)
    if run_config is not None:
        grid.run_config = dict(config)
        for node in grid.nodes:
            node.context.run_config = dict(config)
    run = grid.run
    run.override_config = dict(config)
    grid.set_run(run)
    set_task_identity(run.run_id, SERVER_NODE_ID, task_id=1)
    context = Context(
        run_id=run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=config,
    )
    server_app(grid, context)
    return context
