"""Enrollment and device identity, proven with real gRPC over TLS on 127.0.0.1 and real SQLite.

- the happy path: `fedge.client.enroll` makes a key, gets a certificate, writes
  its identity (keys 0600, never chmod-ed), and the Flower SuperNode key files
  load with Flower's own loaders;
- a table of refusals, each a real Enroll call answered with a stated status
  and leaving no device row and no spent token use;
- device identity on an mTLS port: no certificate, another CA's certificate,
  an unregistered certificate, a device revoked mid-session (by the CLI, from
  another connection), and the enrolled device accepted;
- secrets stay secret: logs and CLI output of an enrollment hold no token and
  no private key material.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from enrollment_harness import (
    DEVICE_PORT,
    EnrollmentHarness,
    csr_pem,
    key_pem,
    p256_key,
    start_harness,
)
from typer.testing import CliRunner

from fedge.cli import app
from fedge.client.enroll import DeviceCredentials, EnrollError, enroll, load_credentials
from fedge.common.signing import SignatureInvalid, sign_result, verify_result
from fedge.server.device_identity import peer_cert_pem, require_device
from fedge.server.store import DeviceStatus, Store
from fedge.server.tls import cert_fingerprint, ensure_server_tls, server_credentials, sign_csr
from fedge.v1 import enrollment_pb2, enrollment_pb2_grpc

REFUSED = "enrollment token refused"
RUN, ROUND = 7, 3
PAYLOAD_SHA = hashlib.sha256(b"a Flower reply").hexdigest()


@pytest.fixture
async def harness(tmp_path: Path) -> EnrollmentHarness:
    h = await start_harness(tmp_path / "coordinator")
    yield h
    await h.close()


def _request(
    token: str, csr: bytes | None = None, name: str = "pi"
) -> enrollment_pb2.EnrollRequest:
    return enrollment_pb2.EnrollRequest(
        token=token, csr_pem=csr if csr is not None else csr_pem(p256_key()), device_name=name
    )


async def _enroll_device(h: EnrollmentHarness, data: Path, name: str = "pi-1") -> DeviceCredentials:
    """A device enrolls the way `fedge enroll` does (blocking gRPC, so in a thread)."""
    issued = h.tokens.create(ttl_s=600, label="test")
    ca = h.paths.ca_cert.read_bytes()
    return await asyncio.to_thread(enroll, h.target, issued.token, ca, data_dir=data, name=name)


# -- the happy path ------------------------------------------------------------


async def test_enroll_issues_a_certificate_for_a_key_made_on_the_device(
    harness: EnrollmentHarness, tmp_path: Path
) -> None:
    creds = await _enroll_device(harness, tmp_path / "dev")
    device = harness.store.get_device(creds.device_id)
    assert device is not None and device.status == DeviceStatus.ACTIVE and device.name == "pi-1"
    assert device.cert_fingerprint == creds.fingerprint
    assert device.cert_fingerprint == cert_fingerprint(creds.cert_path.read_bytes())
    assert device.node_id == creds.node_id and device.enrolled_with is not None
    assert harness.token_uses() == {device.enrolled_with: 1}
    assert (creds.device_port, creds.device_target) == (DEVICE_PORT, f"127.0.0.1:{DEVICE_PORT}")

    cert = x509.load_pem_x509_certificate(creds.cert_path.read_bytes())
    key = creds.private_key()
    assert cert.public_key() == key.public_key() and key.curve.name == "secp256r1"
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(creds.ca_path.read_bytes()))
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert cn == creds.device_id and san.get_values_for_type(x509.DNSName) == [creds.device_id]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=80) < lifetime < dt.timedelta(days=100)

    for secret in (creds.key_path, creds.ssh_key_path):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(creds.folder.stat().st_mode) == 0o700
    assert load_credentials(tmp_path / "dev") == creds
    assert (
        json.loads((creds.folder / "enrollment.json").read_text())["device_id"] == creds.device_id
    )


async def test_a_second_enroll_needs_force(harness: EnrollmentHarness, tmp_path: Path) -> None:
    first = await _enroll_device(harness, tmp_path / "dev")
    first_key = first.private_key().public_key()
    with pytest.raises(EnrollError, match="already enrolled"):
        await _enroll_device(harness, tmp_path / "dev")
    issued = harness.tokens.create()
    ca = harness.paths.ca_cert.read_bytes()
    second = await asyncio.to_thread(
        enroll, harness.target, issued.token, ca, data_dir=tmp_path / "dev", force=True
    )
    assert second.device_id != first.device_id
    assert second.private_key().public_key() != first_key  # a new key, not the old one


async def test_flower_supernode_key_files_load_with_flowers_loaders(
    harness: EnrollmentHarness, tmp_path: Path
) -> None:
    """The same key, in OpenSSH format: what flower-supernode and `flwr supernode register` read."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature

    creds = await _enroll_device(harness, tmp_path / "dev")
    # as flower_supernode._try_setup_client_authentication loads --auth-supernode-private-key
    ssh_key = serialization.load_ssh_private_key(creds.ssh_key_path.read_bytes(), None)
    assert isinstance(ssh_key, ec.EllipticCurvePrivateKey)
    assert ssh_key.private_numbers() == creds.private_key().private_numbers()
    # as `flwr supernode register flower.pub` loads the public key
    registered = bytes_to_public_key(try_load_public_key(creds.ssh_public_key_path))
    assert registered == creds.private_key().public_key()
    sig = ssh_key.sign(b"timestamp", ec.ECDSA(hashes.SHA256()))
    assert verify_signature(registered, b"timestamp", sig)


