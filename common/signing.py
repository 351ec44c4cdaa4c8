"""Signed results: a device's ECDSA P-256 signature binds an update to its task.

The signature covers a canonical byte string, not the update itself:

    DOMAIN_TAG || u64 run_id || u64 round || u32 len(task_id) || task_id (UTF-8)
              || sha256(payload) (32 bytes)

(integers big-endian). Why each part:
- the domain tag keeps a result signature from ever being valid for another
  purpose signed with the same key (e.g. Flower's SuperNode auth timestamps);
- run id and round make an old round's signed update worthless when replayed;
- the task id binds the update to the task the coordinator gave *this* device,
  so device A cannot sign a result for device B's task;
- the payload's SHA-256 (which the chunked upload already computes and checks)
  makes any byte changed after signing fail, and lets the coordinator verify
  before it decodes anything.

Length-prefixing the task id keeps the encoding unambiguous. Signatures are
DER-encoded ECDSA over SHA-256 (what Java's `SHA256withECDSA` and Swift's
`derRepresentation` produce), so Kotlin and Swift devices can sign the same
bytes. Shared by devices (sign) and the coordinator (verify).
"""

from __future__ import annotations

import struct

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from fedge.common.errors import ReasonError

DOMAIN_TAG = b"fedge.v1.result-signature\x00"
MAX_TASK_ID_BYTES = 1024
MAX_SIGNATURE_BYTES = 80
"""A DER ECDSA P-256 signature is at most 72 bytes; anything longer is refused unread."""

PublicKeyLike = ec.EllipticCurvePublicKey | x509.Certificate | bytes


class SignatureInvalid(ReasonError, ValueError):
    """A result signature is missing, malformed, or does not verify for the given fields.

    `reason` is a stable code: "missing", "malformed", "bad_key", "mismatch".
    """

    what = "signature invalid"


def signing_message(run_id: int, round: int, task_id: str, payload_sha256: bytes | str) -> bytes:
    """The canonical bytes a result signature covers (see the module docstring)."""
    if not 0 <= run_id < 1 << 64 or not 0 <= round < 1 << 64:
        raise SignatureInvalid("malformed", "run id and round must be unsigned 64-bit")
    task = task_id.encode("utf-8")
    if not task or len(task) > MAX_TASK_ID_BYTES:
        raise SignatureInvalid("malformed", "task id must be 1..1024 bytes")
    return b"".join(
        (
            DOMAIN_TAG,
            struct.pack(">QQI", run_id, round, len(task)),
            task,
            _digest_bytes(payload_sha256),
        )
    )


def sign_result(
    private_key: ec.EllipticCurvePrivateKey,
    *,
    run_id: int,
    round: int,
    task_id: str,
    payload_sha256: bytes | str,
) -> bytes:
    """Sign a result (device side); returns the DER signature for `ResultHeader.signature`.

    `payload_sha256` is the SHA-256 of the exact bytes uploaded, as 32 raw
    bytes or 64 hex digits.
    """
    _require_p256(private_key.curve)
    msg = signing_message(run_id, round, task_id, payload_sha256)
    return private_key.sign(msg, ec.ECDSA(hashes.SHA256()))


def verify_result(
    public_key_or_cert: PublicKeyLike,
    signature: bytes,
    *,
    run_id: int,
    round: int,
    task_id: str,
    payload_sha256: bytes | str,
) -> None:
    """Check a result signature (coordinator side); raises `SignatureInvalid`, else returns.

    `public_key_or_cert` is the device's public key, its certificate, or a PEM
    of either (e.g. the mTLS peer certificate from the gRPC auth context).
    """
    if not signature:
        raise SignatureInvalid("missing", "the result carries no signature")
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise SignatureInvalid("malformed", f"signature of {len(signature)} bytes")
    key = public_key(public_key_or_cert)
    msg = signing_message(run_id, round, task_id, payload_sha256)
    try:
        decode_dss_signature(bytes(signature))
    except ValueError:
        raise SignatureInvalid("malformed", "signature is not DER-encoded ECDSA") from None
    try:
        key.verify(bytes(signature), msg, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureInvalid("mismatch", "signature does not verify") from None


def public_key(obj: PublicKeyLike) -> ec.EllipticCurvePublicKey:
    """An EC P-256 public key from a key, a certificate, or PEM bytes of either."""
    if isinstance(obj, bytes):
        try:
            if b"CERTIFICATE" in obj:
                obj = x509.load_pem_x509_certificate(obj)
            else:
                obj = serialization.load_pem_public_key(obj)  # type: ignore[assignment]
        except (ValueError, TypeError) as e:
            raise SignatureInvalid("bad_key", f"not a PEM certificate or key: {e}") from None
    if isinstance(obj, x509.Certificate):
        obj = obj.public_key()  # type: ignore[assignment]
    if not isinstance(obj, ec.EllipticCurvePublicKey):
        raise SignatureInvalid("bad_key", "device keys are EC P-256")
    _require_p256(obj.curve)
    return obj


def _digest_bytes(value: bytes | str) -> bytes:
    if isinstance(value, str):
        if len(value) != 64:
            raise SignatureInvalid("malformed", "payload sha256 must be 64 hex digits")
        try:
            value = bytes.fromhex(value)
        except ValueError:
            raise SignatureInvalid("malformed", "payload sha256 is not hex") from None
    if len(value) != 32:
        raise SignatureInvalid("malformed", "payload sha256 must be 32 bytes")
    return bytes(value)


def _require_p256(curve: ec.EllipticCurve) -> None:
    if curve.name != "secp256r1":
        raise SignatureInvalid("bad_key", f"device keys are EC P-256, not {curve.name}")
