"""`GrpcGrid`: a `flwr.serverapp.Grid` whose nodes are edge devices on fedge's gRPC service.

The ServerApp runs in a thread of the coordinator and talks to this Grid as
to any other; the servicer (`coordinator_service.py`) moves the bytes.

- `push_messages` records one task row per message in the store and queues
  it on the device's in-memory queue in the `Fleet` (which wakes the device's
  long poll). A message's round is its config's `server-round` (what Flower's
  strategies send), else its numeric `group_id`, else the current round; the
  first push of a round opens it in the store.
- `send_and_receive` pushes, then returns a generator that yields replies as
  devices complete them, until every task is answered or `timeout` (the run's
  round timeout) passes. Tasks still unanswered then expire, under the fleet's
  lock, so a late result is refused (FAILED_PRECONDITION) and never counted;
  the devices that held them are left out of the round, not waited for.
- Replies are kept as files until consumed and decoded one at a time, so a
  streaming aggregator holds one reply in memory, however many devices answer.
- `end_round(r)` closes the round (`store.close_round`) and expires whatever
  is left of it; the coordinator calls it before committing the round.
- `get_node_ids` lists live, joined devices that train (not inference-only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict

from fedge.common import flower_compat as fc
from fedge.server.fleet import Fleet, TaskPayload
from fedge.server.flower_compat import make_run, set_task_identity
from fedge.server.run_grid import RunGrid
from fedge.server.store import Store, StoreError, TaskState

log = logging.getLogger(__name__)

ROUND_KEY = "server-round"


@dataclass(slots=True)
class _Arrived:
    """An accepted result waiting for the ServerApp: its file, maybe its parsed message."""

    path: Path
    parsed: Any
    held: int  # bytes of `parsed` counted against the inbox budget


_trash: queue.SimpleQueue[Path] = queue.SimpleQueue()
_janitor: threading.Thread | None = None
_janitor_lock = threading.Lock()


def _discard(path: Path) -> None:
    """Delete a consumed result file in a background thread.

    Freeing a file's pages is kernel work that would otherwise sit between
    the ServerApp and its next reply.
    """
    global _janitor
    with _janitor_lock:
        if _janitor is None or not _janitor.is_alive():
            _janitor = threading.Thread(target=_empty_trash, name="fedge-janitor", daemon=True)
            _janitor.start()
    _trash.put(path)


def _empty_trash() -> None:
    while True:
        _trash.get().unlink(missing_ok=True)


class GridStopped(RuntimeError):
    """The coordinator is shutting down; the ServerApp stops at its next Grid call."""


class GrpcGrid(RunGrid):
    """A Flower Grid over the coordinator's devices (see the module docstring).

    `device_run_config` is what devices receive as their run config
    (`TaskEnvelope.run_config_json`); `model_version` names the global model
    tasks are built from; `default_timeout` bounds `push_messages` tasks that
    are not part of a `send_and_receive`. Replies waiting to be consumed keep
    the servicer's parsed message while they fit in `inbox_memory_bytes`, else
    only their file, read again when consumed.
    """

    def __init__(
        self,
        store: Store,
        fleet: Fleet,
        *,
        run_id: int,
        device_run_config: Mapping[str, Any] | None = None,
        model_version: Callable[[], str] = lambda: "",
        default_timeout: float = 3600.0,
        inbox_memory_bytes: int = 64 << 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.default_timeout = float(default_timeout)
        self._model_version = model_version
        self._clock = clock
        self._run = make_run(run_id, dict(device_run_config or {}))
        self._run_config_json = json.dumps(dict(device_run_config or {}), sort_keys=True)
        self._cond = threading.Condition()
        self._inbox: dict[str, _Arrived] = {}
        self._inbox_parsed_bytes = 0
        self.inbox_memory_bytes = int(inbox_memory_bytes)
        self._open_round = 0
        self._opened: set[int] = set()
        # round -> task id -> (device id, message type): who was asked, for the audit lists
        self._round_tasks: dict[int, dict[str, tuple[str, str]]] = {}
        self._stopped = threading.Event()
        # bytes of the tasks pushed per round (what a foreign ServerApp's round record shows)
        self.sent_bytes: dict[int, int] = {}
        # called with a round when the next one opens (the coordinator records a foreign
        # ServerApp's rounds there; fedge's own app commits its rounds in RoundKeeper)
        self.round_closed: Callable[[int], None] | None = None
        set_task_identity(run_id)

    # ------------------------------------------------------------ Grid API

    @property
    def run_id(self) -> int:
        return int(self._run.run_id)

    def get_node_ids(self) -> Iterable[int]:
        """Node ids of joined devices that are live and train."""
        self._check_stopped()
        return self.fleet.live_node_ids(training=True)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue messages for their devices; returns their ids (= task ids).

        Messages for unknown or departed nodes are skipped with a warning, as
        a SuperLink drops messages for nodes it no longer has.
        """
        return self._push(messages, self._clock() + self.default_timeout)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies received so far for `message_ids` (each returned once), without waiting."""
        with self._cond:
            ready = self._take(set(message_ids))
        return [m for m in (self._decode(t, a) for t, a in ready) if m is not None]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then yield replies as they arrive until all are in or `timeout` passes.

        The generator holds one decoded reply at a time. When it ends, tasks
        without a result expire: a device that dropped is left out.
        """
        timeout = self.default_timeout if timeout is None else float(timeout)
        deadline = self._clock() + timeout
        ids = list(self._push(messages, deadline))
        return self._collect(ids, deadline)

    # ------------------------------------------------------------ rounds

    def wait_for_nodes(self, count: int, *, poll_s: float = 0.2) -> list[int]:
        """Block until `count` devices are live (the first round needs them)."""
        while True:
            self._check_stopped()
            nodes = self.fleet.live_node_ids(training=True)
            if len(nodes) >= count:
                return nodes
            self._stopped.wait(poll_s)

    def end_round(self, server_round: int) -> None:
        """Close `server_round`: its leftover tasks expire and no result is accepted any more."""
        self._ensure_open(server_round)
        run_id = self.run_id
        expired = self.fleet.expire(
            self.fleet.live_tasks(run_id, server_round),
            lambda _gone: self.store.close_round(run_id, server_round),
        )
        if not expired:
            self.store.close_round(run_id, server_round)
        self._discard_uploads(expired)
        self._drop_inbox(self._round_tasks.get(server_round, {}).keys())

    def tasked_devices(self, server_round: int, message_type: str | None = "train") -> list[str]:
        """Device ids that received a task in `server_round` (of `message_type`), in order."""
        seen: dict[str, None] = {}
        for device_id, mtype in self._round_tasks.get(server_round, {}).values():
            if message_type is None or mtype == message_type:
                seen[device_id] = None
        return list(seen)

    def device_of_node(self, node_id: int) -> str | None:
        entry = self.fleet.device_for_node(node_id)
        if entry is not None:
            return entry.device_id
        device = self.store.get_device_by_node(node_id)
        return device.id if device is not None else None

    @property
    def stopped(self) -> bool:
        """True once `stop` was called: the coordinator is shutting down."""
        return self._stopped.is_set()

    def stop(self) -> None:
        """Make every waiting or later Grid call raise GridStopped."""
        self._stopped.set()
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------ internals

    def _check_stopped(self) -> None:
        if self._stopped.is_set():
            raise GridStopped("the coordinator is stopping")

    def _push(self, messages: Iterable[Message], deadline: float) -> list[str]:
        self._check_stopped()
        ids: list[str] = []
        contents: dict[int, bytes] = {}
        hashes: dict[int, Any] = {}
        keep_alive: list[RecordDict] = []  # id() keys stay valid while this call runs
        for msg in messages:
            md = msg.metadata
            if md.reply_to_message_id or md.ttl <= 0:
                raise ValueError(f"invalid instruction message: {md}")
            if md.run_id != self.run_id:
                raise ValueError(f"message for run {md.run_id}, grid serves {self.run_id}")
            entry = self.fleet.device_for_node(md.dst_node_id)
            if entry is None:
                log.warning("dropping message for unknown node %d", md.dst_node_id)
                continue
            server_round = self._round_of(msg)
            self._ensure_open(server_round)
            task_id = uuid.uuid4().hex
            fc.set_message_id(msg, task_id)
            if msg.has_content():
                keep_alive.append(msg.content)
            content, rest = fc.message_parts(msg, contents)
            key = id(msg.content) if msg.has_content() else 0
            if key not in hashes:
                hashes[key] = hashlib.sha256(content)
            digest = hashes[key].copy()
            digest.update(rest)
            self.store.add_task(
                task_id,
                run_id=self.run_id,
                round=server_round,
                device_id=entry.device_id,
                message_type=md.message_type,
            )
            self._round_tasks.setdefault(server_round, {})[task_id] = (
                entry.device_id,
                md.message_type,
            )
            self.sent_bytes[server_round] = (
                self.sent_bytes.get(server_round, 0) + len(content) + len(rest)
            )
            self.fleet.add_task(
                TaskPayload(
                    task_id=task_id,
                    run_id=self.run_id,
                    round=server_round,
                    device_id=entry.device_id,
                    node_id=entry.node_id,
                    message_type=md.message_type,
                    parts=(content, rest),
                    total_size=len(content) + len(rest),
                    sha256=digest.hexdigest(),
                    deadline=deadline,
                    base_model_version=self._model_version(),
                    run_config_json=self._run_config_json,
                    on_result=self._on_result,
                )
            )
            ids.append(task_id)
        return ids

    def _round_of(self, msg: Message) -> int:
        config = msg.content.config_records.get("config") if msg.has_content() else None
        if config is not None and ROUND_KEY in config:
            with contextlib.suppress(TypeError, ValueError):
                return int(config[ROUND_KEY])  # type: ignore[arg-type]
        if msg.metadata.group_id.isdigit():
            return int(msg.metadata.group_id)
        return max(self._open_round, 1)

    def _ensure_open(self, server_round: int) -> None:
        """Open `server_round` in the store on its first task; close an older open round.

        Opening resets a round a crashed process left unfinished, so its stale
        tasks expire and their late results are refused.
        """
        if server_round in self._opened:
            return
        try:
            self.store.open_round(self.run_id, server_round)
        except StoreError as e:
            raise RuntimeError(f"round {server_round} cannot be opened: {e}") from e
        self._opened.add(server_round)
        previous, self._open_round = self._open_round, max(self._open_round, server_round)
        if previous and previous < server_round:
            self.end_round(previous)
            if self.round_closed is not None:
                self.round_closed(previous)

    def _on_result(self, task_id: str, path: Path, parsed: Any, size: int) -> None:
        """Called by the fleet (under its lock) when a result is accepted."""
        with self._cond:
            if parsed is not None and self._inbox_parsed_bytes + size > self.inbox_memory_bytes:
                if not path.exists():  # it arrived in memory: give it a file to wait in
                    path.write_bytes(parsed.SerializeToString())
                parsed = None  # over budget: the consumer reads the file instead
            self._inbox[task_id] = _Arrived(path, parsed, size if parsed is not None else 0)
            self._inbox_parsed_bytes += self._inbox[task_id].held
            self._cond.notify_all()

    def _take(self, task_ids: set[str]) -> list[tuple[str, _Arrived]]:
        """Pop arrived replies for `task_ids` (call with `_cond` held)."""
        out = [(t, self._inbox.pop(t)) for t in list(self._inbox) if t in task_ids]
        self._inbox_parsed_bytes -= sum(a.held for _, a in out)
        return out

    def _collect(self, ids: list[str], deadline: float) -> Iterator[Message]:
        pending = set(ids)
        try:
            while pending:
                ready = self._wait_ready(pending, deadline)
                if not ready:
                    break
                for task_id, arrived in ready:
                    pending.discard(task_id)
                    reply = self._decode(task_id, arrived)
                    if reply is not None:
                        yield reply
        finally:
            if pending:
                self._expire(sorted(pending))
        # results completed just before the tasks expired are still this round's
        with self._cond:
            late = self._take(pending)
        for task_id, arrived in late:
            reply = self._decode(task_id, arrived)
            if reply is not None:
                yield reply

    def _wait_ready(self, pending: set[str], deadline: float) -> list[tuple[str, _Arrived]]:
        with self._cond:
            while True:
                ready = self._take(pending)
                if ready:
                    return ready
                self._check_stopped()
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return []
                self._cond.wait(min(remaining, 1.0))

    def _expire(self, task_ids: list[str]) -> None:
        def mark(gone: list[str]) -> None:
            for task_id in gone:
                self.store.set_task_state(
                    task_id, TaskState.EXPIRED, only_from=(TaskState.QUEUED, TaskState.DELIVERED)
                )

        gone = self.fleet.expire(task_ids, mark)
        if gone:
            log.info("%d device(s) did not answer in time; left out of the round", len(gone))
            self._discard_uploads(gone)

    def _discard_uploads(self, task_ids: Iterable[str]) -> None:
        for task_id in task_ids:
            result = self.store.get_result(task_id)
            if result is not None and result.path and result.status.value == "partial":
                Path(result.path).unlink(missing_ok=True)

    def _drop_inbox(self, task_ids: Iterable[str]) -> None:
        with self._cond:
            stale = self._take(set(task_ids))
        for _, arrived in stale:
            _discard(arrived.path)

    def _decode(self, task_id: str, arrived: _Arrived) -> Message | None:
        """A completed result as a Flower Message (its file is deleted)."""
        try:
            if arrived.parsed is not None:
                reply = fc.message_from_parsed(arrived.parsed)
            else:
                reply = fc.message_from_bytes(arrived.path.read_bytes())
        except Exception as e:  # validated on arrival; a failure here is the disk's
            log.error("result of task %s unreadable: %s", task_id, e)
            return None
        finally:
            _discard(arrived.path)
        fc.set_message_id(reply, uuid.uuid4().hex)
        return reply
