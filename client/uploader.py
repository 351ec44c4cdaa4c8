"""Push one result from the outbox, resuming at the coordinator's offset.

The payload is read from its outbox file one chunk at a time
(`iter_file_chunks`), so an upload never holds a second copy of the model.
What each refusal means is docs/coordinator.md's status table:

- ABORTED / OUT_OF_RANGE (or a clean end without `accepted`): ask
  `GetUploadOffset` and resume there (from 0 if the held bytes belong to a
  different payload);
- DATA_LOSS: the coordinator discarded a corrupt payload, send again from 0;
- FAILED_PRECONDITION / NOT_FOUND / INVALID_ARGUMENT / RESOURCE_EXHAUSTED:
  the result can never be accepted: drop it;
- UNAVAILABLE and friends, UNAUTHENTICATED, PERMISSION_DENIED: raised as
  `LinkDown` / `SessionLost` / `DeviceRevoked`; the entry stays in the outbox
  and the runtime resumes it after reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import grpc

from fedge.client.device_state import OutboxEntry
from fedge.client.edge_session import LinkDown, translate
from fedge.common.chunking import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, iter_file_chunks
from fedge.common.contract import FLOWER_MESSAGE_FORMAT
from fedge.v1 import coordinator_pb2 as pb
from fedge.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_DROP = {
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_RESUME = {grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE}
_UNKNOWN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}
MAX_DATA_LOSS = 2
"""Whole re-sends after DATA_LOSS before a result is given up (the file itself is verified)."""
MAX_STUCK_RESUMES = 4
"""Resumes in a row that gain no bytes (a probe counts as one) before backing off."""


@dataclass
class UploadOutcome:
    """How an upload ended; `bytes_sent` counts every data byte written, resends included."""

    status: Literal["accepted", "duplicate", "dropped"]
    bytes_sent: int = 0
    reason: str = ""
    resumed_at: tuple[int, ...] = ()


class _Dropped(Exception):
    pass


class Uploader:
    """Uploads outbox entries over `stub`; `token()` gives the current session token.

    `signer` (an enrolled device) returns the signature for an entry's header:
    ECDSA with the device key over run, round, task id and payload SHA-256
    (`fedge.common.signing.sign_result`); without it headers go unsigned
    (`--insecure` coordinators do not check).
    """

    def __init__(
        self,
        stub: pb_grpc.CoordinatorStub,
        token: Callable[[], str],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        call_timeout_s: float = 20.0,
        stall_timeout_s: float = 60.0,
        reply_timeout_s: float = 300.0,
        signer: Callable[[OutboxEntry], bytes] | None = None,
    ) -> None:
        self.stub = stub
        self.signer = signer
        self._signatures: dict[str, bytes] = {}
        self.token = token
        self.chunk_size = min(int(chunk_size), MAX_CHUNK_SIZE)
        self.call_timeout_s = call_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.reply_timeout_s = reply_timeout_s

    async def push(
        self, entry: OutboxEntry, *, resume: bool, on_bytes: Callable[[int], None] | None = None
    ) -> UploadOutcome:
        """Upload `entry` until the coordinator accepts it or refuses it for good.

        `resume=True` (an entry left by an earlier process or connection) asks
        the coordinator what it holds first; a fresh result starts at 0.
        """
        out = UploadOutcome(status="accepted")
        sent = [0]

        def count(n: int) -> None:
            sent[0] += n
            if on_bytes:
                on_bytes(n)

        try:
            offset = await self._held(entry) if resume else 0
            if offset is None:
                return UploadOutcome("accepted", 0, "already complete")
            data_loss = stuck = 0
            probe = False
            while True:
                if offset:
                    out.resumed_at += (offset,)
                try:
                    reply = await self._stream(entry, offset, count, probe=probe)
                except grpc.aio.AioRpcError as e:
                    code = e.code()
                    probe = False
                    if code in _DROP:
                        raise _Dropped(f"{code.name}: {e.details()}") from None
                    if code == grpc.StatusCode.DATA_LOSS:
                        data_loss += 1
                        if data_loss > MAX_DATA_LOSS:
                            raise _Dropped(f"DATA_LOSS {data_loss} times: {e.details()}") from None
                        log.warning("task %s: coordinator saw a hash mismatch; sending again",
                                    entry.task_id)
                        offset = 0
                        continue
                    if code in _UNKNOWN:
                        # a write raced the coordinator ending the stream and gRPC lost
                        # its status: the next stream sends only the header to learn it
                        probe = True
                    elif code not in _RESUME:
                        raise translate(e) from e
                    log.info("task %s: upload interrupted (%s); asking for the offset",
                             entry.task_id, code.name)
                else:
                    if reply.accepted:
                        out.status = "duplicate" if reply.duplicate else "accepted"
                        out.bytes_sent = sent[0]
                        return out
                    if not probe:
                        log.info("task %s: upload ended unaccepted at %d; asking for the offset",
                                 entry.task_id, reply.offset)
                    probe = False
                held = await self._held(entry)
                if held is None:
                    out.bytes_sent = sent[0]
                    return out
                stuck = stuck + 1 if held <= offset else 0
                if stuck >= MAX_STUCK_RESUMES:
                    raise LinkDown(f"upload of {entry.task_id} makes no progress at {held}")
                if stuck:  # e.g. the coordinator still holds a stream of ours that broke
                    await asyncio.sleep(0.25 * stuck)
                offset = held
        except _Dropped as d:
            return UploadOutcome("dropped", sent[0], str(d), out.resumed_at)

    async def _held(self, entry: OutboxEntry) -> int | None:
        """Bytes of this payload the coordinator holds (None: already accepted)."""
        request = pb.GetUploadOffsetRequest(session_token=self.token(), task_id=entry.task_id)
        try:
            reply = await self.stub.GetUploadOffset(request, timeout=self.call_timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() in _DROP:
                raise _Dropped(f"{e.code().name}: {e.details()}") from None
            raise translate(e) from e
        if reply.complete:
            return None
        if reply.sha256 == entry.sha256 and reply.total_size == entry.size:
            return min(int(reply.offset), entry.size)
        return 0

    async def _stream(
        self, entry: OutboxEntry, offset: int, count: Callable[[int], None], *, probe: bool
    ) -> pb.PushResultReply:
        """One PushResult stream from `offset`; AioRpcError for a refusal.

        A `probe` sends the header alone: the coordinator answers with its real
        verdict (a refusal, a duplicate, or ABORTED for "go on").
        """
        header = pb.ResultHeader(
            session_token=self.token(),
            task_id=entry.task_id,
            run_id=entry.run_id,
            round=entry.round,
            total_size=entry.size,
            sha256=entry.sha256,
            offset=offset,
            payload_format=FLOWER_MESSAGE_FORMAT,
            signature=self._signature(entry),
        )
        call = self.stub.PushResult()
        try:
            if await self._write(call, pb.ResultChunk(header=header)) and not probe:
                chunks = iter_file_chunks(entry.path, self.chunk_size, start=offset)
                try:
                    for at, data in chunks:
                        chunk = pb.ResultChunk(data=pb.Chunk(offset=at, data=data))
                        if not await self._write(call, chunk):
                            break
                        count(len(data))
                finally:
                    chunks.close()
            if not call.done():
                with contextlib.suppress(asyncio.InvalidStateError):
                    await call.done_writing()
            try:
                async with asyncio.timeout(self.reply_timeout_s):
                    return await call
            except TimeoutError:
                raise LinkDown(f"no answer to the upload of {entry.task_id}") from None
        finally:
            if not call.done():
                call.cancel()

    def _signature(self, entry: OutboxEntry) -> bytes:
        if self.signer is None:
            return b""
        sig = self._signatures.get(entry.task_id)
        if sig is None:  # one signature per result, however many streams its upload takes
            if len(self._signatures) >= 64:
                self._signatures.clear()
            sig = self._signatures[entry.task_id] = self.signer(entry)
        return sig

    async def _write(self, call: grpc.aio.StreamUnaryCall, msg: pb.ResultChunk) -> bool:
        """Write one message; False once the call has ended (its status tells why)."""
        if call.done():
            return False
        try:
            async with asyncio.timeout(self.stall_timeout_s):
                await call.write(msg)
        except TimeoutError:
            call.cancel()
            raise LinkDown(f"upload stalled for {self.stall_timeout_s:.0f} s") from None
        except asyncio.InvalidStateError:
            return False  # the coordinator answered or refused early
        return True
