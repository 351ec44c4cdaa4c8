"""The `fedge.v1.Coordinator` gRPC servicer (grpc.aio): sessions, task streams, result uploads.

docs/coordinator.md is the contract: RPC shapes, the status code of every
refusal, the upload state machine and how transfers resume. In short:

- Every call but `Join` names a session; `identify` is the one function that
  binds a call to a device. With `mtls=True` (the coordinator's TLS mode) the
  device is the one whose client certificate the call presents, checked
  against the registry on every call (`require_device`: UNAUTHENTICATED
  unknown, PERMISSION_DENIED revoked), and the session must be that device's.
  Results must carry the device's signature (`fedge.common.signing`),
  verified after the hash and before anything is decoded. With `mtls=False`
  (`--insecure`) the session alone names the device: no identity.
- `Join` is paced (`admission.py`): a burst waits its turn or is refused with
  RESOURCE_EXHAUSTED, and the device backs off and joins again.
- `PullTask` long-polls the device's queue in the `Fleet` and streams the
  task (a Flower message) as a header and chunks; `task_id` + `offset`
  resume a broken download.
- `PushResult` asks the `ResultIntake` (`result_intake.py`) whether the
  header may start an upload, writes the bytes to memory or
  `<uploads>/<task_id>.part` and records the bytes durably held; the whole
  upload then goes to the intake, which verifies the hash, the signature and
  the reply and counts it (once, and only while the task's round is open).
  The intake decides and raises one `ResultRefused`; this module only maps
  its reason to a status (`STATUS_BY_REFUSAL`).
- `FetchModel` streams a global model snapshot from the model store.

A refusal never changes the global model or stops the server: it is a status
the device acts on, and the coordinator serves on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc
from google.protobuf.json_format import MessageToDict
from grpc.aio import ServicerContext

from fedge.common.chunking import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    STATUS_BY_REASON,
    ChunkError,
    check_chunk_size,
    is_sha256_hex,
    iter_file_chunks,
)
from fedge.common.contract import FLOWER_MESSAGE_FORMAT, MODEL_SNAPSHOT_FORMAT, PROTOCOL_VERSION
from fedge.server.admission import DEFAULT_JOINS_PER_S, DEFAULT_MAX_WAIT_S, JoinPacer
from fedge.server.audit import audit
from fedge.server.device_identity import require_device
from fedge.server.fleet import DeviceEntry, Fleet, TaskPayload
from fedge.server.model_store import ModelStore
from fedge.server.result_intake import RefusalReason, ResultIntake, ResultRefused
from fedge.server.store import DeviceStatus, ResultStatus, Store, TaskState
from fedge.server.uploads import MemoryUpload, Upload, open_upload
from fedge.v1 import coordinator_pb2 as pb
from fedge.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_RESULT_BYTES = 256 << 20
"""256 MiB: the largest result payload accepted unless configured otherwise."""

_TASK_ID = re.compile(r"[0-9a-f]{32}")
_OFFLOAD_BYTES = 64 << 10  # chunks at least this big are hashed and written in a worker thread
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(frozen=True)
class ServiceSettings:
    """Knobs of the service; the defaults suit a LAN of small devices."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    max_wait_s: float = 120.0  # longest long poll: each one an idle device re-opens costs CPU
    flush_every: int = 4 << 20  # make upload progress durable every this many bytes
    memory_result_bytes: int = 16 << 20  # fresh uploads up to this size arrive in memory
    memory_budget_bytes: int = 256 << 20  # ... while all in-memory uploads stay under this
    joins_per_s: float = DEFAULT_JOINS_PER_S  # admission: Joins paced to this rate (0: unpaced)
    join_wait_s: float = DEFAULT_MAX_WAIT_S  # ... a Join waits its turn this long, else refused

    def __post_init__(self) -> None:
        check_chunk_size(self.chunk_size)
        if self.max_result_bytes <= 0:
            raise ValueError("max_result_bytes must be positive")


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """The servicer; `model_version()` names the current global model ("" if none)."""

    def __init__(
        self,
        store: Store,
        fleet: Fleet,
        models: ModelStore,
        uploads_dir: str | os.PathLike[str],
        *,
        settings: ServiceSettings | None = None,
        model_version: Callable[[], str] = lambda: "",
        mtls: bool = False,
        intake: ResultIntake | None = None,
    ) -> None:
        self.store = store
        self.mtls = mtls
        self.fleet = fleet
        self.intake = intake or ResultIntake(store, fleet)
        self.models = models
        self.uploads = Path(uploads_dir)
        self.uploads.mkdir(parents=True, exist_ok=True)
        self.settings = settings or ServiceSettings()
        self.model_version = model_version
        self._uploading: set[str] = set()
        self.joins = JoinPacer(self.settings.joins_per_s, self.settings.join_wait_s)
        self._in_memory = 0  # bytes reserved by uploads assembled in memory

    # ------------------------------------------------------------ identity

    async def identify(self, token: str, context: ServicerContext) -> DeviceEntry:
        """The device this call speaks for; UNAUTHENTICATED if the session is unknown.

        The one place a call is bound to a device. Under mTLS the client
        certificate decides who calls (checked against the registry on every
        call, so a revocation is seen by the next one): UNAUTHENTICATED for a
        certificate no device holds, PERMISSION_DENIED for a revoked device,
        and the session must belong to that device (else UNAUTHENTICATED: Join
        again). Without mTLS (`--insecure`) the session token alone decides.
        """
        device_id = None
        if self.mtls:
            device_id = (await require_device(context, self.store)).id
        entry = self.fleet.authenticate(token)
        if entry is None:
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, "unknown session; Join again")
        if device_id is not None and entry.device_id != device_id:
            audit("device_refused", reason="foreign_session", device=device_id)
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, "unknown session; Join again")
        return entry

    # ------------------------------------------------------------ sessions

    async def Join(self, request: pb.JoinRequest, context: ServicerContext) -> pb.JoinReply:
        wait = self.joins.reserve()  # admission control (server/admission.py)
        if wait is None:
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "coordinator busy admitting devices; join again after a backoff",
            )
        if wait > 0:
            await asyncio.sleep(wait)
        device_id = request.device_id or None
        if self.mtls:  # the certificate names the device; the request's id is ignored
            device_id = (await require_device(context, self.store)).id
        elif device_id is not None and not _DEVICE_ID.fullmatch(device_id):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed device_id")
        if device_id is not None:
            known = self.store.get_device(device_id)
            if known is not None and known.status == DeviceStatus.REVOKED:
                await _abort(context, grpc.StatusCode.PERMISSION_DENIED, "device revoked")
        caps = MessageToDict(request.capabilities, preserving_proto_field_name=True)
        caps["dataset"] = request.data.dataset
        device = self.store.register_device(
            request.device_name[:128] or "device",
            device_id=device_id,
            capabilities=caps,
            num_examples=int(request.data.num_train_examples),
        )
        entry = self.fleet.join(
            device.id,
            device.node_id,
            device.name,
            inference_only=request.capabilities.inference_only,
        )
        log.info("device %s (%s) joined as node %d", device.id, device.name, device.node_id)
        return pb.JoinReply(
            device_id=device.id,
            node_id=device.node_id,
            session_token=entry.token,
            heartbeat_interval_s=self.fleet.heartbeat_interval_s,
            chunk_size=self.settings.chunk_size,
            max_result_bytes=self.settings.max_result_bytes,
            model_version=self.model_version(),
            protocol_version=PROTOCOL_VERSION,
        )

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: ServicerContext
    ) -> pb.HeartbeatReply:
        entry = await self.identify(request.session_token, context)
        cancelled = False
        if request.task_id:
            live = self.fleet.task(request.task_id)
            if live is None or live.device_id != entry.device_id:
                row = self.store.get_task(request.task_id)
                cancelled = row is None or row.state in (TaskState.EXPIRED, TaskState.FAILED)
        return pb.HeartbeatReply(
            heartbeat_interval_s=self.fleet.heartbeat_interval_s,
            task_available=self.fleet.has_task(entry),
            model_version=self.model_version(),
            task_cancelled=cancelled,
        )

    # ------------------------------------------------------------ tasks

    async def PullTask(
        self, request: pb.PullTaskRequest, context: ServicerContext
    ) -> AsyncIterator[pb.TaskChunk]:
        entry = await self.identify(request.session_token, context)
        chunk = self._chunk_size(request.max_chunk_bytes)
        offset = 0
        if request.task_id:
            task = self.fleet.task(request.task_id)
            if task is None or task.device_id != entry.device_id:
                await self._refuse_unknown_task(request.task_id, entry, context)
            if request.offset > task.total_size:
                await _abort(
                    context,
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"offset {request.offset} past the task's {task.total_size} bytes",
                )
            offset = int(request.offset)
        else:
            wait = min(max(request.wait_s, 0.0), self.settings.max_wait_s)
            task = await self.fleet.wait_for_task(entry, wait)
            if task is None:
                return
        if not task.delivered:
            task.delivered = True
            self.store.set_task_state(
                task.task_id, TaskState.DELIVERED, only_from=(TaskState.QUEUED,)
            )
        yield pb.TaskChunk(
            header=pb.TaskEnvelope(
                task_id=task.task_id,
                run_id=task.run_id,
                round=task.round,
                message_type=task.message_type,
                total_size=task.total_size,
                sha256=task.sha256,
                payload_format=FLOWER_MESSAGE_FORMAT,
                offset=offset,
                timeout_s=max(0.0, task.deadline - self.fleet.now()),
                base_model_version=task.base_model_version,
                max_result_bytes=self.settings.max_result_bytes,
                run_config_json=task.run_config_json,
            )
        )
        for off, data in task.iter_chunks(chunk, offset):
            yield pb.TaskChunk(data=pb.Chunk(offset=off, data=data))

    async def _refuse_unknown_task(
        self, task_id: str, entry: DeviceEntry, context: ServicerContext
    ) -> NoReturn:
        row = self.store.get_task(task_id) if _TASK_ID.fullmatch(task_id) else None
        if row is None or row.device_id != entry.device_id:
            await _abort(context, grpc.StatusCode.NOT_FOUND, "unknown task")
        await _abort(
            context, grpc.StatusCode.FAILED_PRECONDITION, f"task is {row.state.value}"
        )

    # ------------------------------------------------------------ results

    async def PushResult(
        self, request_iterator: AsyncIterator[pb.ResultChunk], context: ServicerContext
    ) -> pb.PushResultReply:
        stream = request_iterator.__aiter__()
        first = await anext(stream, None)
        if first is None or first.WhichOneof("part") != "header":
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "stream must start with a header"
            )
        header = first.header
        entry = await self.identify(header.session_token, context)
        task_id = header.task_id
        try:
            live = self.intake.admit(
                entry, task_id, run_id=header.run_id, round=header.round,
                known_format=header.payload_format in ("", FLOWER_MESSAGE_FORMAT),
            )
        except ResultRefused as e:
            await _abort_refused(context, e)
        if live == "duplicate":
            result = self.store.get_result(task_id)
            held = result.total_size if result is not None else 0
            return pb.PushResultReply(accepted=True, offset=held, duplicate=True)
        if task_id in self._uploading:
            await _abort(context, grpc.StatusCode.ABORTED, "another upload of this task is open")
        self._uploading.add(task_id)
        try:
            return await self._receive(task_id, header, stream, entry, live, context)
        finally:
            self._uploading.discard(task_id)

    async def _receive(
        self,
        task_id: str,
        header: pb.ResultHeader,
        stream: AsyncIterator[pb.ResultChunk],
        entry: DeviceEntry,
        task: TaskPayload,
        context: ServicerContext,
    ) -> pb.PushResultReply:
        cap = self.settings.max_result_bytes
        total = int(header.total_size)
        path = self.uploads / f"{task_id}.part"
        try:  # before any row or file exists
            _check_result_header(total, header.sha256, cap)
        except ChunkError as e:
            await _abort_chunk(context, e)
        row = self.store.begin_result(
            task_id, total_size=total, sha256=header.sha256, path=str(path)
        )
        in_memory = (
            total <= self.settings.memory_result_bytes
            and self._in_memory + total <= self.settings.memory_budget_bytes
        )
        try:
            upload = open_upload(
                path, total, header.sha256, max_total=cap, held=row.bytes_received,
                in_memory=in_memory,
            )
        except ChunkError as e:
            await _abort_chunk(context, e)
        reserved = total if isinstance(upload, MemoryUpload) else 0
        self._in_memory += reserved
        try:
            return await self._stream_into(upload, task_id, header, stream, entry, task, context)
        finally:
            self._in_memory -= reserved

    async def _stream_into(
        self,
        upload: Upload,
        task_id: str,
        header: pb.ResultHeader,
        stream: AsyncIterator[pb.ResultChunk],
        entry: DeviceEntry,
        task: TaskPayload,
        context: ServicerContext,
    ) -> pb.PushResultReply:
        durable = upload.offset
        finished = False
        try:
            if header.offset != upload.offset:
                await _abort(
                    context,
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"header offset {header.offset}; {upload.offset} bytes held",
                )
            async for msg in stream:
                if msg.WhichOneof("part") != "data":
                    await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "header twice")
                data = msg.data.data
                try:
                    if len(data) >= _OFFLOAD_BYTES:  # hash (and write) off the event loop
                        await asyncio.to_thread(upload.add, msg.data.offset, data)
                    else:
                        upload.add(msg.data.offset, data)
                except ChunkError as e:
                    await _abort_chunk(context, e)
                if upload.offset - durable >= self.settings.flush_every:
                    held = await asyncio.to_thread(upload.checkpoint)
                    if held is not None:
                        durable = held
                        self.store.record_progress(task_id, durable)
            if not upload.complete:
                await _abort(
                    context,
                    grpc.StatusCode.ABORTED,
                    f"stream ended at {upload.offset} of {upload.total_size} bytes; resume there",
                )
            finished = True
        finally:
            if not finished:  # broken, refused or cut short: keep what arrived, durably
                with _quiet():
                    if upload.offset != durable:
                        self.store.record_progress(task_id, upload.save_partial())
                upload.close()
        try:  # in a worker thread: it hashes and parses
            counted = await asyncio.to_thread(
                self.intake.take, upload, entry, task,
                signature=header.signature, payload_sha256=header.sha256,
                auth_context=context.auth_context() if self.mtls else None,
            )
        except ResultRefused as e:
            await _abort_refused(context, e)
        return pb.PushResultReply(
            accepted=True, offset=upload.total_size, duplicate=counted == "duplicate"
        )

    async def GetUploadOffset(
        self, request: pb.GetUploadOffsetRequest, context: ServicerContext
    ) -> pb.GetUploadOffsetReply:
        entry = await self.identify(request.session_token, context)
        task_id = request.task_id
        row = self.store.get_task(task_id) if _TASK_ID.fullmatch(task_id) else None
        if row is None or row.device_id != entry.device_id:
            await _abort(context, grpc.StatusCode.NOT_FOUND, "unknown task")
        result = self.store.get_result(task_id)
        if result is not None and result.status == ResultStatus.COMPLETE:
            return pb.GetUploadOffsetReply(
                offset=result.total_size,
                total_size=result.total_size,
                sha256=result.sha256,
                complete=True,
            )
        if result is not None and result.status == ResultStatus.REJECTED:
            await _abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, f"result rejected: {result.reason}"
            )
        if self.fleet.task(task_id) is None:
            await _abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, "round closed or task expired"
            )
        if result is None:
            return pb.GetUploadOffsetReply()
        return pb.GetUploadOffsetReply(
            offset=result.bytes_received, total_size=result.total_size, sha256=result.sha256
        )

    # ------------------------------------------------------------ models

    async def FetchModel(
        self, request: pb.FetchModelRequest, context: ServicerContext
    ) -> AsyncIterator[pb.ModelChunk]:
        await self.identify(request.session_token, context)
        version = request.version or self.model_version()
        if not version:
            await _abort(context, grpc.StatusCode.NOT_FOUND, "no global model yet")
        if not is_sha256_hex(version):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed model version")
        info = self.store.get_model(version)
        run_id, rnd = (info.run_id or 0, info.round) if info is not None else (0, 0)
        if request.if_none_match and request.if_none_match == version:
            yield pb.ModelChunk(
                header=pb.ModelHeader(
                    version=version, sha256=version, run_id=run_id, round=rnd,
                    not_modified=True, payload_format=MODEL_SNAPSHOT_FORMAT,
                )
            )
            return
        path = self.models.path(version)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            await _abort(context, grpc.StatusCode.NOT_FOUND, "unknown model version")
        if request.offset > size:
            await _abort(
                context, grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} past {size} bytes"
            )
        yield pb.ModelChunk(
            header=pb.ModelHeader(
                version=version, total_size=size, sha256=version, run_id=run_id, round=rnd,
                offset=request.offset, payload_format=MODEL_SNAPSHOT_FORMAT,
            )
        )
        chunk = self._chunk_size(request.max_chunk_bytes)
        for off, data in iter_file_chunks(path, chunk, start=int(request.offset)):
            yield pb.ModelChunk(data=pb.Chunk(offset=off, data=data))

    # ------------------------------------------------------------ plumbing

    def _chunk_size(self, asked: int) -> int:
        return min(asked or self.settings.chunk_size, self.settings.chunk_size, MAX_CHUNK_SIZE)

    async def flush_last_seen(self, interval_s: float = 5.0) -> None:
        """Forever: write devices' `last_seen` to the store in one commit per interval."""
        while True:
            await asyncio.sleep(interval_s)
            touched = self.fleet.take_touched()
            if touched:
                with _quiet():
                    self.store.touch_devices(touched)


