"""Devices and the enrollment tokens that admit them (tables `devices`, `enrollment_tokens`)."""

from __future__ import annotations

import secrets
import sqlite3
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from fedge.server.store.columns import json_object, to_i64, to_json, to_u64
from fedge.server.store.records import Device, DeviceStatus, EnrollmentToken, StoreError
from fedge.server.store.sqlite import RowMapper, SqliteTables, existing, one, require

_device = RowMapper(Device, node_id=to_u64, status=DeviceStatus, capabilities=json_object)
_token = RowMapper(EnrollmentToken, revoked=bool)


class DeviceTables(SqliteTables):
    """Who may take part: devices, their certificates, and the tokens they enrolled with."""

    def register_device(
        self,
        name: str,
        *,
        device_id: str | None = None,
        capabilities: Mapping[str, Any] | None = None,
        num_examples: int = 0,
    ) -> Device:
        """Insert a device, or refresh a known one (name, capabilities, last_seen).

        A known device keeps its id, node id and status (a revoked device stays
        revoked). A new device gets a fresh id unless it proposes one.
        """
        now = self._clock()
        caps = to_json(dict(capabilities or {}))
        with self._tx() as c:
            if device_id is not None and one(c, "SELECT 1 FROM devices WHERE id=?", device_id):
                c.execute(
                    "UPDATE devices SET name=?, capabilities=?, num_examples=?, last_seen=?"
                    " WHERE id=?",
                    (name, caps, num_examples, now, device_id),
                )
                return _device(existing(c, "SELECT * FROM devices WHERE id=?", device_id))
            return _insert_device(
                c, device_id or uuid.uuid4().hex, name, now,
                capabilities=caps, num_examples=num_examples,
            )  # fmt: skip

    def get_device(self, device_id: str) -> Device | None:
        return _device.or_none(self._select_one("devices", id=device_id))

    def get_device_by_node(self, node_id: int) -> Device | None:
        return _device.or_none(self._select_one("devices", node_id=to_i64(node_id)))

    def get_device_by_fingerprint(self, fingerprint: str) -> Device | None:
        return _device.or_none(self._select_one("devices", cert_fingerprint=fingerprint))

    def list_devices(self, status: DeviceStatus | None = None) -> list[Device]:
        return [_device(r) for r in self._select("devices", status=status, order="created, id")]

    def touch_devices(self, device_ids: Iterable[str], when: float | None = None) -> None:
        """Set last_seen for many devices in one commit (heartbeats are batched)."""
        when = self._clock() if when is None else when
        with self._tx() as c:
            c.executemany(
                "UPDATE devices SET last_seen=? WHERE id=?", [(when, d) for d in device_ids]
            )

    def set_device_status(self, device_id: str, status: DeviceStatus) -> None:
        with self._tx() as c:
            require(
                c.execute("UPDATE devices SET status=? WHERE id=?", (status, device_id)),
                "device",
                device_id,
            )

    # -- enrollment tokens (issue 5) -----------------------------------------

    def add_enrollment_token(
        self, token_id: str, secret_hash: str, *, label: str, expires: float, max_uses: int
    ) -> EnrollmentToken:
        """Record a new token by its id and the hash of its secret."""
        if max_uses < 1:
            raise StoreError("bad_token", "max_uses must be at least 1")
        with self._tx() as c:
            if one(c, "SELECT 1 FROM enrollment_tokens WHERE id=?", token_id):
                raise StoreError("exists", f"token {token_id}")
            c.execute(
                "INSERT INTO enrollment_tokens (id, secret_hash, label, created, expires,"
                " max_uses) VALUES (?,?,?,?,?,?)",
                (token_id, secret_hash, label, self._clock(), expires, max_uses),
            )
            return _token(existing(c, "SELECT * FROM enrollment_tokens WHERE id=?", token_id))

    def get_enrollment_token(self, token_id: str) -> EnrollmentToken | None:
        return _token.or_none(self._select_one("enrollment_tokens", id=token_id))

    def list_enrollment_tokens(self) -> list[EnrollmentToken]:
        return [_token(r) for r in self._select("enrollment_tokens", order="created")]

    def revoke_enrollment_token(self, token_id: str) -> None:
        with self._tx() as c:
            require(
                c.execute("UPDATE enrollment_tokens SET revoked=1 WHERE id=?", (token_id,)),
                "token",
                token_id,
            )

    def enroll_device(
        self,
        token_id: str,
        secret_hash: str,
        *,
        device_id: str,
        name: str,
        cert_fingerprint: str,
    ) -> Device:
        """Spend one use of a token and add the device with its certificate, atomically.

        The use is counted by a conditional UPDATE (live, unrevoked, hash
        matching, uses left) in the same transaction as the device insert, so
        two racing enrollments cannot both spend a token's last use, and a
        failure leaves neither a spent use nor a device row.
        """
        now = self._clock()
        with self._tx(durable=True) as c:
            cur = c.execute(
                "UPDATE enrollment_tokens SET uses=uses+1, last_used=? WHERE id=? AND"
                " secret_hash=? AND revoked=0 AND uses<max_uses AND expires>?",
                (now, token_id, secret_hash, now),
            )
            if cur.rowcount != 1:
                raise StoreError("token_refused", f"token {token_id}")
            if one(c, "SELECT 1 FROM devices WHERE id=?", device_id):
                raise StoreError("exists", f"device {device_id}")
            return _insert_device(
                c, device_id, name, now, cert_fingerprint=cert_fingerprint, enrolled_with=token_id
            )


def _insert_device(
    c: sqlite3.Connection, device_id: str, name: str, now: float, **columns: Any
) -> Device:
    """Add an active device with a fresh node id; `columns` are the other columns to set."""
    values = {
        "id": device_id,
        "node_id": _new_node_id(c),
        "name": name,
        "created": now,
        "last_seen": now,
        "status": DeviceStatus.ACTIVE,
        **columns,
    }
    c.execute(
        f"INSERT INTO devices ({', '.join(values)}) VALUES ({','.join('?' * len(values))})",
        tuple(values.values()),
    )
    return _device(existing(c, "SELECT * FROM devices WHERE id=?", device_id))


def _new_node_id(c: sqlite3.Connection) -> int:
    """A random Flower node id, unused, never 0 or Flower's SuperLink id (1)."""
    while True:
        node_id = secrets.randbits(63)
        if node_id > 1 and not one(c, "SELECT 1 FROM devices WHERE node_id=?", node_id):
            return node_id
