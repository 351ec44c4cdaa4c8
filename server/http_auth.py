"""Who may use the HTTP API: enrolled devices (mutual TLS) and bearer tokens with scopes.

Without authentication the HTTP API hands every model and predictions to
anyone who reaches the port, so it binds only to loopback unless
authentication is on (`check_bind`, called before any socket is opened).
Two ways in, usable together (`--http-auth mtls|token|any`):

- **mutual TLS**: the API serves HTTPS with the coordinator's server
  certificate and asks for a client certificate signed by its CA (the one
  `fedge enroll` gives a device). The handshake proves the key; it lets a
  caller without a certificate through only so that a device can enroll
  here (`POST /v1/enroll`, server/http_enroll.py), and every other route
  but /healthz then answers 401. The store says whether a certificate still
  belongs to an active device (looked up on every request, so a revocation
  is immediate).
  An enrolled device gets the `read` scope: the models, what an
  inference-only device fetches.
- **bearer tokens** (`Authorization: Bearer fdgh1.<id>.<secret>`), made with
  `fedge coordinator http-token add --scope read --scope predict`, printed
  once and kept in `<state>/http-tokens.json` only as
  `sha256(domain || id || secret)` (256-bit secrets need no slow hash; a copy
  of the file lets nobody in). Scopes: `read` (model list, downloads,
  /metrics) and `predict` (POST /v1/predict). Beyond loopback, tokens need
  TLS (they would travel in plaintext otherwise).

`/healthz` needs nothing (load balancers probe it); `/v1/enroll` needs a
one-time enrollment token in its body. Every refusal is a JSON 401/403 that
names the missing scope or credential, never which check failed for an
unknown token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.common.atomic_file import atomic_write

SCOPES = ("read", "predict")
AUTH_MODES = ("none", "mtls", "token", "any")
TOKENS_FILE = "http-tokens.json"
TOKEN_PREFIX = "fdgh1"
_TOKEN_RE = re.compile(r"fdgh1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})")
_DOMAIN = b"fedge.v1.http-token\x00"
MAX_TOKEN_CHARS = 128
DEVICE_SCOPES = frozenset({"read"})


class BindRefused(ValueError):
    """The HTTP API would listen beyond loopback without authentication; says the way out."""


class AuthRefused(Exception):
    """A request without the credential or scope it needs: HTTP status and a stable code."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        super().__init__(detail)


@dataclass(frozen=True)
class Principal:
    """Who is calling: `device:<id>`, `token:<id>` or `anonymous` (auth off), and what it may do."""

    name: str
    scopes: frozenset[str]


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or "" (every address): assume reachable


def check_bind(host: str, mode: str, *, tls: bool) -> None:
    """Refuse (`BindRefused`) an HTTP API beyond loopback without authentication, or tokens
    without TLS there. Called before anything binds."""
    if mode not in AUTH_MODES:
        raise BindRefused(f"--http-auth must be one of {', '.join(AUTH_MODES)}, not {mode!r}")
    loopback = is_loopback(host)
    if not tls and (mode in ("mtls", "any") or (mode == "token" and not loopback)):
        why = "client certificates" if mode != "token" else "tokens beyond loopback"
        raise BindRefused(
            f"--http-auth {mode}: {why} need TLS (the coordinator's certificates); drop --insecure"
        )
    if loopback:
        return
    if mode == "none":
        raise BindRefused(
            f"the HTTP API has no authentication and --http-host {host} is beyond loopback: "
            "add --http-auth mtls|token|any (or bind 127.0.0.1 behind a proxy that authenticates)"
        )


# ---------------------------------------------------------------- tokens


def token_hash(token_id: str, secret: str) -> str:
    return hashlib.sha256(_DOMAIN + token_id.encode() + b"\x00" + secret.encode()).hexdigest()