# -- refusals: each a real call, a stated status, no side effects -----------------


@dataclass(frozen=True)
class Case:
    name: str
    status: grpc.StatusCode
    audit_reason: str | None  # what the audit log says (the wire says less)
    prepare: Callable[[EnrollmentHarness], Awaitable[enrollment_pb2.EnrollRequest]]
    per_source: int = 50


async def _expired(h: EnrollmentHarness) -> enrollment_pb2.EnrollRequest:
    issued = h.tokens.create(ttl_s=60)
    h.clock.now += 61
    return _request(issued.token)


async def _used_twice(h: EnrollmentHarness) -> enrollment_pb2.EnrollRequest:
    issued = h.tokens.create(uses=1)
    reply = await h.call(_request(issued.token))  # the first use succeeds
    assert reply.device_id
    return _request(issued.token)


async def _wrong(h: EnrollmentHarness) -> enrollment_pb2.EnrollRequest:
    issued = h.tokens.create()
    head, _, secret = issued.token.rpartition(".")
    return _request(f"{head}.{secret[::-1]}")


async def _unknown(h: EnrollmentHarness) -> enrollment_pb2.EnrollRequest:
    h.tokens.create()
    return _request("fdg1.0000000000000000." + "A" * 43)


async def _malformed(h: EnrollmentHarness) -> enrollment_pb2.EnrollRequest:
    h.tokens.create()
    return _request("let-me-in")


async def _revoked(h: EnrollmentHarness) -> enrollment_pb2.EnrollRequest:
    issued = h.tokens.create()
    h.tokens.revoke(issued.id)
    return _request(issued.token)


async def _rsa_csr(h: EnrollmentHarness) -> enrollment_pb2.EnrollRequest:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _request(h.tokens.create().token, csr_pem(rsa_key))


async def _p384_csr(h: EnrollmentHarness) -> enrollment_pb2.EnrollRequest:
    return _request(h.tokens.create().token, csr_pem(ec.generate_private_key(ec.SECP384R1())))


async def _bad_signature_csr(h: EnrollmentHarness) -> enrollment_pb2.EnrollRequest:
    csr = x509.load_pem_x509_csr(csr_pem(p256_key()))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the signature's s value
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    return _request(h.tokens.create().token, tampered)


async def _not_a_csr(h: EnrollmentHarness) -> enrollment_pb2.EnrollRequest:
    return _request(h.tokens.create().token, key_pem(p256_key()))  # a key, of all things


async def _bad_name(h: EnrollmentHarness) -> enrollment_pb2.EnrollRequest:
    return _request(h.tokens.create().token, name="pi\x1b[31m" + "x" * 100)


async def _flood(h: EnrollmentHarness) -> enrollment_pb2.EnrollRequest:
    for _ in range(3):  # the cap is 3 per source: spend it on guesses
        with pytest.raises(grpc.aio.AioRpcError):
            await h.call(_request("fdg1.0000000000000000." + "A" * 43))
    return _request(h.tokens.create().token)  # a good token, but over the cap


async def _huge(h: EnrollmentHarness) -> enrollment_pb2.EnrollRequest:
    return _request(h.tokens.create().token, b"-----BEGIN" + b"A" * (100 * 1024))


