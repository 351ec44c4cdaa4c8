"""Test support: byte-exact link faults between a device and the REAL coordinator service.

`LinkProxy` serves `fedge.v1.Coordinator` on 127.0.0.1 and forwards every
call to a real `CoordinatorService` (`coordinator_harness.ServiceHarness`).
Every answer a device sees is the real service's; the proxy only plays the
link: it can cut a download after a chosen byte, stall a download or an
upload there (the stream stays open and silent), end an upload's stream
cleanly after a chosen byte, cut an upload after a chosen byte while the
coordinator's end of that stream stays open (a half-open TCP connection the
coordinator has not noticed yet), flip a bit of an upload, and corrupt a
resume offset in transit. It records what went through, and the status
the real service answered, so a test can assert on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from fedge.v1 import coordinator_pb2 as pb
from fedge.v1 import coordinator_pb2_grpc as pb_grpc


@dataclass
class _HeldUpload:
    """An upload cut toward the device whose coordinator-side stream is still open."""

    call: grpc.aio.StreamUnaryCall
    bytes_forwarded: int


@dataclass
class Recorded:
    """What went through the proxy, in order."""

    pulls: list[tuple[str, int]] = field(default_factory=list)  # (task id asked, offset asked)
    headers: list[tuple[str, int]] = field(default_factory=list)  # task envelopes delivered
    pushes: list[tuple[str, int]] = field(default_factory=list)  # result headers (task, offset)
    # (rpc, task id, status name) of every call the real service answered with an error
    refusals: list[tuple[str, str, str]] = field(default_factory=list)
    heartbeats: list[pb.HeartbeatReply] = field(default_factory=list)
    heartbeat_states: list[int] = field(default_factory=list)  # the device's reported state
    uploaded: dict[str, int] = field(default_factory=dict)  # data bytes the service got, by task


class LinkProxy(pb_grpc.CoordinatorServicer):
    """A faulty link in front of the real coordinator at `upstream` (`await start()`)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.seen = Recorded()
        # one-shot faults, by task id
        self.cut_download_after: dict[str, int] = {}
        self.on_download_cut: dict[str, Callable[[], None]] = {}
        self.cut_upload_after: dict[str, int] = {}
        self.resume_offset_shift: dict[str, int] = {}
        self.stall_download_after: dict[str, int] = {}
        self.stall_upload_after: dict[str, int] = {}
        self.end_upload_after: dict[str, int] = {}  # the stream ends cleanly, short
        self.corrupt_uploads: dict[str, int] = {}  # streams of this task with one bit flipped
        self.held: dict[str, _HeldUpload] = {}
        self.stalled: set[str] = set()
        self.changed = asyncio.Event()  # set whenever something is recorded
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.CoordinatorStub | None = None
        self._server: grpc.aio.Server | None = None
        self.target = ""

    async def start(self) -> str:
        self._channel = grpc.aio.insecure_channel(self.upstream)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._server = grpc.aio.server()
        pb_grpc.add_CoordinatorServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.target = f"127.0.0.1:{port}"
        return self.target

    async def stop(self) -> None:
        for held in self.held.values():
            held.call.cancel()
        if self._server is not None:
            await self._server.stop(None)
        if self._channel is not None:
            await self._channel.close()

    async def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        """Until `predicate()` holds; re-checked on every recorded event (hang guard: 60 s)."""

        async def until() -> None:
            while not predicate():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.5)

        try:
            await asyncio.wait_for(until(), 60)
        except TimeoutError:
            raise AssertionError(f"never happened: {what}; seen {self.seen}") from None

    def _note(self) -> None:
        self.changed.set()

    async def _refused(
        self, rpc: str, task_id: str, err: grpc.aio.AioRpcError, context: grpc.aio.ServicerContext
    ) -> None:
        """Pass the real service's refusal on to the device, as it was."""
        self.seen.refusals.append((rpc, task_id, err.code().name))
        self._note()
        await context.abort(err.code(), err.details() or "")

    # ------------------------------------------------------------ unary calls

    async def Join(self, request, context):
        try:
            return await self._stub.Join(request)
        except grpc.aio.AioRpcError as e:
            await self._refused("Join", "", e, context)

    async def Heartbeat(self, request, context):
        try:
            reply = await self._stub.Heartbeat(request)
        except grpc.aio.AioRpcError as e:
            await self._refused("Heartbeat", request.task_id, e, context)
        self.seen.heartbeats.append(reply)
        self.seen.heartbeat_states.append(int(request.state))
        self._note()
        return reply

    async def GetUploadOffset(self, request, context):
        try:
            reply = await self._stub.GetUploadOffset(request)
        except grpc.aio.AioRpcError as e:
            await self._refused("GetUploadOffset", request.task_id, e, context)
        held = self.held.pop(request.task_id, None)
        if held is not None:
            # The coordinator notices the dead stream only now, after answering this
            # call: the device's next header names a stale offset.
            await held.call.done_writing()
            try:
                await held.call
            except grpc.aio.AioRpcError as e:
                self.seen.refusals.append(("PushResult", request.task_id, e.code().name))
            # ... and once it has recorded the bytes it kept (the same step that closes
            # that upload), the stale answer goes back to the device
            while (await self._stub.GetUploadOffset(request)).offset < held.bytes_forwarded:
                await asyncio.sleep(0.01)
            self._note()
        return reply

    async def FetchModel(self, request, context):
        async for chunk in self._stub.FetchModel(request):
            yield chunk

    # ------------------------------------------------------------ task download

    async def PullTask(self, request, context):
        forwarded = pb.PullTaskRequest()
        forwarded.CopyFrom(request)
        forwarded.offset += self.resume_offset_shift.pop(request.task_id, 0)
        self.seen.pulls.append((request.task_id, int(forwarded.offset)))
        self._note()
        call = self._stub.PullTask(forwarded)
        task_id, cut, stall = "", None, None
        try:
            async for chunk in call:
                if chunk.WhichOneof("part") == "header":
                    task_id = chunk.header.task_id
                    self.seen.headers.append((task_id, int(chunk.header.offset)))
                    self._note()
                    cut = self.cut_download_after.pop(task_id, None)
                    stall = self.stall_download_after.pop(task_id, None)
                    yield chunk
                    continue
                if stall is not None and chunk.data.offset >= stall:
                    self.stalled.add(task_id)
                    self._note()
                    await asyncio.Event().wait()  # silent until the device gives up
                if cut is not None and chunk.data.offset >= cut:
                    call.cancel()
                    hook = self.on_download_cut.pop(task_id, None)
                    if hook is not None:
                        hook()
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "link dropped (test)")
                yield chunk
        except grpc.aio.AioRpcError as e:
            await self._refused("PullTask", request.task_id, e, context)
        finally:
            call.cancel()  # the device went away (a stall it gave up on): so does the link

    # ------------------------------------------------------------ result upload

    async def PushResult(self, request_iterator: AsyncIterator[pb.ResultChunk], context):
        call = self._stub.PushResult()
        stream = request_iterator.__aiter__()
        first = await anext(stream, None)
        if first is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty stream")
        task_id = first.header.task_id
        self.seen.pushes.append((task_id, int(first.header.offset)))
        self._note()
        cut = self.cut_upload_after.pop(task_id, None)
        stall = self.stall_upload_after.pop(task_id, None)
        end = self.end_upload_after.pop(task_id, None)
        corrupt = self.corrupt_uploads.get(task_id, 0) > 0
        if corrupt:
            self.corrupt_uploads[task_id] -= 1
        forwarded = 0

        async def forward() -> None:
            nonlocal forwarded, corrupt
            with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
                await call.write(first)
                async for msg in stream:
                    if corrupt and msg.data.data:
                        flipped = bytearray(msg.data.data)
                        flipped[0] ^= 0x01
                        msg = pb.ResultChunk(data=pb.Chunk(offset=msg.data.offset,
                                                           data=bytes(flipped)))
                        corrupt = False
                    await call.write(msg)
                    forwarded += len(msg.data.data)
                    self.seen.uploaded[task_id] = (
                        self.seen.uploaded.get(task_id, 0) + len(msg.data.data)
                    )
                    if end is not None and forwarded >= end:
                        break  # the coordinator sees a stream that ends short
                    if cut is not None and forwarded >= cut:
                        return  # the link breaks here; the coordinator's stream stays open
                    if stall is not None and forwarded >= stall:
                        self.stalled.add(task_id)
                        self._note()
                        await asyncio.Event().wait()  # reads no more: the device's writes block
                await call.done_writing()

        writer = asyncio.create_task(forward())
        if cut is not None:
            await writer
            if forwarded >= cut:
                self.held[task_id] = _HeldUpload(call, forwarded)
                self._note()
                await context.abort(grpc.StatusCode.UNAVAILABLE, "link dropped (test)")
        try:
            reply = await call
        except grpc.aio.AioRpcError as e:
            writer.cancel()
            await self._refused("PushResult", task_id, e, context)
        except asyncio.CancelledError:  # the device gave up on this stream: the link dies
            writer.cancel()
            call.cancel()
            raise
        await writer
        return reply
