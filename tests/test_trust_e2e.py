"""Issue 5 acceptance: enrollment and trust against the REAL coordinator service.

Every case is real gRPC on 127.0.0.1: an enrollment server (`EnrollmentService`)
and the coordinator's device port (`CoordinatorService(mtls=True)` behind
`server_credentials(..., require_client_auth=True)`), sharing one store, as
`fedge coordinator run` wires them. Each refusal is checked for its status
code and for having no side effect: no new device row, no token use, no
counted result.

Also here: secrets never reach logs or output (an enrollment and a round,
in-process with caplog DEBUG and through the `fedge enroll` process), key
files are 0600, and the result/task envelope decoders of the servicer and of
the edge runtime are fuzzed (>= 2,000 mutated inputs each, only typed
outcomes).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import grpc
import pytest
from coordinator_harness import RawDevice, ServiceHarness, reply_bytes
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from enrollment_harness import FakeClock, csr_pem, key_pem, p256_key
from google.protobuf.message import DecodeError

from fedge.client.edge_session import CoordinatorLink, DeliveredTask, LinkDown
from fedge.client.enroll import DeviceCredentials, enroll
from fedge.common.chunking import sha256_hex
from fedge.common.signing import sign_result
from fedge.server.enrollment_service import (
    Enroller,
    EnrollmentService,
    start_enrollment_server,
)
from fedge.server.rate_limit import RateLimiter
from fedge.server.store import DeviceStatus, ResultStatus
from fedge.server.tls import ensure_server_tls, server_credentials, sign_csr
from fedge.server.tokens import TokenBook
from fedge.v1 import coordinator_pb2 as pb
from fedge.v1 import coordinator_pb2_grpc as pb_grpc
from fedge.v1 import enrollment_pb2, enrollment_pb2_grpc

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

FUZZ_CASES = int(os.environ.get("FEDGE_FUZZ_CASES", "2200"))


# ---------------------------------------------------------------- harness


class MtlsDevice(RawDevice):
    """`RawDevice` over mutual TLS with an enrolled device's credentials (or any given)."""

    def __init__(self, target: str, creds: grpc.ChannelCredentials, name: str = "dev") -> None:
        self.channel = grpc.aio.secure_channel(target, creds)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.name = name
        self.device_id = ""
        self.token = ""
        self.node_id = 0


@dataclass
class Trust:
    h: ServiceHarness
    tokens: TokenBook
    clock: FakeClock
    enroll_server: grpc.aio.Server
    enroll_target: str
    device_target: str
    ca_pem: bytes
    tmp: Path

    def token(self, **kw: Any) -> str:
        return self.tokens.create(**kw).token

    async def enroll(self, name: str, token: str | None = None) -> DeviceCredentials:
        token = token or self.token()
        return await asyncio.to_thread(
            enroll, self.enroll_target, token, self.ca_pem, data_dir=self.tmp / name, name=name
        )

    async def device(self, name: str) -> tuple[MtlsDevice, DeviceCredentials]:
        creds = await self.enroll(name)
        dev = MtlsDevice(self.device_target, creds.channel_credentials(), name)
        await dev.join()
        assert dev.device_id == creds.device_id
        return dev, creds

    async def enroll_call(self, request: enrollment_pb2.EnrollRequest) -> grpc.StatusCode:
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
        async with grpc.aio.secure_channel(self.enroll_target, creds) as ch:
            try:
                await enrollment_pb2_grpc.EnrollmentStub(ch).Enroll(request, timeout=10)
            except grpc.aio.AioRpcError as e:
                return e.code()
        return grpc.StatusCode.OK

    def devices(self) -> int:
        return len(self.h.store.list_devices())

    def counted(self, round: int = 1) -> int:
        return len(self.h.store.list_results(self.h.run_id, round, ResultStatus.COMPLETE))

    def uses(self) -> int:
        return sum(t.uses for t in self.h.store.list_enrollment_tokens())


