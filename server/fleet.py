"""Devices in session on this coordinator, their task queues and the tasks in flight.

The one piece of memory the gRPC servicer (asyncio, the event loop's thread)
and the `GrpcGrid` (the ServerApp's thread) share. Why it looks like this:

- **Cheap per device.** A device that waits costs one `DeviceEntry` (a few
  fields, a short list of task ids, an `asyncio.Event` created on its first
  long poll), so one coordinator holds thousands. Sessions live only here:
  a restarted coordinator answers UNAUTHENTICATED and devices Join again.
- **Tasks are two byte strings.** A task payload is a Flower message as
  `(content, metadata)` fragments (`flower_compat.message_parts`); every
  device of a round shares the same content bytes, and the SHA-256 of the
  content is computed once and extended per device, so a round with N devices
  holds one copy of the model, not N.
- **One lock, one order.** Completing a result (servicer) and expiring the
  tasks of a closed round (grid) both happen under `lock`, and a result is
  handed to the grid inside it: a result is either counted by the round or
  refused with FAILED_PRECONDITION, never accepted by the store and then lost.
  Lock order: `Fleet.lock`, then the store's lock or the grid's condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedge.common.chunking import ChunkError, check_chunk_size

HEARTBEATS_PER_S = 50.0
"""The most heartbeats a second a coordinator asks of its fleet (`Fleet.heartbeat_interval_s`).

Every RPC costs the coordinator about a millisecond of CPU in gRPC and TLS at
idle (measured in docs/scaling.md), so the announced interval grows with the
fleet past `heartbeat floor x 50` devices: 10,000 devices at a 30 s floor are
told 200 s. An idle device is live anyway while its long poll is open."""

ResultCallback = Callable[[str, Path, Any, int], None]
"""(task id, result file, the parsed reply or None, payload size): how a result reaches the grid."""
CompleteOutcome = Literal["accepted", "duplicate", "closed"]


@dataclass(eq=False, slots=True)
class TaskPayload:
    """One Flower message waiting for (or delivered to) one device, as sent on the wire."""

    task_id: str
    run_id: int
    round: int
    device_id: str
    node_id: int
    message_type: str
    parts: tuple[bytes, ...]
    total_size: int
    sha256: str
    deadline: float  # time.monotonic() after which a result is refused
    base_model_version: str = ""
    run_config_json: str = "{}"
    delivered: bool = False
    on_result: ResultCallback | None = None

    def iter_chunks(self, chunk_size: int, start: int = 0) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) chunks of the concatenated parts from `start`, one copy each."""
        check_chunk_size(chunk_size)
        if not 0 <= start <= self.total_size:
            raise ChunkError("out_of_order", f"start {start} outside 0..{self.total_size}")
        views = [memoryview(p) for p in self.parts if p]
        offset = start
        while offset < self.total_size:
            want = min(chunk_size, self.total_size - offset)
            out = bytearray()
            pos, base = offset, 0
            for view in views:
                end = base + len(view)
                if pos < end and len(out) < want:
                    take = min(end - pos, want - len(out))
                    out += view[pos - base : pos - base + take]
                    pos += take
                base = end
            yield offset, bytes(out)
            offset += want


@dataclass(eq=False, slots=True)
class DeviceEntry:
    """A joined device: its session, liveness and queue (task ids, oldest first)."""

    device_id: str
    node_id: int
    name: str
    token: str
    last_seen: float
    inference_only: bool = False
    polls: int = 0
    tasks: list[str] = field(default_factory=list)
    wakeup: asyncio.Event | None = None
    touched: bool = True