CASES = [
    Case("expired token", grpc.StatusCode.UNAUTHENTICATED, "token_expired", _expired),
    Case(
        "one-time token used twice", grpc.StatusCode.UNAUTHENTICATED, "token_used_up", _used_twice
    ),
    Case("wrong token", grpc.StatusCode.UNAUTHENTICATED, "token_wrong", _wrong),
    Case("unknown token", grpc.StatusCode.UNAUTHENTICATED, "token_unknown", _unknown),
    Case("malformed token", grpc.StatusCode.UNAUTHENTICATED, "token_malformed", _malformed),
    Case("revoked token", grpc.StatusCode.UNAUTHENTICATED, "token_revoked", _revoked),
    Case("CSR with an RSA key", grpc.StatusCode.INVALID_ARGUMENT, "bad_key", _rsa_csr),
    Case("CSR with a P-384 key", grpc.StatusCode.INVALID_ARGUMENT, "bad_key", _p384_csr),
    Case(
        "CSR with a bad signature",
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad_signature",
        _bad_signature_csr,
    ),
    Case("not a CSR", grpc.StatusCode.INVALID_ARGUMENT, "bad_csr", _not_a_csr),
    Case("control characters in the name", grpc.StatusCode.INVALID_ARGUMENT, "bad_name", _bad_name),
    Case(
        "enrollment flood beyond the cap",
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        None,
        _flood,
        per_source=3,
    ),
    Case("request over 64 KiB", grpc.StatusCode.RESOURCE_EXHAUSTED, None, _huge),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_refused_enrollments_leave_nothing_behind(
    case: Case, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedge.audit")
    h = await start_harness(tmp_path / "coordinator", per_source=case.per_source)
    try:
        request = await case.prepare(h)
        devices, uses = h.device_count(), h.token_uses()
        caplog.clear()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await h.call(request)
        assert e.value.code() == case.status, e.value.details()
        assert h.device_count() == devices, "a refused enrollment added a device"
        assert h.token_uses() == uses, "a refused enrollment spent a token use"
        if case.status == grpc.StatusCode.UNAUTHENTICATED:
            assert e.value.details() == REFUSED  # every token refusal looks the same outside
        if case.audit_reason:
            assert case.audit_reason in caplog.text
    finally:
        await h.close()


async def test_racing_devices_cannot_share_a_one_time_token(harness: EnrollmentHarness) -> None:
    issued = harness.tokens.create(uses=1)
    results = await asyncio.gather(
        *(harness.call(_request(issued.token, name=f"d{i}")) for i in range(6)),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, enrollment_pb2.EnrollReply)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1 and len(refused) == 5
    assert {r.code() for r in refused} == {grpc.StatusCode.UNAUTHENTICATED}
    assert harness.device_count() == 1


# -- device identity on the mutual-TLS port ---------------------------------------


class _Probe(enrollment_pb2_grpc.EnrollmentServicer):
    """Any device RPC: identify the caller, answer its id (reuses Enroll's message shapes)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def Enroll(self, request, context):
        device = await require_device(context, self.store)
        if request.csr_pem:  # here: a result signature for task `device_name`, as PushResult has
            try:
                verify_result(
                    peer_cert_pem(context.auth_context()),
                    request.csr_pem,
                    run_id=RUN,
                    round=ROUND,
                    task_id=request.device_name,
                    payload_sha256=PAYLOAD_SHA,
                )
            except SignatureInvalid as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.reason)
        return enrollment_pb2.EnrollReply(device_id=device.id)


async def _probe(port: int, creds: grpc.ChannelCredentials) -> str:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        reply = await enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(
            enrollment_pb2.EnrollRequest(), timeout=5
        )
        return reply.device_id


def _client_creds(
    ca: Path, key: ec.EllipticCurvePrivateKey, cert: bytes
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(ca.read_bytes(), key_pem(key), cert)


async def test_result_signature_checked_with_the_connected_devices_certificate(
    harness: EnrollmentHarness, tmp_path: Path
) -> None:
    a = await _enroll_device(harness, tmp_path / "a", "pi-a")
    b = await _enroll_device(harness, tmp_path / "b", "pi-b")
    server = grpc.aio.server()
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(_Probe(harness.store), server)
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(harness.paths, require_client_auth=True)
    )
    await server.start()

    def signed(creds: DeviceCredentials, task: str) -> enrollment_pb2.EnrollRequest:
        sig = sign_result(
            creds.private_key(), run_id=RUN, round=ROUND, task_id=task, payload_sha256=PAYLOAD_SHA
        )
        return enrollment_pb2.EnrollRequest(device_name=task, csr_pem=sig)

    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", a.channel_credentials()) as channel:
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            assert (await stub.Enroll(signed(a, "task-a"), timeout=5)).device_id == a.device_id
            for request in (signed(b, "task-a"), signed(a, "task-b")):
                request.device_name = "task-a"  # B's signature, or A's for another task
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Enroll(request, timeout=5)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert e.value.details() == "mismatch"
    finally:
        await server.stop(None)


async def test_device_identity_on_the_mtls_port(harness: EnrollmentHarness, tmp_path: Path) -> None:
    creds = await _enroll_device(harness, tmp_path / "dev")
    server = grpc.aio.server()
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(_Probe(harness.store), server)
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(harness.paths, require_client_auth=True)
    )
    await server.start()
    ca = harness.paths.ca_cert
    try:
        # the enrolled device is accepted, and identified by its certificate
        assert await _probe(port, creds.channel_credentials()) == creds.device_id

        # no client certificate: the TLS handshake itself fails
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _probe(port, grpc.ssl_channel_credentials(ca.read_bytes()))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE

        # a certificate from another coordinator's CA: the handshake fails
        other = ensure_server_tls(tmp_path / "other-coordinator")
        key = p256_key()
        foreign = sign_csr(csr_pem(key), other, device_id=creds.device_id)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _probe(port, _client_creds(ca, key, foreign))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE

        # our CA, but no enrolled device holds it (e.g. the device's previous certificate)
        key = p256_key()
        stray = sign_csr(csr_pem(key), harness.paths, device_id=creds.device_id)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _probe(port, _client_creds(ca, key, stray))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert harness.device_count() == 1

        # revoked mid-session: same channel, the next call is refused, no restart
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{port}", creds.channel_credentials()
        ) as channel:
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            reply = await stub.Enroll(enrollment_pb2.EnrollRequest(), timeout=5)
            assert reply.device_id == creds.device_id
            result = await asyncio.to_thread(
                CliRunner().invoke,
                app,
                [
                    "coordinator",
                    "devices",
                    "revoke",
                    creds.device_id[:10],
                    "--state",
                    str(harness.state),
                ],
            )
            assert result.exit_code == 0, result.output
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Enroll(enrollment_pb2.EnrollRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.stop(None)
    assert harness.store.get_device(creds.device_id).status == DeviceStatus.REVOKED


# -- secrets stay secret -------------------------------------------------------------


def _secret_strings(creds: DeviceCredentials, tokens: list[str]) -> list[str]:
    """Everything that must never show up in a log or on a terminal (besides `token create`)."""
    key = creds.private_key()
    out = list(tokens)
    out += [t.rpartition(".")[2] for t in tokens]  # the secret part alone
    for pem in (creds.key_path.read_text(), creds.ssh_key_path.read_text()):
        out += [line for line in pem.splitlines() if line and not line.startswith("-----")]
    scalar = key.private_numbers().private_value
    out += [str(scalar), f"{scalar:x}", f"{scalar:064x}"]
    return out


async def test_enrollment_logs_and_output_hold_no_secrets(
    harness: EnrollmentHarness,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    runner = CliRunner()
    state = str(harness.state)
    made = runner.invoke(
        app, ["coordinator", "token", "create", "--state", state, "--label", "lab"]
    )
    assert made.exit_code == 0, made.output
    token = made.stdout.strip()
    assert token.startswith("fdg1.") and token not in made.stderr
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")

    def no_chmod(*args, **kwargs):
        raise AssertionError("key files must be created 0600, never chmod-ed")

    monkeypatch.setattr(os, "chmod", no_chmod)
    old_umask = os.umask(0)  # the mode must come from os.open, not from a friendly umask
    try:
        args = [
            "enroll",
            "--coordinator",
            harness.target,
            "--ca",
            str(harness.paths.ca_cert),
            "--data",
            str(tmp_path / "dev"),
            "--name",
            "pi-secret",
        ]
        refused = await asyncio.to_thread(runner.invoke, app, [*args, "--token", wrong])
        assert refused.exit_code == 2, refused.output
        enrolled = await asyncio.to_thread(
            runner.invoke, app, args, env={"FEDGE_ENROLL_TOKEN": token}
        )
        assert enrolled.exit_code == 0, enrolled.output
    finally:
        os.umask(old_umask)
    creds = load_credentials(tmp_path / "dev")
    assert creds.device_id in enrolled.stdout
    for secret_file in (creds.key_path, creds.ssh_key_path):
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    listed = runner.invoke(app, ["coordinator", "devices", "list", "--state", state, "--json"])
    shown = runner.invoke(
        app, ["coordinator", "devices", "show", creds.device_id, "--state", state]
    )
    tokens = runner.invoke(app, ["coordinator", "token", "list", "--state", state, "--json"])
    assert json.loads(listed.stdout)[0]["id"] == creds.device_id
    assert json.loads(shown.stdout)["cert_fingerprint"] == creds.fingerprint
    assert json.loads(tokens.stdout)[0]["state"] == "used up"

    fd = capfd.readouterr()
    records = "\n".join(
        f"{r.name} {r.getMessage()} {r.args!r} {r.__dict__!r}" for r in caplog.records
    )
    assert "enrolled" in caplog.text and "token_wrong" in caplog.text  # the audit trail is there
    seen = "\n".join(
        [
            records,
            caplog.text,
            made.stderr,
            refused.stdout,
            refused.stderr,
            enrolled.stdout,
            enrolled.stderr,
            listed.stdout,
            shown.stdout,
            tokens.stdout,
            fd.out,
            fd.err,
        ]
    )
    for secret in _secret_strings(creds, [token, wrong]):
        assert secret not in seen, "a secret leaked into logs or output"
