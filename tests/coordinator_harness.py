"""Test support: the real coordinator service on loopback, and a raw-protocol device.

`ServiceHarness` runs `CoordinatorService` with a real `Store`, `ModelStore`,
`Fleet` and `GrpcGrid` on a grpc.aio server bound to 127.0.0.1, in the test's
process. `RawDevice` speaks the protocol call by call, so a test can follow
the rules or break one on purpose (the edge runtime only ever follows them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedge.common import flower_compat as fc
from fedge.common.chunking import iter_chunks, sha256_hex
from fedge.common.flower_compat import ProtoMessage
from fedge.common.snapshot import arrays_to_snapshot
from fedge.server.coordinator_service import CoordinatorService, ServiceSettings
from fedge.server.fleet import Fleet
from fedge.server.grpc_grid import GrpcGrid
from fedge.server.model_store import ModelStore
from fedge.server.store import Store
from fedge.v1 import coordinator_pb2 as pb
from fedge.v1 import coordinator_pb2_grpc as pb_grpc

RUN_ID = 7_000_000_000_000_000_123  # above 2**63: exercises unsigned ids end to end


class ServiceHarness:
    """The servicer, its state and a Grid, served on 127.0.0.1:<free port>."""

    def __init__(
        self,
        tmp: Path,
        *,
        settings: ServiceSettings | None = None,
        heartbeat_interval_s: float = 5.0,
        run_id: int = RUN_ID,
        model_arrays: dict[str, np.ndarray] | None = None,
        model_bytes: bytes | None = None,
        device_run_config: dict[str, object] | None = None,
    ) -> None:
        self.tmp = tmp
        self.store = Store.open(tmp / "fedge.db")
        self.models = ModelStore(tmp / "models")
        arrays = model_arrays or {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
        snap = arrays_to_snapshot(arrays, {"task": "test"}).SerializeToString(deterministic=True)
        self.model_version = self.models.put(model_bytes or snap)
        self.run_id = run_id
        self.store.create_run(run_id, {"task": "test"}, model_version=self.model_version)
        self._settings = settings or ServiceSettings()
        self._heartbeat_interval_s = heartbeat_interval_s
        self._device_run_config = device_run_config or {"task": "test", "seed": 1}
        self._build()
        self.server: grpc.aio.Server | None = None
        self.target = ""

    def _build(self) -> None:
        """The parts a coordinator process holds in memory (sessions, queues, the Grid)."""
        self.fleet = Fleet(heartbeat_interval_s=self._heartbeat_interval_s)
        self.service = CoordinatorService(
            self.store,
            self.fleet,
            self.models,
            self.tmp / "uploads",
            settings=self._settings,
            model_version=lambda: self.model_version,
        )
        self.grid = GrpcGrid(
            self.store,
            self.fleet,
            run_id=self.run_id,
            device_run_config=self._device_run_config,
            model_version=lambda: self.model_version,
            default_timeout=30.0,
        )

    async def start(
        self, port: int = 0, *, credentials: grpc.ServerCredentials | None = None
    ) -> str:
        """Serve on 127.0.0.1 (plaintext, or TLS with `credentials`); returns the target."""
        self.fleet.bind_loop(asyncio.get_running_loop())
        self.server = grpc.aio.server()
        pb_grpc.add_CoordinatorServicer_to_server(self.service, self.server)
        address = f"127.0.0.1:{port}"
        if credentials is None:
            port = self.server.add_insecure_port(address)
        else:
            port = self.server.add_secure_port(address, credentials)
        await self.server.start()
        self.target = f"127.0.0.1:{port}"
        return self.target

    async def go_down(self) -> None:
        """As a coordinator process that died: the port closes, memory is lost, the state
        folder (SQLite, models) stays. `come_back()` serves it again on the same port."""
        self.grid.stop()
        if self.server is not None:
            await self.server.stop(None)
            self.server = None

    async def come_back(self) -> str:
        """A restarted coordinator on the same state and port: no sessions, no queues."""
        timeout = self.grid.default_timeout
        self._build()
        self.grid.default_timeout = timeout
        return await self.start(int(self.target.rsplit(":", 1)[1]))

    async def stop(self) -> None:
        self.grid.stop()
        if self.server is not None:
            await self.server.stop(None)
        self.store.close()

    def train_message(
        self, node_id: int, *, server_round: int = 1, payload: bytes | None = None
    ) -> Message:
        """A train instruction like a strategy's (config carries `server-round`)."""
        data = np.frombuffer(payload, dtype=np.uint8) if payload else np.zeros(8, np.uint8)
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(data.copy())}),
                "config": ConfigRecord({"server-round": server_round}),
            }
        )
        return Message(content, node_id, "train")

    async def send_and_receive(
        self, messages: Sequence[Message], timeout: float
    ) -> tuple[list[str], asyncio.Future[list[Message]]]:
        """Push now; collect replies in a thread (the Grid blocks, as in the ServerApp)."""
        ids = list(self.grid.push_messages(messages))
        loop = asyncio.get_running_loop()

        def collect() -> list[Message]:
            return list(self.grid._collect(ids, self.grid._clock() + timeout))

        return ids, loop.run_in_executor(None, collect)