@pytest.fixture
async def trust(tmp_path: Path) -> AsyncIterator[Trust]:
    h = ServiceHarness(tmp_path / "coord")
    h.service.mtls = True
    h.fleet.bind_loop(asyncio.get_running_loop())
    paths = ensure_server_tls(tmp_path / "coord")
    server = grpc.aio.server()
    pb_grpc.add_CoordinatorServicer_to_server(h.service, server)
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(paths, require_client_auth=True)
    )
    await server.start()
    h.server = server
    clock = FakeClock(dt.datetime.now(dt.UTC).timestamp())
    tokens = TokenBook(h.store, clock=clock)
    service = EnrollmentService(Enroller(
        h.store, paths, device_port=port, tokens=tokens,
        limiter=RateLimiter(per_source=1000, total=1000, window_s=60),
    ))
    enroll_server, enroll_port = await start_enrollment_server(service, paths, port=0)
    t = Trust(h, tokens, clock, enroll_server, f"127.0.0.1:{enroll_port}",
              f"127.0.0.1:{port}", paths.ca_cert.read_bytes(), tmp_path)
    try:
        yield t
    finally:
        await enroll_server.stop(None)
        await h.stop()


async def status_of(coro: Any) -> grpc.StatusCode:
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def task_for(t: Trust, dev: MtlsDevice, round: int = 1) -> tuple[Any, Any]:
    """Queue a train task for `dev`; returns (pulled task, future of the Grid's replies)."""
    _ids, replies = await t.h.send_and_receive(
        [t.h.train_message(dev.node_id, server_round=round)], timeout=20
    )
    pulled = await dev.pull(5.0)
    assert pulled is not None
    return pulled, replies


def signed_header(dev: MtlsDevice, key: Any, env: Any, payload: bytes, **over: Any) -> Any:
    sig = sign_result(key, run_id=env.run_id, round=env.round, task_id=env.task_id,
                      payload_sha256=sha256_hex(payload))
    return dev.header(env, payload, signature=over.pop("signature", sig), **over)


def self_signed(cn: str = "stranger") -> tuple[bytes, bytes]:
    key = p256_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)


# ---------------------------------------------------------------- the refusal table


async def case_no_client_cert(t: Trust) -> grpc.StatusCode:
    dev = MtlsDevice(t.device_target, grpc.ssl_channel_credentials(root_certificates=t.ca_pem))
    try:
        return await status_of(dev.stub.Join(pb.JoinRequest(device_name="x"), timeout=5))
    finally:
        await dev.close()


async def case_other_ca(t: Trust) -> grpc.StatusCode:
    cert, key = self_signed()
    creds = grpc.ssl_channel_credentials(
        root_certificates=t.ca_pem, private_key=key, certificate_chain=cert
    )
    dev = MtlsDevice(t.device_target, creds)
    try:
        return await status_of(dev.stub.Join(pb.JoinRequest(device_name="x"), timeout=5))
    finally:
        await dev.close()


def _enroll_request(token: str) -> enrollment_pb2.EnrollRequest:
    return enrollment_pb2.EnrollRequest(token=token, csr_pem=csr_pem(p256_key()), device_name="d")


async def case_expired_token(t: Trust) -> grpc.StatusCode:
    token = t.token(ttl_s=60)
    t.clock.now += 120
    return await t.enroll_call(_enroll_request(token))


async def case_token_twice(t: Trust) -> grpc.StatusCode:
    token = t.token(uses=1)
    assert await t.enroll_call(_enroll_request(token)) == grpc.StatusCode.OK
    t.baseline_devices += 1  # type: ignore[attr-defined]  # the first use is legitimate
    t.baseline_uses += 1  # type: ignore[attr-defined]
    return await t.enroll_call(_enroll_request(token))


async def case_wrong_token(t: Trust) -> grpc.StatusCode:
    token = t.token()
    prefix, secret = token.rsplit(".", 1)
    wrong = prefix + "." + ("A" if secret[0] != "A" else "B") + secret[1:]
    return await t.enroll_call(_enroll_request(wrong))


