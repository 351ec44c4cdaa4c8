"""The `fedge.v1.Enrollment` service: a one-time token and a CSR in, a device certificate out.

Served on its own port with server-authenticated TLS only: the device has no
certificate yet, and grpcio does not request a client certificate on a port
with *optional* client auth (docs/coordinator.md), so enrollment cannot share
the mutual-TLS device port. The HTTP API offers the same call as
`POST /v1/enroll` (server/http_enroll.py) for devices without gRPC; both
call one `Enroller`, which holds the steps below.

One call, in this order, cheapest refusal first:

1. rate limit per source address and in total  -> RESOURCE_EXHAUSTED
2. request shape and CSR (EC P-256, self-signature valid, SHA-256, sane
   subject, size caps)                          -> INVALID_ARGUMENT
3. token (malformed, unknown, wrong, expired, used up, revoked: all answered
   alike; the reason goes to the audit log)     -> UNAUTHENTICATED
4. the coordinator picks the device id, its CA signs the certificate
   (CN and DNS SAN = device id, `DEVICE_CERT_VALIDITY`)
5. one transaction spends a use of the token and adds the device with its
   certificate fingerprint; a race lost on the token's last use
                                                -> UNAUTHENTICATED

Nothing is written before step 5, and step 5 is all or nothing, so a refused
call leaves no device row and no spent use. `validate_enroll_request` is pure
(no store, no I/O) so it can be fuzzed directly.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass, field

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fedge.common.errors import ReasonError
from fedge.server.audit import audit
from fedge.server.rate_limit import RateLimiter, source_of
from fedge.server.store import Store, StoreError
from fedge.server.tls import TlsError, TlsPaths, cert_fingerprint, server_credentials, sign_csr
from fedge.server.tokens import TokenBook, TokenRefused
from fedge.v1 import enrollment_pb2, enrollment_pb2_grpc

log = logging.getLogger(__name__)

DEVICE_CERT_VALIDITY = dt.timedelta(days=90)
"""Short-ish: a lost device's certificate dies on its own even if nobody revokes it."""
MAX_CSR_BYTES = 8 * 1024
"""A P-256 CSR PEM is about 400 bytes; 8 KiB leaves room for a verbose subject."""
MAX_NAME_CHARS = 64
MAX_SUBJECT_ATTRIBUTES = 8
MAX_SUBJECT_VALUE_CHARS = 64
MAX_REQUEST_BYTES = 64 * 1024
"""gRPC refuses bigger Enroll messages before they are parsed."""

_REFUSED_TOKEN = "enrollment token refused"


class EnrollmentRejected(ReasonError, ValueError):
    """An enrollment request is malformed; `reason` is a stable code, `detail` says what."""

    what = "enrollment rejected"


@dataclass(frozen=True)
class ValidEnrollment:
    """A request whose shape and CSR checked out; the token is not checked yet."""

    token: str = field(repr=False)
    csr_pem: bytes = field(repr=False)
    name: str = ""


def validate_enroll_request(request: enrollment_pb2.EnrollRequest) -> ValidEnrollment:
    """Check a request's name and CSR; raises `EnrollmentRejected` and nothing else."""
    name = request.device_name.strip()
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise EnrollmentRejected("bad_name", f"at most {MAX_NAME_CHARS} printable characters")
    validate_csr(request.csr_pem)
    return ValidEnrollment(token=request.token, csr_pem=bytes(request.csr_pem), name=name)


