"""A stand-in coordinator, in memory: kept for `bench/edge_footprint.py`, not used by tests.

The device is tested against the REAL coordinator service
(tests/test_edge_runtime.py, tests/test_edge_real_coordinator.py, through
`coordinator_harness` and, for link faults at a chosen byte,
`coordinator_proxy`). The footprint bench falls back to this stand-in where
it cannot start a coordinator process. Where it answers, it answers as
`server/coordinator_service.py` does (docs/coordinator.md): a download offset
past the end is OUT_OF_RANGE, a delivered task without an accepted result is
offered again to a device that pulls, a closed task is refused
FAILED_PRECONDITION by PullTask, PushResult and GetUploadOffset alike. It has
no SQLite, no Grid, no mTLS and no signatures.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from fedge.common.chunking import STATUS_BY_REASON, Assembler, ChunkError, sha256_hex
from fedge.common.contract import FLOWER_MESSAGE_FORMAT, PROTOCOL_VERSION
from fedge.common.flower_compat import message_from_bytes
from fedge.v1 import coordinator_pb2 as pb
from fedge.v1 import coordinator_pb2_grpc as pb_grpc


@dataclass
class FakeTask:
    envelope: pb.TaskEnvelope
    payload: bytes
    device_id: str
    state: str = "queued"  # queued -> delivered -> done | closed


@dataclass
class Upload:
    asm: Assembler


class FakeCoordinator(pb_grpc.CoordinatorServicer):
    """In-memory coordinator; `await start()` serves it and returns the port."""

    def __init__(
        self,
        *,
        heartbeat_interval_s: float = 0.5,
        chunk_size: int = 64 << 10,
        max_result_bytes: int = 64 << 20,
        max_wait_s: float = 1.0,
    ) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.chunk_size = chunk_size
        self.max_result_bytes = max_result_bytes
        self.max_wait_s = max_wait_s
        self.devices: dict[str, int] = {}  # device id -> node id (kept for good)
        self.sessions: dict[str, str] = {}  # token -> device id
        self.queues: dict[str, deque[str]] = defaultdict(deque)
        self.tasks: dict[str, FakeTask] = {}
        self.uploads: dict[str, Upload] = {}
        self.results: dict[str, bytes] = {}
        self.join_requests: list[pb.JoinRequest] = []
        self.heartbeats: list[pb.HeartbeatRequest] = []
        self.download_offsets: list[tuple[str, int]] = []
        self.server: grpc.aio.Server | None = None
        self.port = 0

    # ---------------------------------------------------------------- control

    async def start(
        self, *, port: int = 0, credentials: grpc.ServerCredentials | None = None
    ) -> int:
        self.server = grpc.aio.server()
        pb_grpc.add_CoordinatorServicer_to_server(self, self.server)
        address = f"127.0.0.1:{port}"
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        await self.server.start()
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add_task(
        self,
        device_id: str,
        payload: bytes,
        *,
        run_id: int,
        round_: int,
        message_type: str = "train",
        run_config_json: str = "",
        timeout_s: float = 600.0,
    ) -> str:
        task_id = f"task-{uuid.uuid4().hex[:12]}"
        env = pb.TaskEnvelope(
            task_id=task_id,
            run_id=run_id,
            round=round_,
            message_type=message_type,
            total_size=len(payload),
            sha256=sha256_hex(payload),
            payload_format=FLOWER_MESSAGE_FORMAT,
            timeout_s=timeout_s,
            max_result_bytes=self.max_result_bytes,
            run_config_json=run_config_json,
        )
        self.tasks[task_id] = FakeTask(env, payload, device_id)
        self.queues[device_id].append(task_id)
        return task_id

    def close_task(self, task_id: str) -> None:
        """The task's round closed: a late result is refused (FAILED_PRECONDITION)."""
        self.tasks[task_id].state = "closed"

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not reached in time")
            await asyncio.sleep(0.02)

    # --------------------------------------------------------------- helpers

    async def _auth(self, token: str, context: grpc.aio.ServicerContext) -> str:
        device = self.sessions.get(token)
        if device is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown session; join again")
        return device

    async def _task_of(
        self, task_id: str, device: str, context: grpc.aio.ServicerContext
    ) -> FakeTask:
        task = self.tasks.get(task_id)
        if task is None or task.device_id != device:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no task {task_id!r} for you")
        return task

    def _next(self, device: str) -> FakeTask | None:
        """The device's oldest task without an accepted result, delivered or not (a device
        pulls only when it holds no task: one delivered before was lost)."""
        queue = self.queues[device]
        while queue and self.tasks[queue[0]].state in ("done", "closed"):
            queue.popleft()
        for task_id in queue:
            if self.tasks[task_id].state in ("queued", "delivered"):
                return self.tasks[task_id]
        return None

    # ------------------------------------------------------------------- RPCs

    async def Join(self, request, context):
        self.join_requests.append(request)
        device = request.device_id or uuid.uuid4().hex
        node_id = self.devices.setdefault(device, random.randrange(2, 1 << 63))
        token = secrets.token_hex(16)
        self.sessions[token] = device
        return pb.JoinReply(
            device_id=device,
            node_id=node_id,
            session_token=token,
            heartbeat_interval_s=self.heartbeat_interval_s,
            chunk_size=self.chunk_size,
            max_result_bytes=self.max_result_bytes,
            protocol_version=PROTOCOL_VERSION,
        )

    async def Heartbeat(self, request, context):
        device = await self._auth(request.session_token, context)
        self.heartbeats.append(request)
        task = self.tasks.get(request.task_id)
        return pb.HeartbeatReply(
            heartbeat_interval_s=self.heartbeat_interval_s,
            task_available=self._next(device) is not None,
            task_cancelled=bool(task and task.state == "closed"),
        )

    async def PullTask(self, request, context):
        device = await self._auth(request.session_token, context)
        chunk = min(request.max_chunk_bytes or self.chunk_size, self.chunk_size)
        if request.task_id:
            task = await self._task_of(request.task_id, device, context)
            if task.state in ("closed", "done"):
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"task is {task.state}")
            offset = int(request.offset)
            if offset > len(task.payload):
                await context.abort(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"offset {offset} past the task's {len(task.payload)} bytes",
                )
        else:
            deadline = time.monotonic() + min(request.wait_s, self.max_wait_s)
            while self._next(device) is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            task = self._next(device)
            if task is None:
                return
            task.state = "delivered"
            offset = 0
        self.download_offsets.append((task.envelope.task_id, offset))
        header = pb.TaskEnvelope()
        header.CopyFrom(task.envelope)
        header.offset = offset
        yield pb.TaskChunk(header=header)
        for at in range(offset, len(task.payload), chunk):
            yield pb.TaskChunk(data=pb.Chunk(offset=at, data=task.payload[at : at + chunk]))

    async def PushResult(self, request_iterator, context):
        stream = request_iterator.__aiter__()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty stream")
        if first.WhichOneof("part") != "header":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stream must start with a header")
        h = first.header
        device = await self._auth(h.session_token, context)
        task = await self._task_of(h.task_id, device, context)
        if (h.run_id, h.round) != (task.envelope.run_id, task.envelope.round):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "run or round differ")
        if h.task_id in self.results:
            size = len(self.results[h.task_id])
            return pb.PushResultReply(accepted=True, offset=size, duplicate=True)
        if task.state == "closed":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "round closed or task expired"
            )
        up = self.uploads.get(h.task_id)
        if up is None or (up.asm.total_size, up.asm.sha256) != (h.total_size, h.sha256):
            try:
                asm = Assembler(h.total_size, h.sha256, max_total=self.max_result_bytes)
            except ChunkError as e:
                await context.abort(grpc.StatusCode[STATUS_BY_REASON[e.reason]], str(e))
            up = self.uploads[h.task_id] = Upload(asm)
        if h.offset != up.asm.offset:
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE, f"offset {h.offset}, held {up.asm.offset}"
            )
        async for msg in stream:
            if msg.WhichOneof("part") != "data":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "header twice")
            try:
                up.asm.add(msg.data.offset, msg.data.data)
            except ChunkError as e:
                await context.abort(grpc.StatusCode[STATUS_BY_REASON[e.reason]], str(e))
        if not up.asm.complete:
            await context.abort(grpc.StatusCode.ABORTED, f"{up.asm.offset} of {h.total_size}")
        try:
            payload = up.asm.finish()
        except ChunkError as e:
            del self.uploads[h.task_id]
            await context.abort(grpc.StatusCode.DATA_LOSS, str(e))
        try:
            message_from_bytes(payload)
        except Exception as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a Flower message: {e}")
        self.results[h.task_id] = payload
        task.state = "done"
        return pb.PushResultReply(accepted=True, offset=len(payload))

    async def GetUploadOffset(self, request, context):
        device = await self._auth(request.session_token, context)
        await self._task_of(request.task_id, device, context)
        if request.task_id in self.results:
            result = self.results[request.task_id]
            return pb.GetUploadOffsetReply(
                offset=len(result), total_size=len(result), sha256=sha256_hex(result),
                complete=True,
            )
        if self.tasks[request.task_id].state == "closed":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "round closed or task expired"
            )
        up = self.uploads.get(request.task_id)
        if up is None:
            return pb.GetUploadOffsetReply()
        return pb.GetUploadOffsetReply(
            offset=up.asm.offset, total_size=up.asm.total_size, sha256=up.asm.sha256
        )
