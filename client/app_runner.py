"""Run one task through the ClientApp: bytes in, an outbox entry out.

This is the part of the edge runtime that needs Flower (and, through the
app, torch), so the runtime imports this module only when the first task
arrives: a device waiting for work holds gRPC and protobuf, nothing more.

For each task: decode the Flower `Message`, build the `Context` (run id from
the envelope, node id from Join, node config from the command line, run
config from the envelope's `run_config_json`, `state` restored from the data
folder), call the app, serialize the reply into the outbox and persist the
context's state. A failing app produces a Flower error reply, as Flower's own
runtimes do, so the server learns about it instead of waiting for a timeout.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict

from fedge.client.app_ref import DEFAULT_APP_REF
from fedge.client.device_state import DeviceFolder, OutboxEntry
from fedge.client.edge_session import DeliveredTask
from fedge.common.alloc import release_memory
from fedge.common.flower_compat import (
    ErrorCode,
    context_from_bytes,
    context_to_bytes,
    error_reply,
    message_from_bytes,
    message_to_bytes,
)

log = logging.getLogger(__name__)


ClientCallable = Callable[[Message, Context], Message]
Scalar = bool | int | float | str


class TaskUnusable(Exception):
    """The task's payload is not a Flower message: there is nothing to reply to."""


def load_client_app(ref: str) -> ClientCallable:
    """The ClientApp named `module:attr`; fedge's default comes with the compression mod.

    A user's app (a stock Flower `ClientApp` or any `(Message, Context) -> Message`
    callable) runs as is. The working directory is importable, as with `python -m`.
    """
    if ref == DEFAULT_APP_REF:
        from fedge.client.client_app import make_client_app
        from fedge.client.compression_mod import compression_mod
        from fedge.client.personal import personal_mod  # acts only when `personalize` is set

        return make_client_app(mods=[compression_mod, personal_mod])
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ValueError(f"app reference {ref!r} is not module:attr")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{ref} is a {type(obj).__name__}, not a ClientApp")
    return obj


def run_config_from_json(text: str) -> dict[str, Scalar]:
    """Flower's run_config from the envelope's JSON object; non-scalar values are skipped."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except ValueError as e:
        log.warning("run_config_json is not JSON (%s); using an empty run config", e)
        return {}
    if not isinstance(raw, dict):
        log.warning("run_config_json is not an object; using an empty run config")
        return {}
    out: dict[str, Scalar] = {}
    for k, v in raw.items():
        if isinstance(v, bool | int | float | str):
            out[str(k)] = v
        else:
            log.warning("run config key %r is not a scalar; skipped", k)
    return out


class AppRunner:
    """Runs tasks for one device: loads the app once, keeps each run's Context."""

    def __init__(
        self, app_ref: str, folder: DeviceFolder, node_config: Mapping[str, Scalar]
    ) -> None:
        self.app_ref = app_ref
        self.folder = folder
        self.node_config = dict(node_config)
        self._app: ClientCallable | None = None
        self._app_error: str = ""
        self._context: Context | None = None

    def _load(self) -> ClientCallable | None:
        if self._app is None and not self._app_error:
            try:
                self._app = load_client_app(self.app_ref)
            except Exception as e:
                self._app_error = f"cannot load ClientApp {self.app_ref!r}: {type(e).__name__}: {e}"
                log.error("%s", self._app_error)
        return self._app

    def context(self, run_id: int, node_id: int, run_config: dict[str, Scalar]) -> Context:
        """The run's Context: state from memory or disk, configs as of this task."""
        ctx = self._context
        if ctx is None or ctx.run_id != run_id:
            state = RecordDict()
            stored = self.folder.load_context(run_id)
            if stored is not None:
                try:
                    state = context_from_bytes(stored).state
                except Exception as e:  # a damaged file must not stop the device
                    log.warning("context of run %d unreadable (%s); starting afresh", run_id, e)
            ctx = Context(run_id=run_id, node_id=node_id, node_config={}, state=state,
                          run_config={})
            self._context = ctx
        ctx.node_id = node_id
        ctx.node_config = dict(self.node_config)
        ctx.run_config = run_config
        return ctx

    def run_task(self, task: DeliveredTask, node_id: int) -> OutboxEntry:
        """Execute one task and put its reply in the outbox (blocking; a worker thread).

        `task.payload` is released once decoded, so the task's bytes are not
        held while the app trains.
        """
        envelope = task.envelope
        try:
            message = message_from_bytes(task.payload)
        except Exception as e:
            raise TaskUnusable(f"payload is not a Flower message: {e}") from e
        finally:
            task.payload = b""
        context = self.context(
            int(envelope.run_id), node_id, run_config_from_json(envelope.run_config_json)
        )
        app = self._load()
        if app is None:
            reply = error_reply(message, self._app_error, ErrorCode.LOAD_CLIENT_APP_EXCEPTION)
        else:
            try:
                reply = app(message, context)
            except Exception as e:
                log.exception("task %s: the ClientApp raised", envelope.task_id)
                reply = error_reply(message, f"{type(e).__name__}: {e}")
        del message
        release_memory()  # training's garbage goes back before the reply is serialized
        data = message_to_bytes(reply)
        del reply
        entry = self.folder.write_result(
            envelope.task_id, envelope.run_id, envelope.round, envelope.message_type, data
        )
        del data
        self.folder.save_context(context.run_id, context_to_bytes(context))
        return entry
