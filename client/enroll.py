"""Device side of enrollment: make a key here, trade a token and a CSR for a certificate.

The private key is generated on the device and never leaves it: only the CSR
(public key plus a self-signature proving possession) is sent, over TLS that
authenticates the coordinator with the CA file the operator handed out. Key
files are created with mode 0600 from the first byte (`os.open(..., 0o600)`
on a fresh temporary name, then renamed), never chmod-ed afterwards.

The identity lives in `<data>/identity/` (mode 0700):

    device.key      EC P-256 private key, PKCS#8 PEM (0600): mTLS and result signing
    device.pem      the device certificate the coordinator signed (CN = device id)
    ca.pem          the coordinator's CA: trust anchor for both ports
    enrollment.json device id, node id, coordinator host, device port, fingerprint
    flower.key      the same private key in OpenSSH format (0600), for
                    `flower-supernode --auth-supernode-private-key`
    flower.pub      its public key in OpenSSH format, for `flwr supernode register`

`DeviceCredentials` is what the edge runtime loads to dial the device port with
mutual TLS and to sign results (`fedge.common.signing.sign_result`).

Two ways to the coordinator, the same `EnrollRequest` and `EnrollReply`:
its gRPC enrollment port (`HOST:PORT`), or its HTTP API
(`https://HOST:PORT`, `POST /v1/enroll`, server/http_enroll.py) with the
standard library only, so a device that only predicts installs no grpcio.
gRPC is imported only when a gRPC call is made.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.message import DecodeError

from fedge.common.atomic_file import atomic_write
from fedge.common.contract import ENROLL_HTTP_PATH, PROTOBUF_MEDIA_TYPE
from fedge.v1 import enrollment_pb2

if TYPE_CHECKING:
    import grpc

HTTPS_PREFIX = "https://"
MAX_REPLY_BYTES = 64 * 1024
GRPC_CODE_BY_HTTP_STATUS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
    404: "UNIMPLEMENTED", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE",
}
"""The HTTP API's enrollment refusals as the gRPC codes `fedge enroll` maps to exit codes."""
IDENTITY_DIR = "identity"
KEY_FILE = "device.key"
CERT_FILE = "device.pem"
CA_FILE = "ca.pem"
META_FILE = "enrollment.json"
SSH_KEY_FILE = "flower.key"
SSH_PUB_FILE = "flower.pub"


class EnrollError(RuntimeError):
    """Enrollment did not happen; `code` is the gRPC status name, or a local reason."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class DeviceCredentials:
    """An enrolled device's identity on disk, as the edge runtime needs it."""

    folder: Path
    device_id: str
    node_id: int
    coordinator_host: str
    device_port: int
    fingerprint: str

    @property
    def key_path(self) -> Path:
        return self.folder / KEY_FILE

    @property
    def cert_path(self) -> Path:
        return self.folder / CERT_FILE

    @property
    def ca_path(self) -> Path:
        return self.folder / CA_FILE

    @property
    def ssh_key_path(self) -> Path:
        return self.folder / SSH_KEY_FILE

    @property
    def ssh_public_key_path(self) -> Path:
        return self.folder / SSH_PUB_FILE

    @property
    def device_target(self) -> str:
        """HOST:PORT of the coordinator's mutual-TLS device port."""
        return _target(self.coordinator_host, self.device_port)

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        return load_private_key(self.key_path)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Mutual-TLS credentials: trust the coordinator's CA, present the device certificate."""
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_path.read_bytes(),
            private_key=self.key_path.read_bytes(),
            certificate_chain=self.cert_path.read_bytes(),
        )


