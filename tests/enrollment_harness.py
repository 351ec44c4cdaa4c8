"""A coordinator's enrollment side on loopback for tests: state folder, store, tokens, server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from fedge.server.enrollment_service import (
    Enroller,
    EnrollmentService,
    start_enrollment_server,
)
from fedge.server.rate_limit import RateLimiter
from fedge.server.store import Store
from fedge.server.tls import TlsPaths, ensure_server_tls
from fedge.server.tokens import TokenBook
from fedge.v1 import enrollment_pb2, enrollment_pb2_grpc

DEVICE_PORT = 9443


class FakeClock:
    """Wall time under the test's control (token expiry)."""

    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class EnrollmentHarness:
    state: Path
    paths: TlsPaths
    store: Store
    tokens: TokenBook
    clock: FakeClock
    service: EnrollmentService
    server: grpc.aio.Server
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def call(self, request: enrollment_pb2.EnrollRequest) -> enrollment_pb2.EnrollReply:
        """One Enroll over server-authenticated TLS, as a device without a certificate makes it."""
        creds = grpc.ssl_channel_credentials(root_certificates=self.paths.ca_cert.read_bytes())
        async with grpc.aio.secure_channel(self.target, creds) as channel:
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            return await stub.Enroll(request, timeout=10)

    def device_count(self) -> int:
        return len(self.store.list_devices())

    def token_uses(self) -> dict[str, int]:
        return {t.id: t.uses for t in self.store.list_enrollment_tokens()}

    async def close(self) -> None:
        await self.server.stop(None)
        self.store.close()


async def start_harness(
    state: Path, *, per_source: int = 50, total: int = 500, window_s: float = 60.0
) -> EnrollmentHarness:
    clock = FakeClock()
    paths = ensure_server_tls(state)
    store = Store.open(state / "fedge.db", clock=clock)
    tokens = TokenBook(store, clock=clock)
    service = EnrollmentService(Enroller(
        store,
        paths,
        device_port=DEVICE_PORT,
        tokens=tokens,
        limiter=RateLimiter(per_source=per_source, total=total, window_s=window_s),
    ))
    server, port = await start_enrollment_server(service, paths, host="127.0.0.1", port=0)
    return EnrollmentHarness(state, paths, store, tokens, clock, service, server, port)


def p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str = "dev") -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
