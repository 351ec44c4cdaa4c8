"""Signed results: a signature binds payload, run, round and task; anything else fails typed."""

from __future__ import annotations

import hashlib
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedge.common.signing import (
    DOMAIN_TAG,
    SignatureInvalid,
    public_key,
    sign_result,
    signing_message,
    verify_result,
)

PAYLOAD = b"\x08\x01" + bytes(range(256)) * 40
SHA = hashlib.sha256(PAYLOAD).hexdigest()
FIELDS = {"run_id": (1 << 64) - 3, "round": 4, "task_id": "task-b7", "payload_sha256": SHA}


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def signature(key: ec.EllipticCurvePrivateKey) -> bytes:
    return sign_result(key, **FIELDS)


def _self_signed(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    import datetime as dt

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_valid_signature_verifies_with_key_cert_or_pem(key, signature) -> None:
    cert = _self_signed(key)
    for form in (
        key.public_key(),
        cert,
        cert.public_bytes(serialization.Encoding.PEM),
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    ):
        verify_result(form, signature, **FIELDS)
    # the digest as raw bytes is the same message as its hex
    raw = hashlib.sha256(PAYLOAD).digest()
    verify_result(key.public_key(), signature, **{**FIELDS, "payload_sha256": raw})
    assert len(signature) <= 72


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"payload_sha256": hashlib.sha256(PAYLOAD[:-1] + b"\x00").hexdigest()}, "bytes altered"),
        ({"round": 3}, "an old round's update replayed"),
        ({"round": 5}, "replayed into a later round"),
        ({"run_id": 1}, "another run"),
        ({"task_id": "task-a1"}, "device A signing for B's task"),
        ({"task_id": "task-b"}, "task id prefix"),
    ],
)
def test_signature_fails_for_any_other_field(key, signature, change: dict, why: str) -> None:
    with pytest.raises(SignatureInvalid) as e:
        verify_result(key.public_key(), signature, **{**FIELDS, **change})
    assert e.value.reason == "mismatch", why


def test_another_devices_key_does_not_verify(signature) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(SignatureInvalid, match="mismatch"):
        verify_result(other.public_key(), signature, **FIELDS)


@pytest.mark.parametrize(
    ("sig", "reason"),
    [(b"", "missing"), (b"\x30\x02\x01", "malformed"), (b"\x00" * 200, "malformed")],
)
def test_malformed_signatures(key, sig: bytes, reason: str) -> None:
    with pytest.raises(SignatureInvalid) as e:
        verify_result(key.public_key(), sig, **FIELDS)
    assert e.value.reason == reason


def test_only_p256_keys() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(SignatureInvalid, match="bad_key"):
        sign_result(p384, **FIELDS)
    with pytest.raises(SignatureInvalid, match="bad_key"):
        public_key(p384.public_key())
    with pytest.raises(SignatureInvalid, match="bad_key"):
        public_key(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


@pytest.mark.parametrize(
    "fields",
    [
        {**FIELDS, "payload_sha256": "ab" * 31},
        {**FIELDS, "payload_sha256": "zz" * 32},
        {**FIELDS, "payload_sha256": b"\x00" * 31},
        {**FIELDS, "task_id": ""},
        {**FIELDS, "task_id": "t" * 2000},
        {**FIELDS, "round": -1},
        {**FIELDS, "run_id": 1 << 64},
    ],
)
def test_bad_fields_are_typed_errors(key, signature, fields: dict) -> None:
    with pytest.raises(SignatureInvalid, match="malformed"):
        verify_result(key.public_key(), signature, **fields)


def test_canonical_message_is_pinned() -> None:
    """The exact bytes, so a Kotlin or Swift device can check its own encoder against them."""
    msg = signing_message(7, 3, "t1", b"\x11" * 32)
    assert msg == (
        DOMAIN_TAG
        + (7).to_bytes(8, "big")
        + (3).to_bytes(8, "big")
        + (2).to_bytes(4, "big")
        + b"t1"
        + b"\x11" * 32
    )
    assert DOMAIN_TAG == b"fedge.v1.result-signature\x00"
    # length prefix: moving bytes between the task id and the digest changes the message
    assert signing_message(7, 3, "t", b"\x11" * 32) != msg[:-1]


def test_random_signatures_give_only_typed_errors(key) -> None:
    rng = random.Random(5)
    good = sign_result(key, **FIELDS)
    for _ in range(500):
        sig = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            sig[rng.randrange(len(sig))] = rng.randrange(256)
        if rng.random() < 0.3:
            sig = sig[: rng.randrange(len(sig))]
        if bytes(sig) == good:
            continue
        with pytest.raises(SignatureInvalid):
            verify_result(key.public_key(), bytes(sig), **FIELDS)
