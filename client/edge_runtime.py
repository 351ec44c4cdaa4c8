"""The edge runtime: one long-lived process per device that works for a coordinator.

`EdgeDevice.run()` joins the coordinator (a stable device id kept in the
data folder; Join again on UNAUTHENTICATED), heartbeats in the background at
the interval the coordinator asks for, finishes any results left in the
outbox by an earlier process, and then loops: long-poll `PullTask`, run the
task through the ClientApp (`app_runner`, loaded with Flower and torch only
when the first task arrives), write the reply to the outbox, push it in
chunks (`uploader`). A lost link is retried with exponential backoff and
full jitter; a dropped upload resumes at the coordinator's offset.

The ClientApp runs in one daemon worker thread, so heartbeats continue while
it trains and a stop request never waits for a long training run: `stop()`
abandons the current step (an upload resumes from the outbox on the next
start; a task being trained is left to the coordinator's round timeout).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from fedge.client.app_ref import DEFAULT_APP_REF
from fedge.client.backoff import Backoff, UniformSource
from fedge.client.device_state import DeviceFolder, Identity, OutboxEntry
from fedge.client.edge_session import (
    CoordinatorLink,
    DeliveredTask,
    DeviceInfo,
    DeviceRevoked,
    LinkDown,
    NotRecognised,
    Session,
    SessionLost,
    open_channel,
    parse_target,
)
from fedge.client.uploader import Uploader
from fedge.common.alloc import release_memory
from fedge.common.chunking import DEFAULT_CHUNK_SIZE, check_chunk_size
from fedge.common.codec_spec import VALUE_CODECS
from fedge.v1 import coordinator_pb2 as pb

if TYPE_CHECKING:  # at run time it is imported with the first task (Flower, torch)
    from fedge.client.app_runner import AppRunner
    from fedge.client.enroll import DeviceCredentials

log = logging.getLogger(__name__)

#: what fedge on this device can encode (Join's `codecs`): a property of the runtime, not of
#: the app's name; whether a reply was compressed is read from the reply itself
DEVICE_CODECS = (*VALUE_CODECS, "topk")
EXIT_OK, EXIT_REVOKED = 0, 3


@dataclass
class TaskStats:
    """What one task cost the device: the per-task log line, kept for tests and benchmarks."""

    task_id: str
    run_id: int
    round: int
    message_type: str
    bytes_down: int
    bytes_up: int
    seconds: float
    outcome: str


@dataclass(frozen=True)
class _Wiring:
    """What `run()` builds before the device serves: every step below runs inside it."""

    identity: Identity
    link: CoordinatorLink
    uploader: Uploader


@dataclass
class _Progress:
    """A task's running totals, kept across upload attempts within one process."""

    started: float
    bytes_down: int = 0
    bytes_up: int = 0