class Fleet:
    """Sessions, liveness, per-device queues and live tasks; safe across threads.

    A device is *live* while one of its calls is open (a long poll) or it was
    heard from within `liveness_s` (a few of the longest heartbeat intervals
    announced so far).
    """

    def __init__(
        self,
        *,
        heartbeat_interval_s: float = 5.0,
        liveness_factor: float = 3.0,
        max_heartbeats_per_s: float = HEARTBEATS_PER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_heartbeat_s = float(heartbeat_interval_s)
        self.max_heartbeats_per_s = float(max_heartbeats_per_s)  # 0: never stretch
        self.liveness_factor = float(liveness_factor)
        self._longest_interval = self.base_heartbeat_s
        self.lock = threading.RLock()
        self._clock = clock
        self._by_token: dict[str, DeviceEntry] = {}
        self._by_device: dict[str, DeviceEntry] = {}
        self._by_node: dict[int, DeviceEntry] = {}
        self._tasks: dict[str, TaskPayload] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def heartbeat_interval_s(self) -> float:
        """The interval to announce now: the configured one, stretched (in whole seconds) so
        that all sessions together send at most `max_heartbeats_per_s`."""
        interval = self.base_heartbeat_s
        if self.max_heartbeats_per_s > 0:
            stretched = len(self._by_token) / self.max_heartbeats_per_s
            if stretched > interval:
                interval = float(math.ceil(stretched))
        if interval > self._longest_interval:  # a device may wait this long: liveness follows
            self._longest_interval = interval
        return interval

    @property
    def liveness_s(self) -> float:
        """Silence after which a device without an open call is gone: a few of the longest
        intervals any device was told (a device told 200 s is not dropped at 3 x 30 s)."""
        return self._longest_interval * self.liveness_factor

    def now(self) -> float:
        """The clock task deadlines and liveness use (monotonic seconds)."""
        return self._clock()

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop whose long polls are woken when a task is queued."""
        self._loop = loop

    # ------------------------------------------------------------ sessions

    def join(
        self, device_id: str, node_id: int, name: str, *, inference_only: bool = False
    ) -> DeviceEntry:
        """Open a session (a new token; a device's older token stops working)."""
        token = secrets.token_urlsafe(24)
        with self.lock:
            entry = self._by_device.get(device_id)
            if entry is None:
                entry = DeviceEntry(device_id, node_id, name, token, self._clock())
                self._by_device[device_id] = entry
                self._by_node[node_id] = entry
            else:
                self._by_token.pop(entry.token, None)
                entry.token, entry.name = token, name
            entry.inference_only = inference_only
            entry.last_seen = self._clock()
            entry.touched = True
            self._by_token[token] = entry
            return entry

    def authenticate(self, token: str) -> DeviceEntry | None:
        """The device holding session `token` (now counted as seen), or None."""
        with self.lock:
            entry = self._by_token.get(token) if token else None
            if entry is not None:
                entry.last_seen = self._clock()
                entry.touched = True
            return entry

    def device(self, device_id: str) -> DeviceEntry | None:
        with self.lock:
            return self._by_device.get(device_id)

    def device_for_node(self, node_id: int) -> DeviceEntry | None:
        with self.lock:
            return self._by_node.get(node_id)

    def is_live(self, entry: DeviceEntry, now: float | None = None) -> bool:
        now = self._clock() if now is None else now
        return entry.polls > 0 or now - entry.last_seen <= self.liveness_s

    def live_node_ids(self, *, training: bool = True) -> list[int]:
        """Node ids of live devices, in join order; `training` leaves out inference-only ones."""
        heard_since = self._clock() - self.liveness_s  # once: this runs over the whole fleet
        with self.lock:
            return [
                e.node_id
                for e in self._by_device.values()
                if (e.polls > 0 or e.last_seen >= heard_since)
                and not (training and e.inference_only)
            ]

    def take_touched(self) -> list[str]:
        """Device ids seen since the last call (their `last_seen` is written in one batch)."""
        with self.lock:
            out = [e.device_id for e in self._by_device.values() if e.touched]
            for device_id in out:
                self._by_device[device_id].touched = False
            return out

    # --------------------------------------------------------------- tasks

    def add_task(self, task: TaskPayload) -> None:
        """Queue `task` for its device and wake the device's long poll."""
        with self.lock:
            entry = self._by_device.get(task.device_id)
            if entry is None:
                raise KeyError(f"device {task.device_id} has no session")
            self._tasks[task.task_id] = task
            entry.tasks.append(task.task_id)
            event = entry.wakeup
        if event is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(event.set)

    def task(self, task_id: str) -> TaskPayload | None:
        """The live task `task_id` (queued or delivered, result not yet accepted)."""
        with self.lock:
            return self._tasks.get(task_id)

    def next_task(self, entry: DeviceEntry) -> TaskPayload | None:
        """The device's oldest live task.

        A device pulls only when it holds no task, so a delivered task offered
        again means the device lost it (a restart, a dropped stream): sending
        it again is what lets the device still answer within the round.
        """
        with self.lock:
            for task_id in entry.tasks:
                task = self._tasks.get(task_id)
                if task is not None:
                    return task
            return None

    def has_task(self, entry: DeviceEntry) -> bool:
        return self.next_task(entry) is not None

    async def wait_for_task(self, entry: DeviceEntry, timeout: float) -> TaskPayload | None:
        """Long poll: the device's next task, waiting up to `timeout` seconds for one."""
        task = self.next_task(entry)
        if task is not None or timeout <= 0:
            return task
        if entry.wakeup is None:
            entry.wakeup = asyncio.Event()
        event = entry.wakeup
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with self.lock:
            entry.polls += 1
        try:
            while True:
                event.clear()
                task = self.next_task(entry)
                remaining = deadline - loop.time()
                if task is not None or remaining <= 0:
                    return task
                # parked on the event with one timer, not `wait_for` (a Task and two futures
                # per poll): thousands of idle devices sit here; the timer's wake-up is spurious
                # for another poll of the same device, which looks again and parks again
                timer = loop.call_later(remaining, event.set)
                try:
                    await event.wait()
                finally:
                    timer.cancel()
        finally:
            with self.lock:
                entry.polls -= 1
                entry.last_seen = self._clock()
                entry.touched = True

    def complete(
        self,
        task_id: str,
        path: Path,
        store_complete: Callable[[str], bool],
        parsed: Any = None,
        size: int = 0,
    ) -> CompleteOutcome:
        """Accept a verified result: mark it complete in the store and hand it to the grid.

        All under the lock, so a round that closes (`expire`) either sees the
        result in its inbox or has already made it "closed".
        """
        with self.lock:
            task = self._tasks.get(task_id)
            if task is None:
                return "closed"
            if not store_complete(task_id):
                return "duplicate"
            self._forget(task)
            if task.on_result is not None:
                task.on_result(task_id, path, parsed, size)
            return "accepted"

    def drop(self, task_id: str) -> TaskPayload | None:
        """Forget a task whose result was rejected (the round goes on without it)."""
        with self.lock:
            task = self._tasks.get(task_id)
            if task is not None:
                self._forget(task)
            return task

    def expire(
        self, task_ids: list[str], on_expired: Callable[[list[str]], None] | None = None
    ) -> list[str]:
        """Remove tasks still live (no accepted result); return their ids.

        `on_expired` runs under the lock (the store update), so no result for
        these tasks can be completed in between.
        """
        with self.lock:
            gone = [t for t in task_ids if t in self._tasks]
            for task_id in gone:
                self._forget(self._tasks[task_id])
            if on_expired is not None and gone:
                on_expired(gone)
            return gone

    def live_tasks(self, run_id: int, round: int) -> list[str]:
        with self.lock:
            return [
                t.task_id for t in self._tasks.values() if t.run_id == run_id and t.round == round
            ]

    def _forget(self, task: TaskPayload) -> None:
        del self._tasks[task.task_id]
        entry = self._by_device.get(task.device_id)
        if entry is not None:
            with contextlib.suppress(ValueError):
                entry.tasks.remove(task.task_id)
