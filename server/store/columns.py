"""How values are kept in columns: Flower's unsigned ids as SQLite's signed integers, and
JSON text for dicts. Internal to the package.
"""

from __future__ import annotations

import json
from typing import Any

from fedge.server.store.records import StoreError

_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


def to_i64(value: int) -> int:
    """Flower's unsigned 64-bit id as SQLite's signed integer."""
    if not 0 <= value < _U64:
        raise StoreError("bad_id", f"{value} is not an unsigned 64-bit id")
    return value - _U64 if value > _I64_MAX else value


def to_u64(value: int) -> int:
    """A stored (signed) id back as Flower's unsigned 64-bit id."""
    return value + _U64 if value < 0 else value


def to_u64_or_none(value: int | None) -> int | None:
    return None if value is None else to_u64(value)


def json_object(text: str | None) -> dict[str, Any]:
    """A JSON column that holds an object; NULL or empty reads as {}."""
    return dict(json.loads(text or "{}"))


def to_json(value: Any) -> str:
    """What JSON columns hold: keys sorted, so equal values are equal text."""
    return json.dumps(value, sort_keys=True)