def validate_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """A CSR fit to sign: one PEM, EC P-256, SHA-256, valid self-signature, sane subject."""
    if not csr_pem:
        raise EnrollmentRejected("bad_csr", "no CSR")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise EnrollmentRejected("bad_csr", f"CSR over {MAX_CSR_BYTES} bytes")
    if not csr_pem.isascii() or csr_pem.count(b"-----BEGIN") != 1:
        raise EnrollmentRejected("bad_csr", "expected exactly one PEM certificate request")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        key = csr.public_key()
        algorithm = csr.signature_hash_algorithm
        signed = csr.is_signature_valid
        subject = list(csr.subject)
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as e:
        # found by fuzzing: a damaged version field raises InvalidVersion, not ValueError
        raise EnrollmentRejected("bad_csr", f"unreadable CSR: {type(e).__name__}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise EnrollmentRejected("bad_key", "device keys must be EC P-256")
    if not isinstance(algorithm, hashes.SHA256):
        raise EnrollmentRejected("bad_csr", "the CSR must be signed with ECDSA over SHA-256")
    if not signed:
        raise EnrollmentRejected("bad_signature", "the CSR's signature does not verify")
    if len(subject) > MAX_SUBJECT_ATTRIBUTES:
        raise EnrollmentRejected("bad_subject", "too many subject attributes")
    for attr in subject:
        value = attr.value
        if not isinstance(value, str):
            raise EnrollmentRejected("bad_subject", "subject values must be text")
        if len(value) > MAX_SUBJECT_VALUE_CHARS or not value.isprintable():
            raise EnrollmentRejected("bad_subject", "subject values must be short and printable")
    return csr


class EnrollmentRefused(Exception):
    """An `Enroll` call refused; `code` is the gRPC status name (each transport maps it)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


class Enroller:
    """The enrollment steps, apart from any transport: the gRPC port and the HTTP API's
    `POST /v1/enroll` share one (and so one rate limit and one token book)."""

    def __init__(
        self,
        store: Store,
        tls_paths: TlsPaths,
        *,
        device_port: int,
        tokens: TokenBook | None = None,
        limiter: RateLimiter | None = None,
        cert_validity: dt.timedelta = DEVICE_CERT_VALIDITY,
    ) -> None:
        self._store = store
        self._paths = tls_paths
        self._tokens = tokens or TokenBook(store)
        self._limiter = limiter or RateLimiter()
        self._validity = cert_validity
        self._ca_pem = tls_paths.ca_cert.read_bytes()
        self.device_port = device_port

    def enroll(
        self, request: enrollment_pb2.EnrollRequest, source: str
    ) -> enrollment_pb2.EnrollReply:
        """One enrollment from `source` (the rate-limit key); raises `EnrollmentRefused`."""
        if not self._limiter.allow(source):
            # logged at debug, not audited: a flood would flood the audit log
            log.debug("enrollment attempt over the rate limit from %s", source)
            raise EnrollmentRefused(
                "RESOURCE_EXHAUSTED", "too many enrollment attempts; retry later"
            )
        try:
            valid = validate_enroll_request(request)
        except EnrollmentRejected as e:
            audit("enroll_refused", reason=e.reason, peer=source)
            raise EnrollmentRefused("INVALID_ARGUMENT", str(e)) from None
        try:
            checked = self._tokens.check(valid.token)
        except TokenRefused as e:
            audit("enroll_refused", reason=f"token_{e.reason}", token_id=e.token_id, peer=source)
            raise EnrollmentRefused("UNAUTHENTICATED", _REFUSED_TOKEN) from None
        device_id = uuid.uuid4().hex
        try:
            cert_pem = sign_csr(
                valid.csr_pem, self._paths, device_id=device_id, validity=self._validity
            )
        except TlsError as e:  # validate_csr already checked what sign_csr checks
            audit("enroll_refused", reason="bad_csr", peer=source)
            raise EnrollmentRefused("INVALID_ARGUMENT", f"CSR refused: {e}") from None
        try:
            device = self._store.enroll_device(
                checked.id,
                checked.secret_hash,
                device_id=device_id,
                name=valid.name or f"device-{device_id[:8]}",
                cert_fingerprint=cert_fingerprint(cert_pem),
            )
        except StoreError as e:
            if e.reason != "token_refused":
                raise
            audit("enroll_refused", reason="token_spent_in_race", token_id=checked.id, peer=source)
            raise EnrollmentRefused("UNAUTHENTICATED", _REFUSED_TOKEN) from None
        audit(
            "enrolled",
            device_id=device.id,
            node_id=device.node_id,
            name=device.name,
            token_id=checked.id,
            label=checked.label,
            fingerprint=device.cert_fingerprint,
            peer=source,
        )
        return enrollment_pb2.EnrollReply(
            device_id=device.id,
            certificate_pem=cert_pem,
            ca_chain_pem=self._ca_pem,
            device_port=self.device_port,
            node_id=device.node_id,
        )


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):
    """grpc.aio servicer for `Enroll`: an `Enroller`, its refusals as gRPC status codes."""

    def __init__(self, enroller: Enroller) -> None:
        self.enroller = enroller

    @property
    def device_port(self) -> int:
        return self.enroller.device_port

    async def Enroll(
        self, request: enrollment_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.EnrollReply:
        try:
            return self.enroller.enroll(request, source_of(context.peer()))
        except EnrollmentRefused as e:
            await context.abort(grpc.StatusCode[e.code], e.message)
            raise  # abort raises; this line only tells the type checker


async def start_enrollment_server(
    service: EnrollmentService,
    tls_paths: TlsPaths,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
) -> tuple[grpc.aio.Server, int]:
    """Bind and start a grpc.aio server for `service` (server TLS only); returns it and its port."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ]
    )
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(service, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_secure_port(address, server_credentials(tls_paths))
    if not bound:
        raise OSError(f"cannot bind the enrollment port {address}")
    await server.start()
    return server, bound
