"""Fuzz the enrollment decoding path: only typed errors may come out.

Seeded and deterministic, like tests/test_codec_fuzz.py. Three layers:
- protobuf bytes of an EnrollRequest, damaged (truncation, bit flips,
  overwrites, insertions, splices) -> protobuf parsing (gRPC's, before the
  servicer) then `validate_enroll_request`: a `DecodeError` from parsing, or a
  `ValidEnrollment` or `EnrollmentRejected`, nothing else;
- CSR PEMs damaged as text and as DER re-wrapped in PEM (which gets past
  base64 and reaches the ASN.1 parser and the signature check) ->
  `validate_csr`; whatever it accepts, `sign_csr` must sign;
- the other decoders a stranger reaches: token strings (`parse_token`), peer
  certificates (`peer_cert_facts`).
"""

from __future__ import annotations

import base64
import random
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from enrollment_harness import csr_pem, p256_key
from google.protobuf.message import DecodeError

from fedge.server.device_identity import peer_cert_facts
from fedge.server.enrollment_service import (
    EnrollmentRejected,
    ValidEnrollment,
    validate_csr,
    validate_enroll_request,
)
from fedge.server.tls import ensure_server_tls, sign_csr
from fedge.server.tokens import TokenRefused, parse_token
from fedge.v1 import enrollment_pb2

CASES = 2400
TOKEN = "fdg1.0123456789abcdef." + "Q" * 43


@pytest.fixture(scope="module")
def csrs() -> list[bytes]:
    return [csr_pem(p256_key(), cn) for cn in ("dev", "a-much-longer-device-common-name", "x")]


def _mutate(data: bytes, rng: random.Random, alphabet: bytes | None = None) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1) if buf else 0
        pick = (lambda: rng.choice(alphabet)) if alphabet else (lambda: rng.randrange(256))
        if op == 0 and buf:  # truncate
            del buf[pos:]
        elif op == 1 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 2 and buf:  # overwrite a run
            for i in range(pos, min(len(buf), pos + rng.randint(1, 8))):
                buf[i] = pick()
        elif op == 3:  # insert
            buf[pos:pos] = bytes(pick() for _ in range(rng.randint(1, 16)))
        elif op == 4 and buf:  # delete a run
            del buf[pos : pos + rng.randint(1, 16)]
        else:  # splice a piece of itself elsewhere
            a = rng.randrange(len(buf) + 1)
            b = min(len(buf), a + rng.randint(1, 64))
            buf[pos:pos] = buf[a:b]
    return bytes(buf)


def _pem(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"


def test_mutated_enroll_requests_give_only_typed_errors(csrs: list[bytes]) -> None:
    rng = random.Random(20250105)
    seeds = [
        enrollment_pb2.EnrollRequest(token=TOKEN, csr_pem=c, device_name=n).SerializeToString()
        for c, n in zip(csrs, ("pi-1", "", "kitchen sensor"), strict=True)
    ]
    outcomes: Counter[str] = Counter()
    for _ in range(CASES):
        data = _mutate(rng.choice(seeds), rng)
        request = enrollment_pb2.EnrollRequest()
        try:
            request.ParseFromString(data)
        except DecodeError:  # gRPC refuses such bytes before the servicer runs
            outcomes["undecodable"] += 1
            continue
        try:
            valid = validate_enroll_request(request)
        except EnrollmentRejected as e:
            outcomes[e.reason] += 1
            continue
        assert isinstance(valid, ValidEnrollment)
        outcomes["accepted"] += 1
        try:
            parse_token(valid.token)
        except TokenRefused as e:
            assert e.reason == "malformed"
    assert sum(outcomes.values()) == CASES
    # the fuzzer must reach past the protobuf framing into the CSR checks
    assert outcomes["undecodable"] < CASES and outcomes["bad_csr"] > 0, outcomes


def test_mutated_csr_pems_give_only_typed_errors(csrs: list[bytes], tmp_path: Path) -> None:
    rng = random.Random(7)
    paths = ensure_server_tls(tmp_path)
    ders = [x509.load_pem_x509_csr(c).public_bytes(serialization.Encoding.DER) for c in csrs]
    b64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n-"
    outcomes: Counter[str] = Counter()
    signed = 0
    for i in range(CASES):
        if i % 2:  # DER damage: reaches ASN.1 and signature checks
            pem = _pem(_mutate(rng.choice(ders), rng))
        else:  # text damage: PEM armour and base64
            pem = _mutate(rng.choice(csrs), rng, alphabet=b64)
        try:
            validate_csr(pem)
        except EnrollmentRejected as e:
            outcomes[e.reason] += 1
            continue
        outcomes["accepted"] += 1
        if signed < 50:  # anything validate_csr lets through must be signable
            cert = sign_csr(pem, paths, device_id="fuzzed")
            assert peer_cert_facts(cert) is not None
            signed += 1
    assert sum(outcomes.values()) == CASES
    assert outcomes["bad_signature"] > 0 and outcomes["bad_csr"] > 0, outcomes


def test_hostile_fields_give_only_typed_errors(csrs: list[bytes]) -> None:
    rng = random.Random(3)
    names = ["", " ", "a" * 64, "a" * 65, "é" * 10, "\x00", "pi\n2", "\u202e", "😀" * 20]
    tokens = ["", TOKEN, TOKEN + "=", TOKEN.upper(), "fdg1." * 40, "\x00" * 10, "é" * 67]
    tokens += ["".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(67)) for _ in range(250)]
    count = 0
    for name in names:
        for token in tokens:
            request = enrollment_pb2.EnrollRequest(token=token, csr_pem=csrs[0], device_name=name)
            try:
                valid = validate_enroll_request(request)
            except EnrollmentRejected as e:
                assert e.reason == "bad_name"
            else:
                with pytest.raises(TokenRefused) if token != TOKEN else nullcontext():
                    parse_token(valid.token)
            count += 1
    assert count >= 2000


def test_mutated_peer_certificates_give_none_or_facts(tmp_path: Path) -> None:
    rng = random.Random(11)
    paths = ensure_server_tls(tmp_path)
    cert = sign_csr(csr_pem(p256_key()), paths, device_id="abc")
    der = x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
    peer_cert_facts.cache_clear()
    results: Counter[str] = Counter()
    for i in range(CASES):
        pem = x509_pem(_mutate(der, rng)) if i % 2 else _mutate(cert, rng)
        facts = peer_cert_facts(pem)
        results["none" if facts is None else "facts"] += 1
        if facts is not None:
            assert len(facts[0]) == 64 and isinstance(facts[1], str)
    assert results["none"] > 0


def x509_pem(der: bytes) -> bytes:
    return (
        b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE-----\n"
    )