STATUS_BY_REFUSAL: dict[RefusalReason, grpc.StatusCode] = {
    "unknown_task": grpc.StatusCode.NOT_FOUND,
    "wrong_task": grpc.StatusCode.INVALID_ARGUMENT,
    "rejected_before": grpc.StatusCode.FAILED_PRECONDITION,
    "round_closed": grpc.StatusCode.FAILED_PRECONDITION,
    "hash_mismatch": grpc.StatusCode.DATA_LOSS,
    "incomplete": grpc.StatusCode.ABORTED,
    "bad_signature": grpc.StatusCode.INVALID_ARGUMENT,
    "invalid_reply": grpc.StatusCode.INVALID_ARGUMENT,
    "device_unknown": grpc.StatusCode.UNAUTHENTICATED,
    "device_revoked": grpc.StatusCode.PERMISSION_DENIED,
}
"""The gRPC status each result refusal answers with (docs/coordinator.md says why)."""


def _check_result_header(total_size: int, sha256: str, cap: int) -> None:
    if not is_sha256_hex(sha256):
        raise ChunkError("bad_header", "sha256 must be 64 lowercase hex digits")
    if total_size > cap:
        raise ChunkError("over_cap", f"total size {total_size} > cap {cap}")


async def _abort(context: ServicerContext, code: grpc.StatusCode, detail: str) -> NoReturn:
    await context.abort(code, detail)
    raise AssertionError("unreachable")  # context.abort raises


async def _abort_chunk(context: ServicerContext, err: ChunkError) -> NoReturn:
    await _abort(context, grpc.StatusCode[STATUS_BY_REASON[err.reason]], str(err))


async def _abort_refused(context: ServicerContext, err: ResultRefused) -> NoReturn:
    await _abort(context, STATUS_BY_REFUSAL[err.reason], err.detail)


class _quiet:
    """Log and swallow errors in cleanup paths (the primary error matters more)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        if exc is not None and isinstance(exc, Exception):
            log.warning("cleanup failed: %s", exc)
            return True
        return False