async def case_revoked_mid_run(t: Trust) -> grpc.StatusCode:
    dev, creds = await t.device("victim")
    t.baseline_devices += 1  # type: ignore[attr-defined]
    t.baseline_uses += 1  # type: ignore[attr-defined]
    pulled, _ = await task_for(t, dev)
    payload = reply_bytes(pulled.payload)
    header = signed_header(dev, creds.private_key(), pulled.envelope, payload)
    gate = asyncio.Event()

    async def stream() -> AsyncIterator[pb.ResultChunk]:
        yield header
        yield pb.ResultChunk(data=pb.Chunk(offset=0, data=payload[:10]))
        await gate.wait()  # revoked while uploading
        yield pb.ResultChunk(data=pb.Chunk(offset=10, data=payload[10:]))

    call = dev.stub.PushResult(stream(), timeout=20)
    while t.h.store.get_result(pulled.envelope.task_id) is None:  # the upload has begun
        await asyncio.sleep(0.01)
    t.h.store.set_device_status(dev.device_id, DeviceStatus.REVOKED)  # what the CLI does
    gate.set()
    code = await status_of(call)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # and every later call, with no restart
    assert await status_of(dev.heartbeat()) == grpc.StatusCode.PERMISSION_DENIED
    assert await status_of(dev.stub.Join(pb.JoinRequest(), timeout=5)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    await dev.close()
    return code


async def case_foreign_task(t: Trust) -> grpc.StatusCode:
    a, a_creds = await t.device("dev-a")
    b, _ = await t.device("dev-b")
    t.baseline_devices += 2  # type: ignore[attr-defined]
    t.baseline_uses += 2  # type: ignore[attr-defined]
    pulled, _ = await task_for(t, b)
    payload = reply_bytes(pulled.payload)
    header = signed_header(a, a_creds.private_key(), pulled.envelope, payload)
    code = await status_of(a.push(pulled.envelope, payload, header=header))
    # B's own session token on A's certificate is no better
    header.header.session_token = b.token
    code2 = await status_of(a.push(pulled.envelope, payload, header=header))
    assert code2 == grpc.StatusCode.UNAUTHENTICATED
    await a.close()
    await b.close()
    return code


async def case_altered_bytes(t: Trust) -> grpc.StatusCode:
    dev, creds = await t.device("alter")
    t.baseline_devices += 1  # type: ignore[attr-defined]
    t.baseline_uses += 1  # type: ignore[attr-defined]
    pulled, _ = await task_for(t, dev)
    payload = reply_bytes(pulled.payload)
    signed = signed_header(dev, creds.private_key(), pulled.envelope, payload)
    altered = bytearray(payload)
    altered[-1] ^= 0x01
    altered = bytes(altered)
    # a consistent hash for the altered bytes, the original signature
    header = dev.header(pulled.envelope, altered, signature=signed.header.signature)
    code = await status_of(dev.push(pulled.envelope, altered, header=header))
    assert t.h.store.get_result(pulled.envelope.task_id).reason == "bad_signature"
    await dev.close()
    return code


async def case_replayed_round(t: Trust) -> grpc.StatusCode:
    dev, creds = await t.device("replay")
    t.baseline_devices += 1  # type: ignore[attr-defined]
    t.baseline_uses += 1  # type: ignore[attr-defined]
    key = creds.private_key()
    old, replies = await task_for(t, dev, round=1)
    old_payload = reply_bytes(old.payload)
    old_header = signed_header(dev, key, old.envelope, old_payload)
    reply = await dev.push(old.envelope, old_payload, header=old_header)
    assert reply.accepted
    assert len(await replies) == 1
    t.baseline_counted += 1  # type: ignore[attr-defined]  # round 1's honest result
    new, _ = await task_for(t, dev, round=2)
    assert new.envelope.round == 2
    header = dev.header(new.envelope, old_payload, signature=old_header.header.signature)
    code = await status_of(dev.push(new.envelope, old_payload, header=header))
    assert t.counted(round=2) == 0
    await dev.close()
    return code


async def case_enroll_flood(t: Trust) -> grpc.StatusCode:
    paths = ensure_server_tls(t.tmp / "coord")
    service = EnrollmentService(Enroller(
        t.h.store, paths, device_port=1, tokens=t.tokens,
        limiter=RateLimiter(per_source=3, total=100, window_s=60),
    ))
    server, port = await start_enrollment_server(service, paths, port=0)
    flood = Trust(t.h, t.tokens, t.clock, server, f"127.0.0.1:{port}", "", t.ca_pem, t.tmp)
    try:
        for _ in range(3):  # the cap's worth of attempts (wrong tokens)
            assert await flood.enroll_call(_enroll_request("fdg1.0123456789abcdef." + "Q" * 43)) \
                == grpc.StatusCode.UNAUTHENTICATED
        return await flood.enroll_call(_enroll_request(t.token()))  # even a good token
    finally:
        await server.stop(None)


CASES = [
    ("no client certificate", case_no_client_cert, grpc.StatusCode.UNAVAILABLE),
    ("certificate from another CA", case_other_ca, grpc.StatusCode.UNAVAILABLE),
    ("expired token", case_expired_token, grpc.StatusCode.UNAUTHENTICATED),
    ("one-time token used twice", case_token_twice, grpc.StatusCode.UNAUTHENTICATED),
    ("wrong token", case_wrong_token, grpc.StatusCode.UNAUTHENTICATED),
    ("device revoked mid-run", case_revoked_mid_run, grpc.StatusCode.PERMISSION_DENIED),
    ("A's certificate, B's task", case_foreign_task, grpc.StatusCode.NOT_FOUND),
    ("bytes altered after signing", case_altered_bytes, grpc.StatusCode.INVALID_ARGUMENT),
    ("old round's signed update replayed", case_replayed_round,
     grpc.StatusCode.INVALID_ARGUMENT),
    ("enrollment flood beyond the cap", case_enroll_flood, grpc.StatusCode.RESOURCE_EXHAUSTED),
]


@pytest.mark.parametrize(("name", "case", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_refused_without_side_effects(trust: Trust, name: str, case: Any,
                                            expected: grpc.StatusCode) -> None:
    t = trust
    t.baseline_devices = t.devices()  # type: ignore[attr-defined]
    t.baseline_uses = t.uses()  # type: ignore[attr-defined]
    t.baseline_counted = t.counted(1) + t.counted(2)  # type: ignore[attr-defined]
    code = await case(t)
    assert code == expected, f"{name}: {code}"
    assert t.devices() == t.baseline_devices, f"{name}: a device row appeared"  # type: ignore
    assert t.uses() == t.baseline_uses, f"{name}: a token use was spent"  # type: ignore
    assert t.counted(1) + t.counted(2) == t.baseline_counted, f"{name}: update counted"  # type: ignore


async def test_signed_results_count_under_certificate_ids(trust: Trust) -> None:
    """The happy path: the reply the Grid receives comes from the certificate's node."""
    t = trust
    dev, creds = await t.device("honest")
    # a Join naming another device id still gets the certificate's identity
    reply = await dev.stub.Join(pb.JoinRequest(device_id="someone-else", device_name="honest"))
    assert reply.device_id == creds.device_id and reply.node_id == creds.node_id
    dev.token = reply.session_token
    pulled, replies = await task_for(t, dev)
    payload = reply_bytes(pulled.payload)
    ok = await dev.push(pulled.envelope, payload,
                        header=signed_header(dev, creds.private_key(), pulled.envelope, payload))
    assert ok.accepted
    got = await replies
    assert [m.metadata.src_node_id for m in got] == [creds.node_id]
    assert t.h.grid.device_of_node(creds.node_id) == creds.device_id
    # unsigned results are refused under mTLS
    pulled, _ = await task_for(t, dev)
    payload = reply_bytes(pulled.payload)
    assert await status_of(dev.push(pulled.envelope, payload)) == grpc.StatusCode.INVALID_ARGUMENT
    await dev.close()


# ---------------------------------------------------------------- secrets


async def test_no_secret_in_logs_or_output(trust: Trust, caplog: pytest.LogCaptureFixture,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    t = trust
    caplog.set_level(logging.DEBUG)
    token_a, token_b = t.token(label="a"), t.token(label="b")
    # an enrollment in-process, one through the `fedge enroll` process, then a round
    creds_a = await t.enroll("sec-a", token_a)
    env = dict(os.environ, FEDGE_ENROLL_TOKEN=token_b, FLWR_TELEMETRY_ENABLED="0")
    ca = t.tmp / "ca.pem"
    ca.write_bytes(t.ca_pem)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from fedge.cli import app; app()", "enroll",
        "--coordinator", t.enroll_target, "--ca", str(ca), "--name", "sec-b",
        "--data", str(t.tmp / "sec-b"), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    dev = MtlsDevice(t.device_target, creds_a.channel_credentials(), "sec-a")
    await dev.join()
    pulled, replies = await task_for(t, dev)
    payload = reply_bytes(pulled.payload)
    header = signed_header(dev, creds_a.private_key(), pulled.envelope, payload)
    assert (await dev.push(pulled.envelope, payload, header=header)).accepted
    await replies
    await dev.close()
    captured = capfd.readouterr()
    text = "\n".join([caplog.text, out.decode(), err.decode(), captured.out, captured.err])
    assert "enrolled" in text or "device" in text  # something was logged at all
    secrets = [token_a, token_b, token_a.rsplit(".", 1)[1], token_b.rsplit(".", 1)[1]]
    for name in ("sec-a", "sec-b"):
        folder = t.tmp / name / "identity"
        for key_file in ("device.key", "flower.key"):
            path = folder / key_file
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            body = path.read_text().splitlines()
            secrets += [line for line in body if len(line) >= 40 and "-----" not in line]
        priv = serialization.load_pem_private_key((folder / "device.key").read_bytes(), None)
        assert isinstance(priv, ec.EllipticCurvePrivateKey)
        d = priv.private_numbers().private_value
        secrets += [f"{d:x}", str(d)]
    for secret in secrets:
        assert secret not in text
    assert "PRIVATE KEY" not in text


# ---------------------------------------------------------------- fuzz


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(5)
        pos = rng.randrange(len(buf) + 1) if buf else 0
        if op == 0 and buf:
            del buf[pos:]
        elif op == 1 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 2 and buf:
            for i in range(pos, min(len(buf), pos + rng.randint(1, 8))):
                buf[i] = rng.randrange(256)
        elif op == 3:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            a = rng.randrange(len(buf) + 1)
            buf[pos:pos] = buf[a : a + rng.randint(1, 64)]
    return bytes(buf)


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code


class _Context:
    """A servicer context for in-process calls: abort raises a typed status."""

    def __init__(self, cert_pem: bytes) -> None:
        self._auth = {"x509_pem_cert": [cert_pem]}

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Aborted(code)


async def test_fuzz_result_envelopes_in_the_servicer(trust: Trust) -> None:
    """Mutated ResultChunk bytes (header or data) through PushResult: only typed statuses.

    Counts only inputs that still parse (DecodeError is the parser's typed
    refusal): >= FUZZ_CASES of them reach the servicer. A refused or accepted
    result ends its task, so the next inputs go to a fresh task. Whatever is
    counted must be a device-signed, unaltered result.
    """
    t = trust
    dev, creds = await t.device("fuzz")
    key = creds.private_key()
    ctx = _Context(creds.cert_path.read_bytes())
    honest: set[str] = set()
    tasks: list[str] = []

    async def fresh() -> list[bytes]:
        # pushed without a collector: collectors would hold the default executor's threads
        list(t.h.grid.push_messages([t.h.train_message(dev.node_id)]))
        pulled = await dev.pull(5.0)
        assert pulled is not None
        payload = reply_bytes(pulled.payload)
        honest.add(sha256_hex(payload))
        tasks.append(pulled.envelope.task_id)
        header = signed_header(dev, key, pulled.envelope, payload)
        return [header.SerializeToString(),
                pb.ResultChunk(data=pb.Chunk(offset=0, data=payload)).SerializeToString()]

    good = await fresh()
    rng = random.Random(5005)
    outcomes: dict[str, int] = {}
    reached = tries = 0
    while reached < FUZZ_CASES and tries < 40 * FUZZ_CASES:
        tries += 1
        blobs = list(good)
        which = rng.randrange(2)
        blobs[which] = _mutate(blobs[which], rng)
        try:
            msgs = [pb.ResultChunk.FromString(b) for b in blobs]
        except DecodeError:
            continue
        reached += 1

        async def stream(msgs: list[pb.ResultChunk] = msgs) -> AsyncIterator[pb.ResultChunk]:
            for m in msgs:
                yield m

        try:
            reply = await t.h.service.PushResult(stream(), ctx)
            name = "accepted" if reply.accepted else "reply"
        except _Aborted as e:
            name = e.code.name
        outcomes[name] = outcomes.get(name, 0) + 1
        result = t.h.store.get_result(tasks[-1])
        if result is not None and result.status in (ResultStatus.REJECTED, ResultStatus.COMPLETE):
            good = await fresh()
    assert reached >= FUZZ_CASES, (reached, tries)
    print("servicer", outcomes)
    assert len(outcomes) >= 4, outcomes  # the mutations reach several checks
    counted = [r for rnd in (1,) for r in t.h.store.list_results(t.h.run_id, rnd,
                                                                 ResultStatus.COMPLETE)]
    assert all(r.sha256 in honest for r in counted)  # nothing altered was ever counted
    await dev.close()


class _FakeCall:
    def __init__(self, msgs: list[pb.TaskChunk]) -> None:
        self._msgs = list(msgs)

    async def read(self) -> Any:
        return self._msgs.pop(0) if self._msgs else grpc.aio.EOF

    def cancel(self) -> bool:
        return True

    def done(self) -> bool:
        return True


async def test_fuzz_task_envelopes_in_the_runtime() -> None:
    """Mutated TaskChunk bytes through the download path: DeliveredTask, None or LinkDown."""
    payload = bytes(range(256)) * 40
    env = pb.TaskEnvelope(task_id="ab" * 16, run_id=7, round=3, message_type="train",
                          total_size=len(payload), sha256=sha256_hex(payload),
                          payload_format="flwr.proto.Message", timeout_s=30.0)
    good = [pb.TaskChunk(header=env).SerializeToString()] + [
        pb.TaskChunk(data=pb.Chunk(offset=off, data=payload[off : off + 4096])).SerializeToString()
        for off in range(0, len(payload), 4096)
    ]
    rng = random.Random(7007)
    outcomes: dict[str, int] = {}
    link = CoordinatorLink(mock.MagicMock(), max_task_bytes=1 << 20)
    reached = tries = 0
    while reached < FUZZ_CASES and tries < 40 * FUZZ_CASES:
        tries += 1
        blobs = list(good)
        i = rng.randrange(len(blobs))
        blobs[i] = _mutate(blobs[i], rng)
        try:
            msgs = [pb.TaskChunk.FromString(b) for b in blobs]
        except DecodeError:
            continue
        reached += 1
        link._partial = None
        try:
            got = await link._receive(_FakeCall(msgs), None, 0.0)
            key = "task" if isinstance(got, DeliveredTask) else "none"
            if isinstance(got, DeliveredTask):
                assert sha256_hex(bytes(got.payload)) == got.envelope.sha256
        except LinkDown:
            key = "link_down"
        outcomes[key] = outcomes.get(key, 0) + 1
    assert reached >= FUZZ_CASES, (reached, tries)
    print("runtime", outcomes)
    assert len(outcomes) >= 3, outcomes


# ---------------------------------------------------------------- the edge runtime


async def test_enrolled_runtime_joins_by_certificate_and_stops_when_revoked(trust: Trust) -> None:
    """`EdgeDevice(credentials=...)`: mTLS to the device port, certificate id, exit 3 on revoke."""
    from fedge.client.edge_runtime import EXIT_REVOKED, EdgeDevice

    t = trust
    creds = await t.enroll("runtime")
    device = EdgeDevice("", t.tmp / "runtime", credentials=creds, name="runtime",
                        poll_wait_s=0.3, max_backoff=1.0)
    assert device.target == t.device_target == creds.device_target
    run = asyncio.create_task(device.run())
    session = await asyncio.wait_for(device.wait_joined(), 20)
    assert session.device_id == creds.device_id and session.node_id == creds.node_id
    t.h.store.set_device_status(creds.device_id, DeviceStatus.REVOKED)
    assert await asyncio.wait_for(run, 20) == EXIT_REVOKED


async def test_runtime_with_an_unrecognised_certificate_says_enroll_again(
    trust: Trust, caplog: pytest.LogCaptureFixture
) -> None:
    """Our CA's certificate that no enrolled device holds: the runtime asks for a re-enrollment."""
    from fedge.client.edge_runtime import EXIT_OK, EdgeDevice

    t = trust
    creds = await t.enroll("stray")
    # the same key and device id, a certificate the coordinator never recorded (as after a
    # registry restored from a backup older than the enrollment)
    key = serialization.load_pem_private_key(creds.key_path.read_bytes(), password=None)
    stray = sign_csr(csr_pem(key), ensure_server_tls(t.tmp / "coord"), device_id=creds.device_id)
    creds.cert_path.write_bytes(stray)
    device = EdgeDevice("", t.tmp / "stray", credentials=creds, name="stray",
                        poll_wait_s=0.3, max_backoff=0.5)
    caplog.set_level(logging.INFO, logger="fedge.client.edge_runtime")
    run = asyncio.create_task(device.run())
    try:
        for _ in range(200):
            if sum("enroll it again" in r.getMessage() for r in caplog.records) >= 2:
                break
            await asyncio.sleep(0.1)
    finally:
        device.stop()
    assert await asyncio.wait_for(run, 20) == EXIT_OK  # it kept trying, then stopped when told
    said = [r for r in caplog.records if "enroll it again" in r.getMessage()]
    assert len(said) >= 2 and said[0].levelno == logging.WARNING  # warned once, then retried
    assert said[1].levelno == logging.INFO
    assert device.joins == 0