@dataclass
class TokenFile:
    """`<state>/http-tokens.json`: hashed bearer tokens with their scopes (re-read on change)."""

    path: Path
    _stamp: tuple[int, int] | None = None
    _tokens: dict[str, dict[str, Any]] = field(default_factory=dict)

    def entries(self) -> dict[str, dict[str, Any]]:
        """Token id -> {hash, scopes, label, created}; the file is re-read when it changes."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._tokens = None, {}
            return {}
        stamp = (st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            self._tokens = _parse_tokens(self.path.read_bytes(), str(self.path))
            self._stamp = stamp
        return self._tokens

    def add(self, scopes: Iterable[str], label: str = "") -> str:
        """Make a token, store its hash, return the token (shown once)."""
        wanted = sorted(set(scopes))
        bad = [s for s in wanted if s not in SCOPES]
        if not wanted or bad:
            raise ValueError(f"scopes must be some of {', '.join(SCOPES)}, not {bad or 'none'}")
        token_id = secrets.token_hex(8)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        tokens = dict(self.entries())
        tokens[token_id] = {
            "hash": token_hash(token_id, secret),
            "scopes": wanted,
            "label": str(label)[:200],
            "created": round(time.time(), 3),
        }
        self._write(tokens)
        return f"{TOKEN_PREFIX}.{token_id}.{secret}"

    def revoke(self, token_id: str) -> bool:
        """Remove a token by id; False if there was none."""
        tokens = dict(self.entries())
        if tokens.pop(token_id, None) is None:
            return False
        self._write(tokens)
        return True

    def _write(self, tokens: Mapping[str, Any]) -> None:
        body = json.dumps({"tokens": tokens}, indent=1, sort_keys=True).encode()
        atomic_write(self.path, body, 0o600, prefix=".tmp-http-tokens-", make_parents=True)
        self._stamp = None

    def check(self, presented: str) -> frozenset[str] | None:
        """The scopes of a presented token, or None for a malformed, unknown or wrong one."""
        m = _TOKEN_RE.fullmatch(presented) if len(presented) <= MAX_TOKEN_CHARS else None
        if m is None:
            return None
        entry = self.entries().get(m.group(1))
        if entry is None:
            return None
        if not hmac.compare_digest(str(entry.get("hash", "")), token_hash(*m.groups())):
            return None
        return frozenset(s for s in entry.get("scopes", ()) if s in SCOPES)


def _parse_tokens(data: bytes, where: str) -> dict[str, dict[str, Any]]:
    try:
        doc = json.loads(data)
        tokens = doc["tokens"]
        if not isinstance(tokens, dict) or not all(isinstance(v, dict) for v in tokens.values()):
            raise TypeError("tokens is not an object of objects")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where} is damaged ({e}); remove it and add tokens again") from None
    return tokens


# ---------------------------------------------------------------- the policy


@dataclass
class HttpAuth:
    """The HTTP API's authentication: mode, TLS files, tokens, and the device lookup.

    `device_scopes(cert_pem)` answers the scopes of an enrolled, active device
    holding that certificate, or raises `AuthRefused` (the coordinator passes
    a lookup in its store; see `store_device_lookup`).
    """

    mode: str
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    tokens: TokenFile | None = None
    device_scopes: Any = None  # Callable[[bytes], frozenset[str]]

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def ssl_options(self) -> dict[str, Any]:
        """uvicorn's ssl_* settings: HTTPS, and client certificates per mode."""
        if self.tls_cert is None:
            return {}
        # optional at the handshake even under mtls: a device enrolls (POST /v1/enroll) before
        # it has a certificate; `authenticate` refuses every other route without one
        reqs = ssl.CERT_OPTIONAL if self.mode in ("mtls", "any") else ssl.CERT_NONE
        options: dict[str, Any] = {
            "ssl_certfile": str(self.tls_cert),
            "ssl_keyfile": str(self.tls_key),
            "ssl_cert_reqs": reqs,
        }
        if reqs != ssl.CERT_NONE:
            options["ssl_ca_certs"] = str(self.client_ca)
        return options

    def authenticate(self, headers: Mapping[str, str], peer_cert_der: bytes | None) -> Principal:
        """Who the caller is; raises `AuthRefused` (401) for no or a bad credential."""
        if self.mode == "none":
            return Principal("anonymous", frozenset(SCOPES))
        if peer_cert_der is not None and self.mode in ("mtls", "any"):
            pem = ssl.DER_cert_to_PEM_cert(peer_cert_der).encode()
            name, scopes = self.device_scopes(pem)
            return Principal(name, frozenset(scopes))
        if self.mode in ("token", "any") and self.tokens is not None:
            header = headers.get("authorization", "")
            kind, _, presented = header.partition(" ")
            if kind.lower() == "bearer" and presented:
                scopes = self.tokens.check(presented.strip())
                if scopes is None:
                    raise AuthRefused(401, "unauthenticated", "unknown or revoked token")
                return Principal(f"token:{presented.split('.')[1]}", scopes)
        wants = {
            "mtls": "a device certificate (fedge enroll)",
            "token": "Authorization: Bearer <token> (fedge coordinator http-token add)",
            "any": "a device certificate or Authorization: Bearer <token>",
        }[self.mode]
        raise AuthRefused(401, "unauthenticated", f"this API needs {wants}")


def require(principal: Principal, scope: str) -> None:
    """Raise `AuthRefused` (403) unless the caller holds `scope`."""
    if scope not in principal.scopes:
        raise AuthRefused(403, "forbidden", f"{principal.name} lacks the {scope!r} scope")


def store_device_lookup(store: Any) -> Any:
    """A `device_scopes` for `HttpAuth`: the active enrolled device holding a certificate."""
    import grpc

    from fedge.server.device_identity import PEER_CERT_KEY, IdentityRefused, identify_peer

    def lookup(pem: bytes) -> tuple[str, frozenset[str]]:
        try:
            device = identify_peer({PEER_CERT_KEY: [pem]}, store)
        except IdentityRefused as e:
            if e.code == grpc.StatusCode.PERMISSION_DENIED:
                raise AuthRefused(403, "revoked", "device revoked") from None
            raise AuthRefused(401, "unauthenticated", e.public_message) from None
        return f"device:{device.id}", DEVICE_SCOPES

    return lookup


def auth_for_state(mode: str, state_dir: Path, tls: Any, store: Any) -> HttpAuth:
    """The coordinator's `HttpAuth` for `--http-auth mode`: its TLS files (a `TlsPaths`, or
    None under --insecure), `<state>/http-tokens.json`, and device lookups in its store."""
    if mode not in AUTH_MODES:
        raise BindRefused(f"--http-auth must be one of {', '.join(AUTH_MODES)}, not {mode!r}")
    if mode == "none":
        return HttpAuth("none")
    return HttpAuth(
        mode,
        tls_cert=tls.server_cert if tls is not None else None,
        tls_key=tls.server_key if tls is not None else None,
        client_ca=tls.ca_cert if tls is not None else None,
        tokens=TokenFile(Path(state_dir) / TOKENS_FILE) if mode in ("token", "any") else None,
        device_scopes=store_device_lookup(store) if mode in ("mtls", "any") else None,
    )