def reply_bytes(task_payload: bytes, *, values: bytes = b"\x01\x02\x03", **meta: object) -> bytes:
    """A Flower train reply to the task message in `task_payload` (as a device builds it)."""
    task = fc.message_from_bytes(task_payload)
    if values == b"echo":  # the task's own content back: big payloads without re-encoding
        reply = Message(RecordDict(), reply_to=task)
        content = ProtoMessage(content=ProtoMessage.FromString(task_payload).content)
        return content.SerializeToString() + fc.message_parts(reply)[1]
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.frombuffer(values, np.uint8).copy())}),
            "metrics": MetricRecord({"num-examples": 10}),
        }
    )
    reply = Message(content, reply_to=task)
    for key, value in meta.items():
        reply.metadata.__dict__[f"_{key}"] = value
    return fc.message_to_bytes(reply)


@dataclass
class PulledTask:
    envelope: pb.TaskEnvelope
    payload: bytes
    chunks: int


class RawDevice:
    """One device speaking the protocol directly (no retries, no resumption logic)."""

    def __init__(self, target: str, name: str = "dev", device_id: str = "") -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.name = name
        self.device_id = device_id
        self.token = ""
        self.node_id = 0

    async def close(self) -> None:
        await self.channel.close()

    async def join(self) -> pb.JoinReply:
        reply = await self.stub.Join(
            pb.JoinRequest(device_id=self.device_id, device_name=self.name, protocol_version=1)
        )
        self.device_id, self.token, self.node_id = (
            reply.device_id,
            reply.session_token,
            reply.node_id,
        )
        return reply

    async def heartbeat(self, task_id: str = "") -> pb.HeartbeatReply:
        return await self.stub.Heartbeat(
            pb.HeartbeatRequest(session_token=self.token, task_id=task_id), timeout=10
        )

    async def pull(
        self, wait_s: float = 5.0, *, task_id: str = "", offset: int = 0, max_chunk: int = 0
    ) -> PulledTask | None:
        envelope = None
        parts: list[bytes] = []
        async for chunk in self.stub.PullTask(
            pb.PullTaskRequest(
                session_token=self.token,
                wait_s=wait_s,
                task_id=task_id,
                offset=offset,
                max_chunk_bytes=max_chunk,
            ),
            timeout=wait_s + 30,
        ):
            if chunk.WhichOneof("part") == "header":
                envelope = chunk.header
            else:
                parts.append(chunk.data.data)
        if envelope is None:
            return None
        return PulledTask(envelope, b"".join(parts), len(parts))

    def header(self, task: pb.TaskEnvelope, payload: bytes, **overrides: object) -> pb.ResultChunk:
        fields = {
            "session_token": self.token,
            "task_id": task.task_id,
            "run_id": task.run_id,
            "round": task.round,
            "total_size": len(payload),
            "sha256": sha256_hex(payload),
            "offset": 0,
            "payload_format": "flwr.proto.Message",
        }
        fields.update(overrides)
        return pb.ResultChunk(header=pb.ResultHeader(**fields))

    async def push(
        self,
        task: pb.TaskEnvelope,
        payload: bytes,
        *,
        start: int = 0,
        stop: int | None = None,
        chunk_size: int = 1 << 20,
        header: pb.ResultChunk | None = None,
        chunks: Iterable[pb.ResultChunk] | None = None,
    ) -> pb.PushResultReply:
        """Push `payload[start:stop]` after a header (or exactly `chunks` if given)."""
        first = header or self.header(task, payload, offset=start)
        end = len(payload) if stop is None else stop

        async def stream() -> AsyncIterator[pb.ResultChunk]:
            yield first
            if chunks is not None:
                for c in chunks:
                    yield c
                return
            for off, view in iter_chunks(memoryview(payload)[:end], chunk_size, start=start):
                yield pb.ResultChunk(data=pb.Chunk(offset=off, data=bytes(view)))

        return await self.stub.PushResult(stream(), timeout=60)

    async def upload_offset(self, task_id: str) -> pb.GetUploadOffsetReply:
        return await self.stub.GetUploadOffset(
            pb.GetUploadOffsetRequest(session_token=self.token, task_id=task_id), timeout=10
        )

    async def fetch_model(self, **fields: object) -> tuple[pb.ModelHeader, bytes, int]:
        header = None
        parts: list[bytes] = []
        async for chunk in self.stub.FetchModel(
            pb.FetchModelRequest(session_token=self.token, **fields), timeout=60
        ):
            if chunk.WhichOneof("part") == "header":
                header = chunk.header
            else:
                parts.append(chunk.data.data)
        assert header is not None
        return header, b"".join(parts), len(parts)


async def status_of(awaitable: object) -> grpc.StatusCode:
    """The gRPC status an awaitable call ends with (OK if it returns)."""
    try:
        await awaitable  # type: ignore[misc]
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK
