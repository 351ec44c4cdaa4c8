"""A device's data folder: its identity, Flower context state and result outbox.

Everything a device must not lose across a crash, a reboot or `kill -9` lives
here, written atomically (temporary file, fsync, rename), so a reader only
ever sees a whole file:

    <data>/device.json          stable device id (and the last node id and name)
    <data>/context-<run>.pb     Flower Context of a run (Flower's protobuf): context.state
                                holds e.g. the error-feedback residual between rounds
    <data>/outbox/<t>.bin       a result waiting to be uploaded (Flower Message protobuf)
    <data>/outbox/<t>.json      its sidecar: task id, run, round, size, sha256

A result is written to the outbox before its upload starts, so a device
killed mid-upload finishes it after a restart from the coordinator's offset.
No Flower or gRPC here: the runtime hands bytes in and out.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from fedge.common.atomic_file import atomic_write
from fedge.common.chunking import is_sha256_hex, sha256_file, sha256_hex

log = logging.getLogger(__name__)

IDENTITY_FILE = "device.json"
OUTBOX_DIR = "outbox"
LOCK_FILE = ".lock"
KEEP_CONTEXTS = 4
"""Context files kept (newest first): each may hold a model-sized residual."""

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class DeviceFolderError(RuntimeError):
    """The data folder cannot be used (not writable, or another process holds it)."""


@dataclass
class Identity:
    """Who this device is: the id it joins with (kept forever) and what it last learnt."""

    device_id: str
    name: str = ""
    node_id: int = 0


@dataclass(frozen=True)
class OutboxEntry:
    """A result on disk waiting for its upload; `path` holds exactly `size` bytes."""

    task_id: str
    run_id: int
    round: int
    message_type: str
    size: int
    sha256: str
    created: float
    path: Path

    @property
    def sidecar(self) -> Path:
        return self.path.with_suffix(".json")


def _file_name(task_id: str) -> str:
    """A safe file name for a task id (ids come from the network)."""
    if _SAFE_NAME.fullmatch(task_id) and not task_id.endswith((".json", ".bin")):
        return task_id
    return "t-" + sha256_hex(task_id.encode())[:40]


class DeviceFolder:
    """The data folder of one device process; `lock()` keeps a second process out."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()
        self.outbox_dir = self.root / OUTBOX_DIR
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.outbox_dir.mkdir(exist_ok=True, mode=0o700)
        except OSError as e:
            raise DeviceFolderError(f"cannot use data folder {self.root}: {e}") from e
        self._lock_fd: int | None = None

    # ------------------------------------------------------------- lock

    def lock(self) -> None:
        """Hold an exclusive lock on the folder (released by the OS if the process dies)."""
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DeviceFolderError(
                f"another device process is using {self.root} (one process per data folder)"
            ) from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --------------------------------------------------------- identity

    def load_identity(self, name: str = "") -> Identity:
        """The stored identity, or a new one with a fresh random device id (saved at once)."""
        path = self.root / IDENTITY_FILE
        if path.exists():
            try:
                raw = json.loads(path.read_text())
                ident = Identity(
                    device_id=str(raw["device_id"]),
                    name=str(raw.get("name", "")),
                    node_id=int(raw.get("node_id", 0)),
                )
            except (ValueError, KeyError, TypeError) as e:
                raise DeviceFolderError(f"{path} is not a device identity ({e})") from e
            if not ident.device_id:
                raise DeviceFolderError(f"{path} has an empty device_id")
            if name and name != ident.name:
                ident.name = name
                self.save_identity(ident)
            return ident
        ident = Identity(device_id=uuid.uuid4().hex, name=name)
        self.save_identity(ident)
        return ident

    def save_identity(self, ident: Identity) -> None:
        atomic_write(self.root / IDENTITY_FILE, json.dumps(asdict(ident), indent=1).encode())

    # ---------------------------------------------------------- context

    def context_path(self, run_id: int) -> Path:
        return self.root / f"context-{int(run_id)}.pb"

    def load_context(self, run_id: int) -> bytes | None:
        """The stored Context bytes of a run (Flower protobuf), or None."""
        path = self.context_path(run_id)
        return path.read_bytes() if path.exists() else None

    def save_context(self, run_id: int, data: bytes) -> None:
        """Keep a run's Context; only the newest `KEEP_CONTEXTS` runs' files stay."""
        atomic_write(self.context_path(run_id), data)
        files = sorted(
            self.root.glob("context-*.pb"), key=lambda p: p.stat().st_mtime_ns, reverse=True
        )
        for old in files[KEEP_CONTEXTS:]:
            old.unlink(missing_ok=True)

    # ----------------------------------------------------------- outbox

    def write_result(
        self, task_id: str, run_id: int, round_: int, message_type: str, data: bytes
    ) -> OutboxEntry:
        """Put a result in the outbox: payload first, then its sidecar (the commit)."""
        stem = _file_name(task_id)
        entry = OutboxEntry(
            task_id=task_id,
            run_id=int(run_id),
            round=int(round_),
            message_type=message_type,
            size=len(data),
            sha256=sha256_hex(data),
            created=time.time(),
            path=self.outbox_dir / f"{stem}.bin",
        )
        atomic_write(entry.path, data)
        meta = {k: v for k, v in asdict(entry).items() if k != "path"}
        atomic_write(entry.sidecar, json.dumps(meta).encode())
        return entry

    def outbox(self) -> list[OutboxEntry]:
        """Results waiting for upload, oldest first; half-written or damaged ones are removed."""
        entries: list[OutboxEntry] = []
        for tmp in self.outbox_dir.glob(".tmp-*"):
            tmp.unlink(missing_ok=True)
        for sidecar in self.outbox_dir.glob("*.json"):
            entry = self._read_entry(sidecar)
            if entry is None:
                log.warning("outbox: dropping damaged entry %s", sidecar.stem)
                sidecar.unlink(missing_ok=True)
                sidecar.with_suffix(".bin").unlink(missing_ok=True)
            else:
                entries.append(entry)
        kept = {e.path for e in entries}
        for payload in self.outbox_dir.glob("*.bin"):
            if payload not in kept:  # killed between payload and sidecar: never announced
                payload.unlink(missing_ok=True)
        return sorted(entries, key=lambda e: e.created)

    def _read_entry(self, sidecar: Path) -> OutboxEntry | None:
        try:
            meta = json.loads(sidecar.read_text())
            entry = OutboxEntry(
                task_id=str(meta["task_id"]),
                run_id=int(meta["run_id"]),
                round=int(meta["round"]),
                message_type=str(meta.get("message_type", "")),
                size=int(meta["size"]),
                sha256=str(meta["sha256"]),
                created=float(meta.get("created", 0.0)),
                path=sidecar.with_suffix(".bin"),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not is_sha256_hex(entry.sha256) or not entry.path.is_file():
            return None
        if entry.path.stat().st_size != entry.size or sha256_file(entry.path) != entry.sha256:
            return None
        return entry

    def remove(self, entry: OutboxEntry) -> None:
        """Forget a result (uploaded, or refused for good): sidecar first, then payload."""
        entry.sidecar.unlink(missing_ok=True)
        entry.path.unlink(missing_ok=True)