class _Worker:
    """One daemon thread that runs blocking jobs (the ClientApp) off the event loop.

    Daemon, and one thread for the process's life: a stop never waits for a
    training run, and the allocator keeps serving the app from the same arena.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[concurrent.futures.Future, Callable, tuple]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self.busy = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fedge-task", daemon=True)
            self._thread.start()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fut, fn, args))
        return fut

    def _loop(self) -> None:
        while True:
            fut, fn, args = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            self.busy = True
            try:
                fut.set_result(fn(*args))
            except BaseException as e:
                fut.set_exception(e)
            finally:
                self.busy = False


class EdgeDevice:
    """A device's runtime; `await run()` until `stop()` (returns the exit code).

    `coordinator` is `HOST:PORT`; `state_dir` the device's data folder;
    `ca_cert` the coordinator's CA (TLS is the default; plaintext only with
    `insecure=True`); `node_config` Flower's node config (`partition-id`,
    `num-partitions`, `data-dir` ...); `client_app_ref` a `module:attr`
    ClientApp, fedge's own (with the compression mod) by default;
    `chunk_size` caps the upload/download chunk (else the coordinator's);
    `max_backoff` caps the reconnect delay, seconds.
    `credentials` (`fedge.client.enroll.load_credentials(data)`) make it an
    enrolled device: mutual TLS with its certificate, its device id from the
    certificate, every result header signed with its key; `coordinator` may
    then be "" (the device port recorded at enrollment).
    """

    def __init__(
        self,
        coordinator: str,
        state_dir: Path,
        *,
        ca_cert: Path | None = None,
        insecure: bool = False,
        name: str = "",
        node_config: Mapping[str, Any] | None = None,
        client_app_ref: str = DEFAULT_APP_REF,
        chunk_size: int | None = None,
        max_backoff: float = 60.0,
        base_backoff: float = 0.5,
        poll_wait_s: float = 120.0,
        stall_timeout_s: float = 60.0,
        rng: UniformSource | None = None,
        credentials: DeviceCredentials | None = None,
    ) -> None:
        self.credentials = credentials
        if credentials is not None and not coordinator:
            coordinator = credentials.device_target
        self.target = parse_target(coordinator)
        self.ca_pem = Path(ca_cert).read_bytes() if ca_cert else None
        self.insecure = insecure
        self.folder = DeviceFolder(Path(state_dir))
        self.name = name
        self.node_config = dict(node_config or {})
        self.client_app_ref = client_app_ref
        self.chunk_size = check_chunk_size(chunk_size) if chunk_size else None
        self.backoff = Backoff(base_backoff, max_backoff, rng)
        self.poll_wait_s = poll_wait_s
        self.stall_timeout_s = stall_timeout_s
        self.completed: collections.deque[TaskStats] = collections.deque(maxlen=100)
        self.joins = 0
        self.identity: Identity | None = None
        self.session: Session | None = None
        self._wiring: _Wiring | None = None
        self._runner: AppRunner | None = None  # imported with the first task
        self._worker = _Worker()
        self._state: tuple[int, str] = (pb.DEVICE_STATE_IDLE, "")
        self._cancelled: set[str] = set()
        self._join_lock = asyncio.Lock()
        self._serve_task: asyncio.Task | None = None
        self._stopping = False
        self._revoked = False
        self._joined = asyncio.Event()
        self._progress: dict[str, _Progress] = {}

    # ------------------------------------------------------------ control

    @property
    def worker_busy(self) -> bool:
        """True while the ClientApp is running (a stop leaves that thread behind)."""
        return self._worker.busy

    def stop(self) -> None:
        """Stop soon: cancel what the device is waiting on.

        Call it on the event loop's thread; a handler from `loop.add_signal_handler`
        (as `fedge client run` installs for SIGTERM/SIGINT) is fine.
        """
        self._stopping = True
        if self._serve_task is not None and not self._serve_task.done():
            self._serve_task.cancel()

    async def wait_joined(self) -> Session:
        """Until the first successful Join (for tests and benchmarks)."""
        await self._joined.wait()
        assert self.session is not None
        return self.session

    async def run(self) -> int:
        """Serve the coordinator until `stop()`; returns the process exit code."""
        self.folder.lock()
        channel = None
        heartbeat: asyncio.Task | None = None
        try:
            self.identity = self.folder.load_identity(self.name)
            creds = self.credentials
            if creds is not None:  # the certificate names this device
                ident = self.identity
                if (ident.device_id, ident.node_id) != (creds.device_id, creds.node_id):
                    ident.device_id, ident.node_id = creds.device_id, creds.node_id
                    self.folder.save_identity(ident)
            channel = open_channel(
                self.target,
                ca_pem=self.ca_pem,
                insecure=self.insecure,
                reconnect_backoff=(self.backoff.base, self.backoff.cap),
                credentials=creds.channel_credentials() if creds is not None else None,
            )
            link = CoordinatorLink(
                channel, chunk_size=self.chunk_size, stall_timeout_s=self.stall_timeout_s
            )
            uploader = Uploader(
                link.stub, self._token, stall_timeout_s=self.stall_timeout_s,
                signer=_result_signer(creds) if creds is not None else None,
            )
            self._wiring = _Wiring(self.identity, link, uploader)
            log.info(
                "device %s (%s) serving %s over %s", self.identity.device_id,
                self.identity.name or "unnamed", self.target,
                "plaintext (--insecure)" if self.insecure
                else "mutual TLS" if creds is not None else "TLS",
            )
            heartbeat = asyncio.create_task(self._heartbeat_loop())
            if self._stopping:
                return EXIT_OK
            self._serve_task = asyncio.create_task(self._serve())
            await asyncio.wait({self._serve_task})
            if self._revoked:
                return EXIT_REVOKED
            if self._serve_task.cancelled():
                log.info("stopped")
                return EXIT_OK
            return self._serve_task.result()
        except DeviceRevoked as e:
            log.error("the coordinator revoked this device (%s); stopping", e)
            return EXIT_REVOKED
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
            if channel is not None:
                await channel.close(grace=None)
            self.folder.unlock()

    # --------------------------------------------------------------- loop

    @property
    def _wired(self) -> _Wiring:
        if self._wiring is None:
            raise RuntimeError("the device is not running: call run()")
        return self._wiring

    def _live_session(self) -> Session:
        """The current session; none (lost, not joined yet) is a lost session."""
        if self.session is None:
            raise SessionLost("no session")
        return self.session

    def _token(self) -> str:
        return self._live_session().token

    async def _serve(self) -> int:
        lost_in_a_row = 0
        # `stop()` cancels this task, and the loops also check `_stopping`, so a cancel lost
        # on the way still stops the device (CI saw Python 3.11's `asyncio.wait_for` swallow
        # one: a stopped device kept pulling; the device's waits now use `asyncio.timeout`)
        while not self._stopping:
            try:
                if self.session is None:
                    await self._join(None)
                await self._drain_outbox()
                while not self._stopping:
                    task = await self._wired.link.pull_task(
                        self._live_session(), self.poll_wait_s
                    )
                    if self.backoff.failures:
                        log.info("coordinator reachable again")
                    self.backoff.reset()
                    lost_in_a_row = 0
                    if task is not None:
                        await self._handle(task)
            except SessionLost as e:
                self.session = None
                lost_in_a_row += 1
                if lost_in_a_row > 1:
                    delay = self.backoff.next_delay()
                    log.warning("session refused again (%s); joining in %.1f s", e, delay)
                    await asyncio.sleep(delay)
                else:
                    log.info("session lost (%s); joining again", e)
            except (LinkDown, grpc.aio.AioRpcError) as e:
                delay = self.backoff.next_delay()
                why = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
                if "CERTIFICATE_VERIFY_FAILED" in why:
                    why += " -- is --ca the coordinator's ca.pem?"
                # the first failure of a streak is worth a warning, the retries are not
                level = logging.WARNING if self.backoff.failures == 1 else logging.INFO
                log.log(level, "coordinator unreachable (%s); retrying in %.1f s", why, delay)
                await asyncio.sleep(delay)
            except NotRecognised as e:
                # the coordinator's registry lost this device (reset, restored from an old
                # backup) or it was enrolled again elsewhere: only an operator can fix that,
                # but the registry may come back, so keep trying slowly
                delay = self.backoff.next_delay()
                level = logging.WARNING if self.backoff.failures == 1 else logging.INFO
                log.log(level, "the coordinator does not recognise this device's certificate "
                        "(%s): enroll it again with a new token (`fedge enroll`); retrying "
                        "in %.1f s", e, delay)
                await asyncio.sleep(delay)
            except DeviceRevoked:
                raise
            except Exception:  # a long-lived device outlives a bug in one step
                delay = self.backoff.next_delay()
                log.exception("unexpected error; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
        log.info("stopped")
        return EXIT_OK

    async def _join(self, stale_token: str | None) -> None:
        """Join (or re-join after `stale_token` was refused), once even if asked twice."""
        async with self._join_lock:
            if self.session is not None and self.session.token != stale_token:
                return  # someone else joined meanwhile
            ident, link, uploader = self._wired.identity, self._wired.link, self._wired.uploader
            session = await link.join(ident.device_id, self._device_info())
            self.joins += 1
            if (session.device_id, session.node_id) != (ident.device_id, ident.node_id):
                ident.device_id, ident.node_id = session.device_id, session.node_id
                self.folder.save_identity(ident)
            if self.chunk_size is None:
                uploader.chunk_size = session.chunk_size or DEFAULT_CHUNK_SIZE
            else:
                uploader.chunk_size = min(self.chunk_size, session.chunk_size or 1 << 30)
            self.session = session
            self._joined.set()
            log.info("joined as node %d (heartbeat every %.1f s)", session.node_id,
                     session.heartbeat_interval_s)

    def _device_info(self) -> DeviceInfo:
        return DeviceInfo(name=self.name or self._wired.identity.name, codecs=DEVICE_CODECS)

    async def _heartbeat_loop(self) -> None:
        while True:
            session = self.session
            await asyncio.sleep(session.heartbeat_interval_s if session else 1.0)
            session = self.session
            if session is None:
                continue
            state, task_id = self._state
            try:
                reply = await self._wired.link.heartbeat(session, state, task_id)
            except SessionLost:
                log.info("heartbeat: session lost; joining again")
                try:
                    await self._join(session.token)
                except (SessionLost, NotRecognised, LinkDown, grpc.aio.AioRpcError) as e:
                    log.debug("heartbeat: join failed (%s)", e)
                continue
            except (LinkDown, grpc.aio.AioRpcError) as e:
                log.debug("heartbeat failed (%s)", e)
                continue
            except DeviceRevoked as e:
                log.error("the coordinator revoked this device (%s); stopping", e)
                self._revoked = True
                self.stop()
                return
            if reply.heartbeat_interval_s > 0:
                session.heartbeat_interval_s = reply.heartbeat_interval_s
            if reply.task_cancelled and task_id and self._state[1] == task_id:
                log.info("task %s: round closed by the coordinator", task_id)
                self._cancelled.add(task_id)

    # -------------------------------------------------------------- tasks

    async def _handle(self, task: DeliveredTask) -> None:
        env = task.envelope
        started = time.monotonic()
        log.info("task %s: %s, run %d, round %d, %d bytes", env.task_id, env.message_type,
                 env.run_id, env.round, env.total_size)
        self._state = (pb.DEVICE_STATE_WORKING, env.task_id)
        try:
            entry = await asyncio.wrap_future(
                self._worker.submit(self._execute, task, self._live_session().node_id)
            )
        except Exception as e:
            log.error("task %s: dropped (%s)", env.task_id, e)
            self._record(task, 0, time.monotonic() - started, f"dropped: {e}")
            return
        finally:
            self._state = (pb.DEVICE_STATE_IDLE, "")
        if env.task_id in self._cancelled:
            self._cancelled.discard(env.task_id)
            self.folder.remove(entry)
            self._record(task, 0, time.monotonic() - started, "dropped: round closed")
            return
        self._progress[env.task_id] = _Progress(started=started, bytes_down=task.bytes_down)
        await self._upload(entry, resume=False)

    def _execute(self, task: DeliveredTask, node_id: int) -> OutboxEntry:
        """Worker thread: import the app side on first use, then run the task."""
        if self._runner is None:
            from fedge.client.app_runner import AppRunner

            self._runner = AppRunner(self.client_app_ref, self.folder, self.node_config)
        try:
            return self._runner.run_task(task, node_id)
        finally:
            release_memory()

    async def _drain_outbox(self) -> None:
        """Finish results an earlier process (or connection) left half-uploaded."""
        for entry in self.folder.outbox():
            log.info("task %s: resuming its upload from the outbox", entry.task_id)
            await self._upload(entry, resume=True)

    async def _upload(self, entry: OutboxEntry, *, resume: bool) -> None:
        """Push one outbox entry; it leaves the outbox once accepted or refused for good.

        A lost link or session propagates (the entry stays for `_drain_outbox`);
        the task's byte counts carry over to that later attempt.
        """
        progress = self._progress.setdefault(entry.task_id, _Progress(started=time.monotonic()))
        cap = self._live_session().max_result_bytes
        if entry.size > (cap or entry.size):
            log.error("task %s: result of %d bytes is over the coordinator's cap of %d; dropped",
                      entry.task_id, entry.size, cap)
            self._finish(entry, progress, "dropped: over the result cap", ())
            return
        self._state = (pb.DEVICE_STATE_UPLOADING, entry.task_id)

        def sent(n: int) -> None:
            progress.bytes_up += n

        try:
            outcome = await self._wired.uploader.push(entry, resume=resume, on_bytes=sent)
        finally:
            self._state = (pb.DEVICE_STATE_IDLE, "")
        if outcome.status == "dropped":
            log.warning("task %s: result refused for good (%s); dropped", entry.task_id,
                        outcome.reason)
        self._finish(entry, progress, outcome.status, outcome.resumed_at)

    def _finish(
        self, entry: OutboxEntry, progress: _Progress, outcome: str, resumed_at: tuple[int, ...]
    ) -> None:
        self.folder.remove(entry)
        self._progress.pop(entry.task_id, None)
        seconds = time.monotonic() - progress.started
        self.completed.append(TaskStats(entry.task_id, entry.run_id, entry.round,
                                        entry.message_type, progress.bytes_down,
                                        progress.bytes_up, seconds, outcome))
        log.info(
            "task %s: round %d, %d bytes down, %d bytes up%s, %.2f s, %s",
            entry.task_id, entry.round, progress.bytes_down, progress.bytes_up,
            f" (resumed at {', '.join(map(str, resumed_at))})" if resumed_at else "",
            seconds, outcome,
        )

    def _record(self, task: DeliveredTask, bytes_up: int, seconds: float, outcome: str) -> None:
        env = task.envelope
        self.completed.append(TaskStats(env.task_id, env.run_id, env.round, env.message_type,
                                        task.bytes_down, bytes_up, seconds, outcome))


def _result_signer(creds: DeviceCredentials) -> Callable[[OutboxEntry], bytes]:
    """Signs result headers with the enrolled device's key (loaded once, kept in memory)."""
    from fedge.common.signing import sign_result

    key = creds.private_key()

    def sign(entry: OutboxEntry) -> bytes:
        return sign_result(key, run_id=entry.run_id, round=entry.round, task_id=entry.task_id,
                           payload_sha256=entry.sha256)

    return sign
