"""The coordinator's CA and server certificate, proven with real gRPC over TLS on loopback."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedge.server.tls import (
    SERVER_VALIDITY,
    TlsError,
    TlsPaths,
    cert_fingerprint,
    ensure_server_tls,
    server_credentials,
    sign_csr,
)
from fedge.v1 import coordinator_pb2, coordinator_pb2_grpc


class _HeartbeatOnly(coordinator_pb2_grpc.CoordinatorServicer):
    """Answers Heartbeat; records the client certificate's common name, if any."""

    def __init__(self) -> None:
        self.peer_names: list[str] = []

    async def Heartbeat(self, request, context):
        names = context.auth_context().get("x509_common_name", [])
        self.peer_names.extend(n.decode() for n in names)
        return coordinator_pb2.HeartbeatReply(heartbeat_interval_s=5.0, task_available=True)


async def _serve(
    paths: TlsPaths, *, mtls: bool = False
) -> tuple[grpc.aio.Server, int, _HeartbeatOnly]:
    server = grpc.aio.server()
    servicer = _HeartbeatOnly()
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(paths, require_client_auth=mtls)
    )
    assert port > 0
    await server.start()
    return server, port, servicer


async def _heartbeat(
    target: str, creds: grpc.ChannelCredentials, **options
) -> coordinator_pb2.HeartbeatReply:
    async with grpc.aio.secure_channel(target, creds, options=list(options.items())) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        return await stub.Heartbeat(coordinator_pb2.HeartbeatRequest(session_token="s"), timeout=5)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_creates_ca_and_server_cert_with_private_keys(tmp_path: Path) -> None:
    paths = ensure_server_tls(tmp_path, ("localhost", "127.0.0.1", "coord.example"))
    for key in (paths.ca_key, paths.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        k = serialization.load_pem_private_key(key.read_bytes(), None)
        assert isinstance(k, ec.EllipticCurvePrivateKey) and k.curve.name == "secp256r1"
    assert stat.S_IMODE(paths.ca_cert.parent.stat().st_mode) == 0o700
    ca, server = _load(paths.ca_cert), _load(paths.server_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > dt.timedelta(days=3000)
    server.verify_directly_issued_by(ca)
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "coord.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_later_starts_reuse_and_reissue_only_when_needed(tmp_path: Path) -> None:
    paths = ensure_server_tls(tmp_path)
    before = {
        p: p.read_bytes()
        for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key)
    }
    again = ensure_server_tls(tmp_path)
    assert again == paths
    assert all(p.read_bytes() == b for p, b in before.items())

    # a new host name: same CA (devices keep trusting it), new server cert
    ensure_server_tls(tmp_path, ("localhost", "127.0.0.1", "10.0.0.5"))
    assert paths.ca_cert.read_bytes() == before[paths.ca_cert]
    assert paths.server_cert.read_bytes() != before[paths.server_cert]
    _load(paths.server_cert).verify_directly_issued_by(_load(paths.ca_cert))

    # close to expiry: re-issued
    current = paths.server_cert.read_bytes()
    later = dt.datetime.now(dt.UTC) + SERVER_VALIDITY - dt.timedelta(days=1)
    ensure_server_tls(tmp_path, ("localhost", "127.0.0.1", "10.0.0.5"), now=later)
    assert paths.server_cert.read_bytes() != current
    assert paths.ca_cert.read_bytes() == before[paths.ca_cert]


def test_damaged_server_key_is_replaced(tmp_path: Path) -> None:
    paths = ensure_server_tls(tmp_path)
    paths.server_key.write_bytes(b"not a key")
    ensure_server_tls(tmp_path)
    cert = _load(paths.server_cert)
    key = serialization.load_pem_private_key(paths.server_key.read_bytes(), None)
    assert cert.public_key() == key.public_key()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_grpc_over_tls_with_the_ca(tmp_path: Path, host: str) -> None:
    paths = ensure_server_tls(tmp_path)
    server, port, _ = await _serve(paths)
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=paths.ca_cert.read_bytes())
        reply = await _heartbeat(f"{host}:{port}", creds)
        assert reply.task_available and reply.heartbeat_interval_s == 5.0
    finally:
        await server.stop(None)


async def test_client_without_the_ca_is_refused(tmp_path: Path) -> None:
    paths = ensure_server_tls(tmp_path)
    other = ensure_server_tls(tmp_path / "other")  # a different coordinator's CA
    server, port, _ = await _serve(paths)
    try:
        for creds in (
            grpc.ssl_channel_credentials(),  # system roots only
            grpc.ssl_channel_credentials(root_certificates=other.ca_cert.read_bytes()),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _heartbeat(f"127.0.0.1:{port}", creds)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


def _csr(key: ec.EllipticCurvePrivateKey, cn: str = "whatever-the-device-asks") -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


async def test_sign_csr_enables_mutual_tls(tmp_path: Path) -> None:
    paths = ensure_server_tls(tmp_path)
    device_key = ec.generate_private_key(ec.SECP256R1())
    cert_pem = sign_csr(_csr(device_key), paths, device_id="dev-42")
    cert = x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(_load(paths.ca_cert))
    assert cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == "dev-42"
    assert len(cert_fingerprint(cert_pem)) == 64

    server, port, servicer = await _serve(paths, mtls=True)
    try:
        key_pem = device_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        ca = paths.ca_cert.read_bytes()
        await _heartbeat(
            f"127.0.0.1:{port}",
            grpc.ssl_channel_credentials(ca, private_key=key_pem, certificate_chain=cert_pem),
        )
        assert servicer.peer_names == ["dev-42"]  # the call is bound to the certificate
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _heartbeat(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


def test_sign_csr_refuses_bad_requests(tmp_path: Path) -> None:
    paths = ensure_server_tls(tmp_path)
    with pytest.raises(TlsError):
        sign_csr(b"garbage", paths, device_id="d")
    with pytest.raises(TlsError, match="P-256"):
        sign_csr(_csr(ec.generate_private_key(ec.SECP384R1())), paths, device_id="d")
