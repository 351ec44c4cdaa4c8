"""Who is calling: the enrolled device behind an mTLS connection, checked on every RPC.

The mutual-TLS handshake already proved that the peer holds the private key of
a certificate our CA signed. What the handshake cannot know is whether that
certificate is still *ours to honour*: this module looks the certificate's
SHA-256 fingerprint up in the store on every call, so a device revoked with
`fedge coordinator devices revoke` (even from another process) is refused on
its very next call, with no restart and no cache to expire.

- no client certificate (plaintext, or a channel without one) -> UNAUTHENTICATED
- a certificate no enrolled device holds (unknown, or superseded) -> UNAUTHENTICATED
- a revoked device -> PERMISSION_DENIED (the device stops; it must not retry)

Status codes match docs/coordinator.md. Messages are the same for every
UNAUTHENTICATED case; the reason goes to the audit log only.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Iterable, Mapping

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from fedge.common.errors import ReasonError
from fedge.server.audit import audit
from fedge.server.store import Device, DeviceStatus, Store

PEER_CERT_KEY = "x509_pem_cert"
"""Where gRPC's auth context holds the peer's certificate (PEM) under mutual TLS."""


class IdentityRefused(ReasonError):
    """The caller is not an enrolled, active device; `code` is the gRPC status to answer."""

    what = "device refused"

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        self.code = code
        super().__init__(reason)

    @property
    def public_message(self) -> str:
        """What the device is told: nothing that helps probe the registry."""
        if self.code == grpc.StatusCode.PERMISSION_DENIED:
            return "device revoked"
        return "device not enrolled: present the certificate from `fedge enroll`"


def peer_cert_pem(auth_context: Mapping[str, Iterable[bytes]]) -> bytes | None:
    """The peer's certificate (PEM) from `context.auth_context()`, or None without mTLS.

    This is what `fedge.common.signing.verify_result` takes to check a result's
    signature with the key of the device that is connected.
    """
    pems = list(auth_context.get(PEER_CERT_KEY) or ())
    return bytes(pems[0]) if len(pems) == 1 else None


def identify_peer(auth_context: Mapping[str, Iterable[bytes]], store: Store) -> Device:
    """The active device whose certificate the peer presented; raises `IdentityRefused`.

    `auth_context` is `context.auth_context()` of a gRPC call on the mTLS port.
    """
    pem = peer_cert_pem(auth_context)
    if pem is None:
        raise IdentityRefused(grpc.StatusCode.UNAUTHENTICATED, "no_client_cert")
    facts = peer_cert_facts(pem)
    if facts is None:
        raise IdentityRefused(grpc.StatusCode.UNAUTHENTICATED, "bad_client_cert")
    fingerprint, common_name = facts
    device = store.get_device_by_fingerprint(fingerprint)
    if (
        device is None
        or device.cert_fingerprint is None
        or not hmac.compare_digest(device.cert_fingerprint, fingerprint)
        or device.id != common_name
    ):
        raise IdentityRefused(grpc.StatusCode.UNAUTHENTICATED, "unknown_device")
    if device.status == DeviceStatus.REVOKED:
        raise IdentityRefused(grpc.StatusCode.PERMISSION_DENIED, "revoked")
    return device


async def require_device(context: grpc.aio.ServicerContext, store: Store) -> Device:
    """The calling device, or abort the RPC with UNAUTHENTICATED / PERMISSION_DENIED.

    Call at the start of every device RPC, and again right before a result
    is counted, so a device revoked mid-upload is refused too.
    """
    try:
        return identify_peer(context.auth_context(), store)
    except IdentityRefused as e:
        audit("device_refused", reason=e.reason, peer=context.peer())
        await context.abort(e.code, e.public_message)
        raise  # unreachable: abort raises


@functools.lru_cache(maxsize=1 << 16)
def peer_cert_facts(pem: bytes) -> tuple[str, str] | None:
    """(SHA-256 fingerprint hex, subject CN) of a PEM certificate, or None if unreadable.

    Cached: a device presents the same certificate on every call, and parsing
    it each time would be the most expensive step of the check. The cache
    holds a whole fleet (65,536 certificates, about 1 kB each): a smaller LRU
    cycled through by more devices than it holds misses on every call.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (ValueError, x509.InvalidVersion):  # InvalidVersion is no ValueError (fuzzing)
        return None
    cn = names[0].value if len(names) == 1 else None
    if not isinstance(cn, str):
        return None
    return cert.fingerprint(hashes.SHA256()).hex(), cn
