"""The coordinator's certificate authority and server certificate, made on first start.

TLS is on by default (issue 4): `ensure_server_tls` creates, in the state
folder, an EC P-256 CA (self-signed, valid for years) and a server certificate
for the coordinator's host names and IPs, and reuses them on later starts, so
devices keep trusting the same `ca.pem`. The server certificate is re-issued
by the same CA when it nears expiry or a new host name is asked for. Private
keys are written with mode 0600 in a 0700 folder.

`sign_csr` is the seam for device certificates (enrollment, issue 5): the same
CA signs a device's CSR, and `server_credentials(..., require_client_auth=True)`
turns on mutual TLS.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.common.atomic_file import atomic_write

CA_VALIDITY = dt.timedelta(days=3650)
SERVER_VALIDITY = dt.timedelta(days=825)
DEVICE_VALIDITY = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=30)
"""A server certificate closer than this to expiry is re-issued on start."""

_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
"""Device ids of this shape also go into the device certificate's DNS SAN."""

_CLOCK_SKEW = dt.timedelta(minutes=5)
"""Backdate `not_valid_before` so devices with a slightly late clock accept new certs."""


class TlsError(Exception):
    """Certificates could not be created, loaded or used; the message says which file."""


@dataclass(frozen=True)
class TlsPaths:
    """Where the coordinator's TLS material lives (all PEM)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def ensure_server_tls(
    state_dir: str | os.PathLike[str],
    hostnames: Sequence[str] = ("localhost", "127.0.0.1"),
    *,
    now: dt.datetime | None = None,
) -> TlsPaths:
    """Create (first start) or reuse the CA and server certificate under `state_dir/tls`.

    `hostnames` may mix DNS names and IP addresses; each becomes a SAN.
    """
    now = now or dt.datetime.now(dt.UTC)
    folder = Path(state_dir) / "tls"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    paths = TlsPaths(
        ca_cert=folder / "ca.pem",
        ca_key=folder / "ca.key",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
    )
    if paths.ca_cert.exists() and paths.ca_key.exists():
        ca_key = _load_key(paths.ca_key)
        ca_cert = _load_cert(paths.ca_cert)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _make_ca(ca_key, now)
        _write_private(paths.ca_key, _key_pem(ca_key))
        _write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        # a new CA invalidates any server certificate signed by an old one
        paths.server_cert.unlink(missing_ok=True)
    if not _server_cert_ok(paths, ca_cert, hostnames, now):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _make_server_cert(key, ca_key, ca_cert, hostnames, now)
        _write_private(paths.server_key, _key_pem(key))
        _write_public(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    return paths


def server_credentials(
    paths: TlsPaths, *, require_client_auth: bool = False
) -> grpc.ServerCredentials:
    """gRPC server credentials from `paths`; with `require_client_auth`, mutual TLS.

    Under mutual TLS a client must present a certificate signed by the same CA
    (a device certificate from `sign_csr`).
    """
    return grpc.ssl_server_credentials(
        [(paths.server_key.read_bytes(), paths.server_cert.read_bytes())],
        root_certificates=paths.ca_cert.read_bytes() if require_client_auth else None,
        require_client_auth=require_client_auth,
    )


def sign_csr(
    csr_pem: bytes,
    paths: TlsPaths,
    *,
    device_id: str,
    validity: dt.timedelta = DEVICE_VALIDITY,
    now: dt.datetime | None = None,
) -> bytes:
    """Issue a device (TLS client) certificate for a CSR, signed by the coordinator's CA.

    The subject is set to `device_id` whatever the CSR asks for: the
    coordinator, not the device, names devices; an id that is a DNS label
    (fedge's hex ids are) is also the certificate's DNS SAN, which gRPC then
    reports as the peer identity. The CSR must be validly self-signed and carry
    an EC P-256 key; its requested extensions are ignored. Returns the
    certificate as PEM.
    """
    now = now or dt.datetime.now(dt.UTC)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise TlsError(f"not a PEM certificate signing request: {e}") from None
    if not csr.is_signature_valid:
        raise TlsError("CSR signature does not verify")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise TlsError("device keys must be EC P-256")
    ca_key = _load_key(paths.ca_key)
    ca_cert = _load_cert(paths.ca_cert)
    builder = _builder(key, _name(device_id), ca_cert.subject, now, validity)
    if _DNS_LABEL.fullmatch(device_id):
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(device_id)]), critical=False
        )
    cert = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 hex fingerprint of a PEM certificate (what the device registry stores)."""
    return _load_cert_bytes(cert_pem).fingerprint(hashes.SHA256()).hex()


def _make_ca(key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
    name = _name("fedge coordinator CA")
    return (
        _builder(key.public_key(), name, name, now, CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )


def _make_server_cert(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hostnames: Sequence[str],
    now: dt.datetime,
) -> x509.Certificate:
    if not hostnames:
        raise TlsError("the server certificate needs at least one host name or IP")
    return (
        _builder(key.public_key(), _name(hostnames[0]), ca_cert.subject, now, SERVER_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_sans(hostnames)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _server_cert_ok(
    paths: TlsPaths, ca_cert: x509.Certificate, hostnames: Sequence[str], now: dt.datetime
) -> bool:
    """Reuse the server certificate only if it is ours, fresh, and names every host."""
    if not (paths.server_cert.exists() and paths.server_key.exists()):
        return False
    try:
        cert = _load_cert(paths.server_cert)
        key = _load_key(paths.server_key)
        cert.verify_directly_issued_by(ca_cert)
    except (TlsError, ValueError, TypeError, InvalidSignature):
        return False
    if cert.public_key() != key.public_key():
        return False
    if cert.not_valid_after_utc - RENEW_BEFORE < now:
        return False
    try:
        have = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return False
    return set(_sans(hostnames)) <= have


def _sans(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def _builder(
    public_key: ec.EllipticCurvePublicKey,
    subject: x509.Name,
    issuer: x509.Name,
    now: dt.datetime,
    validity: dt.timedelta,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=True,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedge"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise TlsError(f"{path}: not a usable PEM private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsError(f"{path}: expected an EC private key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return _load_cert_bytes(path.read_bytes())
    except TlsError as e:
        raise TlsError(f"{path}: {e}") from None


def _load_cert_bytes(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise TlsError(f"not a PEM certificate: {e}") from None


def _write_private(path: Path, data: bytes) -> None:
    """Write a key atomically, created 0600 (never briefly world-readable)."""
    atomic_write(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    atomic_write(path, data, 0o644)


