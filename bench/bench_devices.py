"""Enrolled devices for the benches: certificates from the coordinator's own CA.

A bench device must get in as a real one does (issue 14): the coordinator's
device port speaks mutual TLS and knows a device by the SHA-256 fingerprint of
its certificate. Going through the Enroll RPC for thousands of devices would
measure the enrollment rate limiter, so `enroll_devices` does what
`EnrollmentService.Enroll` does after its checks, in-process and in bulk: one
multi-use token from the `TokenBook`, an EC P-256 key and CSR per device, the
certificate signed by the state folder's CA (`fedge.server.tls.sign_csr`, the
same call enrollment makes) and `Store.enroll_device` spending one use of the
token for each. A coordinator later started on the same state folder reuses
that CA and finds the devices in its registry.

Devices are written to one JSON file (`save` / `load`) so client processes of
a bench can share them without minting again.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class BenchDevice:
    """One enrolled device: its id, key and certificate (PEM)."""

    device_id: str
    key_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)

    def credentials(self, ca_pem: bytes) -> grpc.ChannelCredentials:
        """Mutual-TLS channel credentials, as `DeviceCredentials.channel_credentials` builds."""
        return grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key


def enroll_devices(state: Path, count: int, *, label: str = "bench") -> list[BenchDevice]:
    """Enroll `count` devices into the coordinator state folder `state` (CA made if absent)."""
    from fedge.server.enrollment_service import DEVICE_CERT_VALIDITY
    from fedge.server.store import Store
    from fedge.server.tls import cert_fingerprint, ensure_server_tls, sign_csr
    from fedge.server.tokens import MAX_USES, TokenBook

    if count < 0:
        raise ValueError("count must be >= 0")
    paths = ensure_server_tls(state)
    devices: list[BenchDevice] = []
    with Store.open(state / "fedge.db") as store:
        book = TokenBook(store)
        left = count
        while left > 0:  # a token holds at most MAX_USES enrollments
            uses = min(left, MAX_USES)
            checked = book.check(book.create(uses=uses, label=label).token)
            for _ in range(uses):
                key = ec.generate_private_key(ec.SECP256R1())
                csr = (
                    x509.CertificateSigningRequestBuilder()
                    .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)]))
                    .sign(key, hashes.SHA256())
                    .public_bytes(serialization.Encoding.PEM)
                )
                device_id = uuid.uuid4().hex
                cert = sign_csr(csr, paths, device_id=device_id, validity=DEVICE_CERT_VALIDITY)
                store.enroll_device(
                    checked.id, checked.secret_hash, device_id=device_id,
                    name=f"{label}-{len(devices):05d}", cert_fingerprint=cert_fingerprint(cert),
                )
                key_pem = key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                devices.append(BenchDevice(device_id, key_pem, cert))
            left -= uses
    return devices


def save(devices: Sequence[BenchDevice], path: Path) -> None:
    """Write devices (keys included: bench material only) to a 0600 JSON file."""
    from fedge.common.atomic_file import atomic_write

    rows = [
        {"id": d.device_id, "key": d.key_pem.decode(), "cert": d.cert_pem.decode()}
        for d in devices
    ]
    atomic_write(path, json.dumps(rows).encode(), 0o600)


def load(path: Path) -> list[BenchDevice]:
    rows = json.loads(Path(path).read_text())
    return [BenchDevice(r["id"], r["key"].encode(), r["cert"].encode()) for r in rows]
