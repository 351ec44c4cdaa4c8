"""A user's Flower objects named `module:object`: a `ServerApp` or a strategy.

`fedge coordinator run --server-app module:app` runs a user's own ServerApp
on the coordinator's Grid, and `--strategy module:object` hands fedge's own
ServerApp a user's strategy. Both are named the way Flower names app
components (`[tool.flwr.app.components]`), and both are checked here before
anything starts or is stored: a reference that does not import, or names
something else, is one `AppRefError` line (the CLI exits 2 with it). The
working directory is importable, as with `flwr run` and `python -m`.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import Strategy


class AppRefError(ValueError):
    """A `module:object` reference that cannot be used; the message is one line."""


def is_object_ref(text: str) -> bool:
    """True for `module:object` (what `--strategy` takes besides a built-in name)."""
    return ":" in text


def load_object(ref: str, flag: str) -> Any:
    """The object `ref` names (dotted attributes allowed); `flag` names it in a refusal."""
    module_name, sep, attr_path = ref.strip().partition(":")
    if not module_name or not sep or not attr_path:
        raise AppRefError(f"{flag} {ref!r} is not module:object (e.g. my_app.server_app:app)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # the module itself may fail: say so in one line
        why = " ".join(str(e).split()) or type(e).__name__
        raise AppRefError(f"{flag} {ref!r}: cannot import {module_name!r} ({why}); run from the "
                          "app's folder or install its package") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise AppRefError(f"{flag} {ref!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    return obj


def load_server_app(ref: str) -> ServerApp:
    """The Flower `ServerApp` `ref` names."""
    obj = load_object(ref, "--server-app")
    if not isinstance(obj, ServerApp):
        raise AppRefError(f"--server-app {ref!r} is a {type(obj).__name__}, not a Flower "
                          "ServerApp (flwr.serverapp.ServerApp)")
    return obj


def load_strategy(ref: str) -> Strategy:
    """The Flower `Strategy` `ref` names: an instance, or a zero-argument factory (a class)."""
    obj = load_object(ref, "--strategy")
    if isinstance(obj, Strategy):
        return obj
    if callable(obj):
        try:
            made = obj()
        except TypeError as e:
            raise AppRefError(f"--strategy {ref!r} is neither a Flower Strategy nor a "
                              f"zero-argument factory of one ({e})") from None
        if isinstance(made, Strategy):
            return made
        raise AppRefError(f"--strategy {ref!r}() returned a {type(made).__name__}, not a "
                          "Flower Strategy")
    raise AppRefError(f"--strategy {ref!r} is a {type(obj).__name__}, not a Flower Strategy")
