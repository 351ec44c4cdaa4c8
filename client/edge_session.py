"""A device's calls to the coordinator: channel, Join, Heartbeat and task download.

Everything the device asks the coordinator (except pushing results, see
`uploader.py`) goes through `CoordinatorLink`, which turns gRPC statuses into
the few outcomes the runtime acts on (docs/coordinator.md, "Status codes"):

- `SessionLost` (UNAUTHENTICATED): Join again with the same device id;
- `NotRecognised` (UNAUTHENTICATED on Join itself): the coordinator knows no
  device with this certificate; keep retrying, and tell the operator to
  enroll the device again;
- `DeviceRevoked` (PERMISSION_DENIED): stop;
- `LinkDown` (UNAVAILABLE, deadline, a stalled stream ...): back off, reconnect.

Downloads resume: a task stream that breaks keeps its `Assembler`, and the
next `pull_task` asks for the same task from the bytes already held.

Only gRPC, protobuf and the generated `fedge.v1` code are imported here, so
a device waiting for its first task stays small (no torch, no Flower).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import platform
import sys
from dataclasses import dataclass, field

import grpc

from fedge.common.chunking import MAX_CHUNK_SIZE, Assembler, ChunkError
from fedge.common.contract import FLOWER_MESSAGE_FORMAT, PROTOCOL_VERSION
from fedge.v1 import coordinator_pb2 as pb
from fedge.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_TASK_BYTES = 512 << 20
"""Largest task payload a device accepts: far above fedge's models, bounded for a Pi."""

_LINK_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNIMPLEMENTED,
}


class SessionLost(Exception):
    """The coordinator does not know our session (it restarted): Join again."""


class NotRecognised(Exception):
    """Join refused (UNAUTHENTICATED): no enrolled device holds this certificate."""


class DeviceRevoked(Exception):
    """The coordinator refuses this device for good (PERMISSION_DENIED)."""


class LinkDown(Exception):
    """The coordinator cannot be reached or a stream stalled: back off and retry."""


def translate(err: grpc.aio.AioRpcError) -> Exception:
    """The runtime-level exception for a link-level status, else `err` itself."""
    code = err.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return SessionLost(err.details() or "unauthenticated")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return DeviceRevoked(err.details() or "permission denied")
    if code in _LINK_CODES:
        return LinkDown(f"{code.name}: {err.details() or ''}".rstrip(": "))
    return err


def parse_target(address: str) -> str:
    """Check a `HOST:PORT` (IPv6 as `[addr]:port`) and return it as a gRPC target."""
    address = address.strip()
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT (e.g. 192.168.1.10:9092)")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{address!r}: unbalanced brackets around the IPv6 address")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{address!r}: {host[1:-1]!r} is not an IPv6 address") from None
    elif ":" in host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError(f"{address!r} is not HOST:PORT (write IPv6 as [addr]:port)")
    return f"{host}:{int(port)}"


