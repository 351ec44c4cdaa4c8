"""Result intake: whether an uploaded result counts, apart from how its bytes arrived.

The gRPC servicer (`coordinator_service.py`) moves bytes; this module
decides, and knows nothing of gRPC. `admit` looks at an upload's header
before any byte is held: the task must be this device's, the header must
name its run and round, the task must still be open and its result not
refused before. `take` looks at the whole upload, in this order, each step
only on what the previous one vouched for:

1. the payload's SHA-256: the bytes are the ones the header announced;
2. under mTLS, the device's signature over run, round, task id and that
   hash: the bytes are the device's, for this task (nothing is decoded
   before this);
3. the Flower reply: parsed (not converted: the strategy checks the
   content) and answering this very task from this device's node, run and
   message type;
4. under mTLS, the device once more: one revoked while uploading is not
   counted;
5. counting it (`Fleet.complete`): once, and only while the round is open.

Every refusal is one `ResultRefused` whose `reason` the servicer maps to a
gRPC status (`coordinator_service.STATUS_BY_REFUSAL`, as `common/chunking.py`
maps its own reasons). From step 2 on a refusal is final: the result row is
rejected with its reason and the task dropped, so the round goes on without
it. `first_device_error` keeps the first thing a device got wrong, for the
one line a run that aggregated nothing ends with.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NoReturn

from fedge.common import flower_compat as fc
from fedge.common.chunking import ChunkError
from fedge.common.errors import ReasonError
from fedge.common.signing import SignatureInvalid, verify_result
from fedge.server.audit import audit
from fedge.server.device_identity import IdentityRefused, identify_peer, peer_cert_pem
from fedge.server.fleet import DeviceEntry, Fleet, TaskPayload
from fedge.server.store import ResultStatus, Store
from fedge.server.uploads import Upload

log = logging.getLogger(__name__)

RefusalReason = Literal[
    "unknown_task",  # no such task, or not this device's
    "wrong_task",  # the header names another run or round, or an unknown payload format
    "rejected_before",  # this task's result was refused for good earlier
    "round_closed",  # the round closed or the task expired
    "hash_mismatch",  # the bytes are not the ones announced: send again from 0
    "incomplete",  # bytes are missing: resume
    "bad_signature",  # not signed by the device for this task
    "invalid_reply",  # not a Flower reply to this task from this device
    "device_unknown",  # (mTLS) no enrolled device holds the certificate any more
    "device_revoked",  # (mTLS) the device was revoked while uploading
]

Intake = Literal["accepted", "duplicate"]
"""What `take` did with a result: counted it, or found it counted already."""

AuthContext = Mapping[str, Iterable[bytes]]

_TASK_ID = re.compile(r"[0-9a-f]{32}")
_ERROR_CHARS = 300


class ResultRefused(ReasonError):
    """A result that is not counted: `reason` (a `RefusalReason`) and what the device is told."""

    what = ""  # the detail is what the device reads in the status
    reason: RefusalReason

    def __init__(self, reason: RefusalReason, detail: str = "") -> None:
        super().__init__(reason, detail)


class ResultIntake:
    """Checks and counts results against the store and the fleet; safe across threads."""

    def __init__(self, store: Store, fleet: Fleet) -> None:
        self.store = store
        self.fleet = fleet
        self.first_device_error: str | None = None

    # ------------------------------------------------------------ before the bytes

    def admit(
        self, entry: DeviceEntry, task_id: str, *, run_id: int, round: int, known_format: bool
    ) -> TaskPayload | Literal["duplicate"]:
        """The live task an upload may fill, or "duplicate" if its result is counted already.

        `known_format`: the header declares a payload format the servicer
        reads. Raises ResultRefused before anything about the upload is stored.
        """
        row = self.store.get_task(task_id) if _TASK_ID.fullmatch(task_id) else None
        if row is None or row.device_id != entry.device_id:
            raise ResultRefused("unknown_task", "unknown task")
        if run_id != row.run_id or round != row.round:
            raise ResultRefused(
                "wrong_task",
                f"header names run {run_id} round {round}; the task is "
                f"run {row.run_id} round {row.round}",
            )
        if not known_format:
            raise ResultRefused("wrong_task", "unknown payload_format")
        result = self.store.get_result(task_id)
        if result is not None and result.status == ResultStatus.COMPLETE:
            return "duplicate"
        if result is not None and result.status == ResultStatus.REJECTED:
            raise ResultRefused("rejected_before", f"result rejected: {result.reason}")
        live = self.fleet.task(task_id)
        if live is None or live.deadline < self.fleet.now():
            raise ResultRefused("round_closed", "round closed or task expired")
        return live

    # ------------------------------------------------------------ the whole upload

    def take(
        self,
        upload: Upload,
        entry: DeviceEntry,
        task: TaskPayload,
        *,
        signature: bytes,
        payload_sha256: str,
        auth_context: AuthContext | None = None,
    ) -> Intake:
        """Verify, validate and count a whole upload (see the module docstring for the order).

        `auth_context` is the call's under mTLS, None without (`--insecure`:
        no signature, no identity). Runs in a worker thread: it hashes and parses.
        """
        task_id = task.task_id
        try:
            data = upload.payload()
        except ChunkError as e:
            if e.reason == "hash_mismatch":
                upload.discard()
                self.store.record_progress(task_id, 0)
                raise ResultRefused(
                    "hash_mismatch", f"{e.detail}; send again from offset 0"
                ) from None
            self.store.record_progress(task_id, upload.offset)
            raise ResultRefused("incomplete", str(e)) from None
        if auth_context is not None:
            try:  # before anything is decoded: the bytes are the device's, for this task
                verify_result(
                    peer_cert_pem(auth_context) or b"",
                    signature,
                    run_id=task.run_id,
                    round=task.round,
                    task_id=task_id,
                    payload_sha256=payload_sha256,
                )
            except SignatureInvalid as e:
                del data
                audit("result_refused", reason="bad_signature", detail=e.reason, task=task_id,
                      device=entry.device_id)
                self._refuse(upload, entry, task, "bad_signature", "bad_signature",
                             detail=e.reason)
        mismatch, parsed = _check_reply(data, task_id, entry, task)
        del data  # the parsed message holds the bytes from here on
        if mismatch is not None:
            self._refuse(upload, entry, task, "invalid_reply", mismatch)
        if auth_context is not None:
            try:  # revoked while uploading: refused, nothing counted
                identify_peer(auth_context, self.store)
            except IdentityRefused as e:
                audit("device_refused", reason=e.reason, device=entry.device_id, task=task_id)
                reason: RefusalReason = (
                    "device_revoked" if e.reason == "revoked" else "device_unknown"
                )
                self._refuse(upload, entry, task, reason, "device_refused",
                             detail=e.reason, told=e.public_message)
        self._note_error_reply(entry, parsed)
        counted = self.fleet.complete(
            task_id, upload.path, self.store.complete_result, parsed, upload.total_size
        )
        if counted == "closed":
            upload.discard()
            self.store.reject_result(task_id, "round_closed")
            raise ResultRefused("round_closed", "round closed or task expired")
        if counted == "duplicate":
            upload.discard()
        return counted

    # ------------------------------------------------------------ internals

    def _refuse(
        self,
        upload: Upload,
        entry: DeviceEntry,
        task: TaskPayload,
        reason: RefusalReason,
        why: str,
        *,
        detail: str = "",
        told: str | None = None,
    ) -> NoReturn:
        """Refuse for good: the row keeps `why`, the round goes on without the task.

        `detail` goes to the log only; `told` replaces what the device hears.
        """
        upload.discard()
        self.store.reject_result(task.task_id, why)
        self.fleet.drop(task.task_id)
        full = f"{why}: {detail}" if detail else why
        log.warning("result of task %s rejected (%s)", task.task_id, full)
        self._note(entry, f"result rejected: {full}")
        raise ResultRefused(reason, told if told is not None else f"result rejected: {why}")

    def _note_error_reply(self, entry: DeviceEntry, parsed: Any) -> None:
        """A reply that carries a Flower error (the device's app raised) is counted, and noted."""
        if parsed.HasField("error"):
            self._note(entry, str(parsed.error.reason) or f"error code {parsed.error.code}")

    def _note(self, entry: DeviceEntry, what: str) -> None:
        if self.first_device_error is None:
            line = " ".join(what.split())[:_ERROR_CHARS]
            self.first_device_error = f"device {entry.device_id} ({entry.name}): {line}"


def _check_reply(
    data: bytes, task_id: str, entry: DeviceEntry, task: TaskPayload
) -> tuple[str | None, Any]:
    """(why the payload is not a Flower reply to `task_id` from this device, the parsed message).

    The content is parsed (protobuf) but not converted: the strategy checks it.
    """
    try:
        parsed = fc.parse_message(data)
        md = fc.parsed_metadata(parsed)
    except Exception as e:  # protobuf and Flower raise several types for garbage
        return f"malformed: not a Flower message ({type(e).__name__})", None
    return _reply_mismatch(md, task_id, entry, task), parsed


def _reply_mismatch(md: Any, task_id: str, entry: DeviceEntry, task: TaskPayload) -> str | None:
    if md.reply_to_message_id != task_id:
        return "not_a_reply: reply_to_message_id does not name this task"
    if md.src_node_id != entry.node_id:
        return "wrong_node: src_node_id is not this device's node id"
    if md.run_id != task.run_id:
        return f"wrong_run: the reply names run {md.run_id}"
    if md.message_type != task.message_type:
        return f"wrong_type: {md.message_type!r} answers a {task.message_type!r} task"
    return None
