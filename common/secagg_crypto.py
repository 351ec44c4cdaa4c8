"""The cryptography of secure aggregation, shared by devices and coordinator.

SecAgg+ (Bell et al. 2020) needs four primitives, all from `cryptography`
except Shamir sharing (a few lines of modular arithmetic over Python ints):

- X25519 key agreement: every device has two key pairs per round, `c` to
  encrypt the shares it sends a neighbour and `s` to derive the pairwise mask
  seed with it. Two pairs, so revealing a dropped device's `s` secret (to
  remove its masks) never opens the shares it exchanged.
- HKDF-SHA256 turns an agreement into a mask seed or an AEAD key; `info`
  binds the round so a seed never serves two rounds.
- AES-256-GCM encrypts each share bundle for one recipient; the associated
  data names sender, recipient and round, so a bundle cannot be replayed to
  another device or round.
- The PRG: AES-256-CTR keystream of the seed, read as words of the ring.
  Vectorised: `cryptography` produces the whole keystream in one call.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedge.common.secagg_errors import SecAggRefused

KEY_BYTES = 32
SEED_BYTES = 32
# Shamir field: the Mersenne prime 2**521 - 1 holds a 32-byte secret as one element
SHAMIR_PRIME = (1 << 521) - 1
SHARE_BYTES = 66
NONCE_BYTES = 12


# ------------------------------------------------------------------ keys


def new_private_key() -> bytes:
    """A fresh X25519 secret key, raw 32 bytes."""
    return X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_key(private: bytes) -> bytes:
    """The raw 32-byte public key of a raw X25519 secret key."""
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """32 bytes both ends derive alike: HKDF(X25519(private, peer_public), info)."""
    if len(peer_public) != KEY_BYTES:
        raise SecAggRefused("bad_key", f"public key of {len(peer_public)} bytes, expected 32")
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as exc:  # an all-zero (low-order) agreement
        raise SecAggRefused("bad_key", str(exc)) from None
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=info).derive(shared)


def mask_info(round_tag: bytes, lo: int, hi: int) -> bytes:
    """HKDF info of the pairwise mask seed between participants lo < hi."""
    return b"fedge.secagg.mask\0" + round_tag + b"\0" + f"{lo},{hi}".encode()


def share_key_info(round_tag: bytes, lo: int, hi: int) -> bytes:
    """HKDF info of the AEAD key between participants lo < hi."""
    return b"fedge.secagg.share-key\0" + round_tag + b"\0" + f"{lo},{hi}".encode()


def commitment(seed: bytes, round_tag: bytes, index: int) -> bytes:
    """SHA-256 the device publishes for its self-mask seed, so a reconstruction can be checked."""
    return hashlib.sha256(
        b"fedge.secagg.self-mask\0" + round_tag + b"\0" + str(index).encode() + b"\0" + seed
    ).digest()


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


# ------------------------------------------------------------------ AEAD


def share_ad(round_tag: bytes, sender: int, recipient: int) -> bytes:
    return b"fedge.secagg.shares\0" + round_tag + b"\0" + f"{sender}->{recipient}".encode()


def seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """nonce || AES-256-GCM(plaintext, ad); a fresh random nonce per bundle."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def open_sealed(key: bytes, sealed: bytes, ad: bytes) -> bytes:
    """The plaintext of `seal`, or SecAggRefused("share_forged") when it fails authentication."""
    if len(sealed) < NONCE_BYTES + 16:
        raise SecAggRefused("share_malformed", f"sealed bundle of {len(sealed)} bytes")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], ad)
    except InvalidTag:
        raise SecAggRefused(
            "share_forged", "share bundle fails authentication (wrong sender, round or bytes)"
        ) from None


# ------------------------------------------------------------------ PRG


def word_dtype(word_bits: int) -> type[np.unsignedinteger]:
    """The numpy container of a ring word: its natural wraparound is a multiple of 2**b."""
    if not 1 <= word_bits <= 32:
        raise ValueError(f"ring word of {word_bits} bits: 1..32 supported")
    return np.uint16 if word_bits <= 16 else np.uint32


def expand_mask(seed: bytes, n: int, word_bits: int) -> np.ndarray:
    """n pseudo-random words in [0, 2**word_bits): AES-256-CTR keystream of `seed`.

    Uniform per word because 2**word_bits divides the container's range.
    """
    if len(seed) != SEED_BYTES:
        raise SecAggRefused("bad_seed", f"mask seed of {len(seed)} bytes, expected 32")
    dtype = word_dtype(word_bits)
    width = np.dtype(dtype).itemsize
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    stream = enc.update(bytes(n * width)) + enc.finalize()
    words = np.frombuffer(stream, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    words &= dtype((1 << word_bits) - 1)
    return words


# ------------------------------------------------------------------ Shamir


def shamir_split(secret: bytes, xs: list[int], threshold: int) -> list[bytes]:
    """Shares of `secret` (<= 64 bytes) at points xs (distinct, >= 1); `threshold` recover it."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} for {len(xs)} shares")
    value = int.from_bytes(secret, "big")
    coeffs = [value] + [
        int.from_bytes(os.urandom(SHARE_BYTES), "big") % SHAMIR_PRIME for _ in range(threshold - 1)
    ]
    out = []
    for x in xs:
        acc = 0
        for c in reversed(coeffs):
            acc = (acc * x + c) % SHAMIR_PRIME
        out.append(acc.to_bytes(SHARE_BYTES, "big"))
    return out


def shamir_combine(points: list[tuple[int, bytes]], secret_bytes: int) -> bytes:
    """The secret at 0 from (x, share) points by Lagrange interpolation.

    Raises SecAggRefused("share_malformed") for a share of the wrong size or
    out of the field, and for duplicate x.
    """
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs):
        raise SecAggRefused("share_malformed", "two shares for the same point")
    ys = []
    for x, share in points:
        if len(share) != SHARE_BYTES:
            raise SecAggRefused("share_malformed", f"share of {len(share)} bytes from point {x}")
        y = int.from_bytes(share, "big")
        if y >= SHAMIR_PRIME:
            raise SecAggRefused("share_malformed", f"share from point {x} is outside the field")
        ys.append(y)
    secret = 0
    for m, (xm, ym) in enumerate(zip(xs, ys, strict=True)):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != m:
                num = num * xj % SHAMIR_PRIME
                den = den * (xj - xm) % SHAMIR_PRIME
        secret = (secret + ym * num * pow(den, -1, SHAMIR_PRIME)) % SHAMIR_PRIME
    if secret >= 1 << (8 * secret_bytes):
        raise SecAggRefused("reconstruction_failed", "shares interpolate to no valid secret")
    return secret.to_bytes(secret_bytes, "big")