def open_channel(
    target: str,
    *,
    ca_pem: bytes | None,
    insecure: bool,
    reconnect_backoff: tuple[float, float] = (0.5, 30.0),
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    """A TLS channel trusting `ca_pem` (system roots if None); plaintext only if `insecure`.

    `credentials` (an enrolled device's mutual-TLS credentials,
    `DeviceCredentials.channel_credentials()`) replace `ca_pem` when given.

    gRPC's own reconnect backoff is bounded like the runtime's, so a channel
    does not sit in a long internal backoff after the coordinator is back.
    """
    options = [
        # long polls sit idle: a ping every minute notices a dead link (fedge's
        # coordinator allows pings every 5 s and mirrors these settings)
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.initial_reconnect_backoff_ms", int(reconnect_backoff[0] * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(reconnect_backoff[0] * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(reconnect_backoff[1] * 1000)),
    ]
    if insecure:
        return grpc.aio.insecure_channel(target, options=options)
    creds = credentials or grpc.ssl_channel_credentials(root_certificates=ca_pem)
    return grpc.aio.secure_channel(target, creds, options=options)


@dataclass
class Session:
    """What Join answered: identity and the session's parameters."""

    token: str
    device_id: str
    node_id: int
    heartbeat_interval_s: float
    chunk_size: int
    max_result_bytes: int
    model_version: str = ""


@dataclass
class DeliveredTask:
    """A downloaded, hash-verified task: its envelope and payload (a Flower Message)."""

    envelope: pb.TaskEnvelope
    payload: bytes | bytearray
    bytes_down: int


class _BufferAssembler(Assembler):
    """An `Assembler` writing into one preallocated buffer: a downloaded model is held
    once, instead of as chunks plus their joined copy."""

    def __init__(self, total_size: int, sha256: str, *, max_total: int) -> None:
        super().__init__(total_size, sha256, max_total=max_total)
        self._buf = bytearray(total_size)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        end = self._offset + memoryview(data).nbytes
        self._buf[self._offset : end] = data

    def finish(self) -> bytearray:
        self._check_done()
        return self._buf


@dataclass
class _Partial:
    envelope: pb.TaskEnvelope
    asm: _BufferAssembler
    bytes_down: int = 0
    restarts: int = 0


@dataclass
class DeviceInfo:
    """What a device tells the coordinator about itself when it joins."""

    name: str = ""
    codecs: tuple[str, ...] = ()
    torch_threads: int = 0
    memory_budget_bytes: int = 0
    dataset: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def capabilities(self) -> pb.DeviceCapabilities:
        from importlib.metadata import PackageNotFoundError, version

        try:
            flower = version("flwr")
        except PackageNotFoundError:
            flower = ""
        from fedge import __version__

        return pb.DeviceCapabilities(
            torch_threads=self.torch_threads or (os.cpu_count() or 1),
            memory_budget_bytes=self.memory_budget_bytes,
            cpu_count=os.cpu_count() or 1,
            platform=f"{sys.platform}-{platform.machine()}",
            fedge_version=__version__,
            flower_version=flower,
            codecs=list(self.codecs),
        )


class CoordinatorLink:
    """One device's unary and download calls over one channel.

    `chunk_size` (if set) is the largest data chunk asked for; `call_timeout_s`
    bounds unary calls; `stall_timeout_s` bounds the wait for each chunk of a
    download, so a silently dead link is noticed without keepalive pings.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        chunk_size: int | None = None,
        call_timeout_s: float = 20.0,
        stall_timeout_s: float = 60.0,
        max_task_bytes: int = DEFAULT_MAX_TASK_BYTES,
    ) -> None:
        self.stub = pb_grpc.CoordinatorStub(channel)
        self.chunk_size = chunk_size
        self.call_timeout_s = call_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.max_task_bytes = max_task_bytes
        self._partial: _Partial | None = None

    async def join(self, device_id: str, info: DeviceInfo) -> Session:
        """Announce the device; any status but success is raised as a runtime exception."""
        request = pb.JoinRequest(
            device_id=device_id,
            device_name=info.name,
            capabilities=info.capabilities(),
            data=pb.DataSummary(dataset=info.dataset),
            protocol_version=PROTOCOL_VERSION,
        )
        try:
            reply = await self.stub.Join(request, timeout=self.call_timeout_s)
        except grpc.aio.AioRpcError as e:
            err = translate(e)
            # not translated (INVALID_ARGUMENT etc.): nothing the device can fix, retry slowly
            if isinstance(err, grpc.aio.AioRpcError):
                raise LinkDown(f"Join refused: {err.code().name}: {err.details()}") from e
            if isinstance(err, SessionLost):  # Join carries no session: the identity is refused
                raise NotRecognised(str(err)) from e
            raise err from e
        return Session(
            token=reply.session_token,
            device_id=reply.device_id or device_id,
            node_id=reply.node_id,
            heartbeat_interval_s=reply.heartbeat_interval_s or 10.0,
            chunk_size=min(reply.chunk_size or MAX_CHUNK_SIZE, MAX_CHUNK_SIZE),
            max_result_bytes=reply.max_result_bytes,
            model_version=reply.model_version,
        )

    async def heartbeat(
        self, session: Session, state: int, task_id: str = ""
    ) -> pb.HeartbeatReply:
        request = pb.HeartbeatRequest(
            session_token=session.token, state=state, task_id=task_id
        )
        try:
            return await self.stub.Heartbeat(request, timeout=self.call_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise translate(e) from e

    async def pull_task(self, session: Session, wait_s: float) -> DeliveredTask | None:
        """The next task (or the rest of an interrupted one); None if none came in `wait_s`.

        A stream that breaks or ends early keeps what it held: the next call
        asks for the same task from that offset.
        """
        partial = self._partial
        request = pb.PullTaskRequest(
            session_token=session.token,
            wait_s=0.0 if partial else wait_s,
            max_chunk_bytes=self.chunk_size or 0,
        )
        if partial:
            request.task_id = partial.envelope.task_id
            request.offset = partial.asm.offset
        call = self.stub.PullTask(request)
        try:
            return await self._receive(call, partial, wait_s)
        except grpc.aio.AioRpcError as e:
            if partial and e.code() == grpc.StatusCode.OUT_OF_RANGE:
                self._restart(partial, f"resume refused ({e.details()})")
                return None
            if partial and e.code() in (
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
            ):
                log.warning(
                    "task %s: download cannot resume (%s); dropped",
                    partial.envelope.task_id, e.code().name,
                )
                self._partial = None
                return None
            raise translate(e) from e
        finally:
            if not call.done():
                call.cancel()

    async def _read(self, call: grpc.aio.UnaryStreamCall, timeout: float):
        try:
            # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow a cancel
            # that arrives with the result, and a device's stop is a cancel
            async with asyncio.timeout(timeout):
                return await call.read()
        except TimeoutError:
            call.cancel()
            raise LinkDown(f"task stream stalled for {timeout:.0f} s") from None

    async def _receive(
        self, call: grpc.aio.UnaryStreamCall, partial: _Partial | None, wait_s: float
    ) -> DeliveredTask | None:
        first = await self._read(call, wait_s + self.stall_timeout_s)
        if first is grpc.aio.EOF:
            if partial:
                log.warning("task %s: coordinator no longer offers it; dropped",
                            partial.envelope.task_id)
                self._partial = None
            return None
        if first.WhichOneof("part") != "header":
            raise LinkDown("task stream did not start with a header")
        partial = self._accept_header(first.header, partial)
        if partial is None:
            return None
        self._partial = partial
        while True:
            msg = await self._read(call, self.stall_timeout_s)
            if msg is grpc.aio.EOF:
                break
            if msg.WhichOneof("part") != "data":
                raise LinkDown("task stream sent a second header")
            try:
                partial.asm.add(msg.data.offset, msg.data.data)
            except ChunkError as e:
                if e.reason in ("overlap", "out_of_order"):
                    raise LinkDown(f"task chunk out of place ({e}); resuming") from None
                log.warning("task %s: bad chunk (%s); dropped", partial.envelope.task_id, e)
                self._partial = None
                return None
            partial.bytes_down += len(msg.data.data)
        if not partial.asm.complete:
            raise LinkDown(
                f"task stream ended at {partial.asm.offset} of {partial.asm.total_size} bytes"
            )
        try:
            payload = partial.asm.finish()
        except ChunkError as e:
            self._restart(partial, str(e))
            return None
        self._partial = None
        return DeliveredTask(
            envelope=partial.envelope, payload=payload, bytes_down=partial.bytes_down
        )

    def _accept_header(self, header: pb.TaskEnvelope, partial: _Partial | None) -> _Partial | None:
        """Continue `partial` if the header resumes it, else start a new download."""
        if partial and header.task_id == partial.envelope.task_id:
            if header.offset == partial.asm.offset and header.sha256 == partial.envelope.sha256:
                return partial
            if header.offset == 0:
                partial = None  # the coordinator restarted the transfer: so do we
        if header.payload_format and header.payload_format != FLOWER_MESSAGE_FORMAT:
            log.warning("task %s: payload format %r not supported; dropped",
                        header.task_id, header.payload_format)
            self._partial = None
            return None
        if header.offset != 0:
            log.warning("task %s: stream starts at offset %d without a resume; dropped",
                        header.task_id, header.offset)
            self._partial = None
            return None
        try:
            asm = _BufferAssembler(
                header.total_size, header.sha256, max_total=self.max_task_bytes
            )
        except ChunkError as e:
            log.warning("task %s: refused (%s); dropped", header.task_id, e)
            self._partial = None
            return None
        return _Partial(envelope=header, asm=asm)

    def _restart(self, partial: _Partial, why: str) -> None:
        """Ask for the task again from byte 0 (once or twice), else give it up."""
        if partial.restarts >= 2:
            log.warning("task %s: %s, again; dropped", partial.envelope.task_id, why)
            self._partial = None
            return
        log.warning("task %s: %s; downloading it again", partial.envelope.task_id, why)
        env = partial.envelope
        self._partial = _Partial(
            envelope=env,
            asm=_BufferAssembler(env.total_size, env.sha256, max_total=self.max_task_bytes),
            bytes_down=partial.bytes_down,
            restarts=partial.restarts + 1,
        )
        return None