def enroll(
    coordinator: str,
    token: str,
    ca_pem: bytes,
    *,
    data_dir: str | os.PathLike[str],
    name: str = "",
    timeout_s: float = 30.0,
    force: bool = False,
) -> DeviceCredentials:
    """Enroll this device with the coordinator: its gRPC enrollment port (`HOST:PORT`) or
    its HTTP API (`https://HOST:PORT`).

    Reuses a key left by an earlier failed attempt; refuses to replace an
    existing enrollment unless `force` (which also makes a new key).
    Raises `EnrollError` (its message never contains the token).
    """
    if coordinator.startswith("http://"):
        raise EnrollError("bad_target", "enrollment sends a token: use https://HOST:PORT (the "
                          "HTTP API with --http-auth) or the gRPC enrollment HOST:PORT")
    host, _port = split_host_port(coordinator.removeprefix(HTTPS_PREFIX).rstrip("/"))
    folder = identity_folder(data_dir)
    if (folder / META_FILE).exists():
        if not force:
            current = load_credentials(data_dir)
            raise EnrollError(
                "already_enrolled",
                f"this data folder is already enrolled as device {current.device_id}; "
                "pass --force to enroll again with a new key",
            )
        for stale in (META_FILE, CERT_FILE, KEY_FILE, SSH_KEY_FILE, SSH_PUB_FILE):
            (folder / stale).unlink(missing_ok=True)
    key = ensure_private_key(folder / KEY_FILE)
    request = enrollment_pb2.EnrollRequest(token=token, csr_pem=build_csr(key), device_name=name)
    if coordinator.startswith(HTTPS_PREFIX):
        reply = _post_enroll(coordinator, ca_pem, request, timeout_s)
    else:
        reply = _call_enroll(coordinator, ca_pem, request, timeout_s)
    cert = _check_reply(reply, key, ca_pem)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    write_public(folder / CERT_FILE, reply.certificate_pem)
    # keep the CA the operator handed out (it authenticated this call), not the reply's copy
    write_public(folder / CA_FILE, ca_pem)
    write_private(folder / SSH_KEY_FILE, openssh_private_key(key))
    write_public(folder / SSH_PUB_FILE, openssh_public_key(key.public_key()))
    meta = {
        "device_id": reply.device_id,
        "node_id": reply.node_id,
        "coordinator_host": host,
        "device_port": reply.device_port,
        "fingerprint": fingerprint,
        "enrolled_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    write_public(folder / META_FILE, json.dumps(meta, indent=1).encode())  # the commit
    return load_credentials(data_dir)


def load_credentials(data_dir: str | os.PathLike[str]) -> DeviceCredentials:
    """The enrolled identity in `data_dir`; raises `EnrollError("not_enrolled")` if none."""
    folder = Path(data_dir).expanduser() / IDENTITY_DIR
    try:
        meta = json.loads((folder / META_FILE).read_text())
        creds = DeviceCredentials(
            folder=folder,
            device_id=str(meta["device_id"]),
            node_id=int(meta.get("node_id", 0)),
            coordinator_host=str(meta["coordinator_host"]),
            device_port=int(meta["device_port"]),
            fingerprint=str(meta.get("fingerprint", "")),
        )
    except FileNotFoundError:
        raise EnrollError(
            "not_enrolled", f"{folder} holds no enrollment; run `fedge enroll`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EnrollError("not_enrolled", f"{folder / META_FILE} is damaged: {e}") from None
    for path in (creds.key_path, creds.cert_path, creds.ca_path):
        if not path.is_file():
            raise EnrollError("not_enrolled", f"{path} is missing; enroll again")
    return creds


def identity_folder(data_dir: str | os.PathLike[str]) -> Path:
    """`<data>/identity`, created 0700 (mkdir's mode, so never briefly wider)."""
    root = Path(data_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder = root / IDENTITY_DIR
    folder.mkdir(exist_ok=True, mode=0o700)
    return folder


def ensure_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the device key at `path`, or generate an EC P-256 key and write it 0600."""
    if path.exists():
        return load_private_key(path)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(path, pem)
    return key


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise EnrollError("bad_key", f"{path} is not a usable private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise EnrollError("bad_key", f"{path} is not an EC P-256 private key")
    return key


def build_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PEM CSR for `key`; the subject is a placeholder the coordinator replaces."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedge device")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def openssh_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key in OpenSSH format, which `flower-supernode --auth-supernode-private-key` reads."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def openssh_public_key(key: ec.EllipticCurvePublicKey) -> bytes:
    """`ecdsa-sha2-nistp256 AAAA... fedge-device`, which `flwr supernode register` reads."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + b" fedge-device\n"


def write_private(path: Path, data: bytes) -> None:
    """Write a secret atomically with mode 0600 from creation (umask can only narrow it)."""
    atomic_write(path, data, 0o600, umask_narrows=True)


def write_public(path: Path, data: bytes) -> None:
    atomic_write(path, data, 0o644, umask_narrows=True)


def split_host_port(target: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); raises `EnrollError("bad_target")`."""
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EnrollError("bad_target", f"expected HOST:PORT, got {target!r}")
    return host, int(port)


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _call_enroll(
    coordinator: str, ca_pem: bytes, request: enrollment_pb2.EnrollRequest, timeout_s: float
) -> enrollment_pb2.EnrollReply:
    import grpc

    from fedge.v1 import enrollment_pb2_grpc

    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with grpc.secure_channel(coordinator, credentials) as channel:
        stub = enrollment_pb2_grpc.EnrollmentStub(channel)
        try:
            return stub.Enroll(request, timeout=timeout_s)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            details = e.details() if hasattr(e, "details") else ""
            raise EnrollError(code.name, f"{code.name}: {details}") from None


def _post_enroll(
    url: str, ca_pem: bytes, request: enrollment_pb2.EnrollRequest, timeout_s: float
) -> enrollment_pb2.EnrollReply:
    """`POST <url>/v1/enroll` over HTTPS trusting only `ca_pem`; errors as gRPC status names."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.path.strip("/") or parsed.query:
        raise EnrollError("bad_target", f"expected https://HOST:PORT, got {url!r}")
    try:
        context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError):
        raise EnrollError("bad_ca", "--ca is not a PEM certificate") from None
    http_request = urllib.request.Request(
        f"{url.rstrip('/')}{ENROLL_HTTP_PATH}", data=request.SerializeToString(), method="POST",
        headers={"Content-Type": PROTOBUF_MEDIA_TYPE, "Accept": PROTOBUF_MEDIA_TYPE},
    )
    try:
        with urllib.request.urlopen(http_request, timeout=timeout_s, context=context) as answer:
            body = answer.read(MAX_REPLY_BYTES + 1)
    except urllib.error.HTTPError as e:
        code = GRPC_CODE_BY_HTTP_STATUS.get(e.code, "UNKNOWN")
        raise EnrollError(code, f"{code}: HTTP {e.code}: {_detail(e)}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise EnrollError("UNAVAILABLE", f"UNAVAILABLE: {url}: {reason}") from None
    reply = enrollment_pb2.EnrollReply()
    try:
        if len(body) > MAX_REPLY_BYTES:
            raise ValueError("too large")
        reply.ParseFromString(body)
    except (ValueError, DecodeError):
        raise EnrollError("bad_reply", "the coordinator's answer is not an EnrollReply") from None
    return reply


def _detail(error: urllib.error.HTTPError) -> str:
    """The `detail` of the API's JSON refusal, or its reason phrase."""
    try:
        detail = json.loads(error.read(4096)).get("detail")
    except (ValueError, AttributeError, OSError):
        detail = None
    return str(detail) if detail else str(error.reason)


def _check_reply(
    reply: enrollment_pb2.EnrollReply, key: ec.EllipticCurvePrivateKey, ca_pem: bytes
) -> x509.Certificate:
    """The certificate must be for our key, issued by the trusted CA, and name our new id."""
    try:
        cert = x509.load_pem_x509_certificate(reply.certificate_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise EnrollError("bad_reply", "the coordinator sent no certificate from its CA") from None
    if cert.public_key() != key.public_key():
        raise EnrollError("bad_reply", "the certificate is not for this device's key")
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if not reply.device_id or cns != [reply.device_id] or not 0 < reply.device_port < 65536:
        raise EnrollError("bad_reply", "the certificate or port does not match the reply")
    return cert
