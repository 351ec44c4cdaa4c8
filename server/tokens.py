"""One-time enrollment tokens: printed once, stored only as a hash, spent atomically.

A token reads `fdg1.<id>.<secret>`: `id` is 16 hex digits (not secret; it
names the token in listings and audit records), `secret` is 32 random bytes
(urlsafe base64). The store keeps `sha256(domain || id || secret)` and never
the secret, so a copy of the database enrolls nobody. A plain SHA-256 suffices
because the secret has 256 bits of entropy (a slow password hash defends low
entropy secrets, which these are not).

`check` compares the hash with `hmac.compare_digest` and gives a distinct
internal reason for each refusal (malformed, unknown, wrong, expired,
used_up, revoked), for logs and tests; callers must answer all of them alike
on the wire. The use itself is spent by `Store.enroll_device` in the same
transaction that adds the device, so racing enrollments cannot overspend.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fedge.common.errors import ReasonError
from fedge.server.store import Store, StoreError

TOKEN_PREFIX = "fdg1"
DEFAULT_TTL_S = 24 * 3600.0
MAX_TTL_S = 365 * 24 * 3600.0
MAX_USES = 100_000
MAX_LABEL_CHARS = 200
MAX_TOKEN_CHARS = 128
"""Anything longer is refused before hashing (a token is 67 characters)."""

_TOKEN_RE = re.compile(r"fdg1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})")
_DOMAIN = b"fedge.v1.enroll-token\x00"
_DUMMY_HASH = "0" * 64

REFUSAL_REASONS = ("malformed", "unknown", "wrong", "expired", "used_up", "revoked")


class TokenRefused(ReasonError):
    """A token cannot enroll a device; `reason` is one of `REFUSAL_REASONS`.

    The detail is the token's public id (when known): the message never
    contains the token or its secret.
    """

    what = "enrollment token refused"

    def __init__(self, reason: str, token_id: str = "") -> None:
        self.token_id = token_id
        super().__init__(reason, token_id)


@dataclass(frozen=True)
class IssuedToken:
    """A freshly created token. `token` is the secret string: show it once, then drop it."""

    id: str
    label: str
    expires: float
    max_uses: int
    token: str = field(repr=False)


@dataclass(frozen=True)
class CheckedToken:
    """A token that verified; what `Store.enroll_device` needs to spend one use of it."""

    id: str
    secret_hash: str = field(repr=False)
    label: str


class TokenBook:
    """Creates, checks and revokes enrollment tokens in the coordinator's store."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    def create(
        self, *, ttl_s: float = DEFAULT_TTL_S, uses: int = 1, label: str = ""
    ) -> IssuedToken:
        """A new token valid for `ttl_s` seconds and `uses` enrollments."""
        if not 0 < ttl_s <= MAX_TTL_S:
            raise ValueError(f"ttl must be in (0, {MAX_TTL_S:.0f}] seconds")
        if not 1 <= uses <= MAX_USES:
            raise ValueError(f"uses must be in [1, {MAX_USES}]")
        if len(label) > MAX_LABEL_CHARS or not label.isprintable():
            raise ValueError(f"label must be printable and at most {MAX_LABEL_CHARS} characters")
        token_id = secrets.token_hex(8)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
        expires = self._clock() + ttl_s
        self._store.add_enrollment_token(
            token_id, hash_secret(token_id, secret), label=label, expires=expires, max_uses=uses
        )
        return IssuedToken(
            id=token_id,
            label=label,
            expires=expires,
            max_uses=uses,
            token=f"{TOKEN_PREFIX}.{token_id}.{secret}",
        )

    def check(self, token: str) -> CheckedToken:
        """Verify a presented token without spending it; raises `TokenRefused(reason)`."""
        token_id, secret = parse_token(token)
        row = self._store.get_enrollment_token(token_id)
        presented = hash_secret(token_id, secret)
        # compare even for an unknown id, so both paths cost the same
        matches = hmac.compare_digest(presented, row.secret_hash if row else _DUMMY_HASH)
        if row is None:
            raise TokenRefused("unknown", token_id)
        if not matches:
            raise TokenRefused("wrong", token_id)
        if row.revoked:
            raise TokenRefused("revoked", token_id)
        if row.expires <= self._clock():
            raise TokenRefused("expired", token_id)
        if row.uses >= row.max_uses:
            raise TokenRefused("used_up", token_id)
        return CheckedToken(id=row.id, secret_hash=row.secret_hash, label=row.label)

    def revoke(self, token_id: str) -> None:
        """Stop a token from enrolling anyone else; raises `KeyError` for an unknown id."""
        try:
            self._store.revoke_enrollment_token(token_id)
        except StoreError as e:
            if e.reason == "not_found":
                raise KeyError(token_id) from None
            raise


def parse_token(token: str) -> tuple[str, str]:
    """Split a token into (id, secret); raises `TokenRefused("malformed")`."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise TokenRefused("malformed")
    m = _TOKEN_RE.fullmatch(token.strip())
    if m is None:
        raise TokenRefused("malformed")
    return m.group(1), m.group(2)


def hash_secret(token_id: str, secret: str) -> str:
    """What the store keeps for a token: hex SHA-256 over a domain tag, the id and the secret."""
    return hashlib.sha256(_DOMAIN + token_id.encode() + b"\x00" + secret.encode()).hexdigest()
