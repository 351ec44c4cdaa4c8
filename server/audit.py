"""Security events as one structured log line each, on the `fedge.audit` logger.

Enrollment, refusals (with their internal reason, which the wire never
shows), and revocations are written here so an operator can answer "who
enrolled this device, with which token, and who was turned away". Events
carry only ids, reasons and addresses: a field whose name could hold a
secret is redacted, so a careless call cannot leak a token into a log file.
Round contributors are the store's job (`rounds`).
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("fedge.audit")

_FORBIDDEN = ("token", "secret", "key", "password", "csr")
"""Substrings a field name must not contain (`token_id` is allowed: ids are not secrets)."""

Scalar = str | int | float | bool | None


def audit(event: str, **fields: Scalar) -> None:
    """Log one audit event, e.g. `audit("enrolled", device_id=..., token_id=..., peer=...)`.

    Never raises: it runs after state changes (a device row committed) where
    an exception would lose a reply. A field whose name could hold a secret
    is written as "<redacted>" instead.
    """
    if not log.isEnabledFor(logging.INFO):
        return
    safe = {
        name: "<redacted>" if _risky(name) else value if isinstance(value, Scalar) else str(value)
        for name, value in fields.items()
    }
    log.info("%s %s", event, json.dumps(safe, sort_keys=True, default=str))


def _risky(name: str) -> bool:
    return name != "token_id" and any(word in name.lower() for word in _FORBIDDEN)
