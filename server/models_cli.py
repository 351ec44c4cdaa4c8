"""`fedge coordinator models list|show|promote|rollback|evaluate` and `fedge export`.

Both work on a coordinator's state folder (SQLite and model files) and may run
while the coordinator does: SQLite's WAL lets them read alongside it, and a
promotion is one durable transaction the coordinator sees on its next read.
`fedge export` lives here, not in `common/`, because it reads the registry
(coordinator code) and `common` never imports `server`.

Only typer is imported at the top: the `fedge` command loads this module for
every subcommand.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import typer

from fedge.common.atomic_file import atomic_write
from fedge.common.onnx_file import ONNX_FORMATS, ONNX_SOURCE_FORMAT

DEFAULT_STATE = Path("fedge-out/coordinator")
FORMATS = ("fp32", "fp16", "int8", "int4", *ONNX_FORMATS)
"""fedge.common.export.EXPORT_FORMATS (repeated: that module loads numpy) + the ONNX ones."""

models_app = typer.Typer(
    help="Model versions: list, show, promote, roll back, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

_STATE = typer.Option(DEFAULT_STATE, "--state", help="The coordinator's state folder.")
_JSON = typer.Option(False, "--json", help="Print JSON.")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"fedge: {message}", err=True)
    return typer.Exit(1)


@contextmanager
def _registry(state: Path) -> Iterator[Any]:
    """The registry of a state folder; refuses a folder with no coordinator state."""
    from fedge.server.model_store import ModelStore, ModelStoreError
    from fedge.server.registry import Registry, RegistryError
    from fedge.server.store import Store, StoreError

    db = state / "fedge.db"
    if not db.exists():
        raise _fail(f"no coordinator state in {state} (no fedge.db); pass --state")
    try:
        store = Store.open(db)
    except StoreError as e:
        raise _fail(f"cannot open {db}: {e}") from None
    try:
        yield Registry(store, ModelStore(state / "models"))
    except (RegistryError, ModelStoreError) as e:
        raise _fail(str(e)) from None
    finally:
        store.close()


def _when(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _metric(record: Any, key: str) -> str:
    v = record.evaluation.get(key)
    return "" if v is None else f"{v:.4f}"


def _figures(values: dict[str, float]) -> str:
    return ", ".join(
        f"{k} {int(v)}" if float(v).is_integer() else f"{k} {v:.4f}" for k, v in values.items()
    )


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")


@models_app.command("list")
def list_command(state: Path = _STATE, json_output: bool = _JSON) -> None:
    """Every model version, oldest first, with status and central evaluation."""
    with _registry(state) as reg:
        records = reg.list_models()
        current = reg.current()
    if json_output:
        _print_json({"current": current, "models": [r.to_dict() for r in records]})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"models in {state} (current: {current[:12] if current else 'none'})")
    for col in ("version", "status", "round", "parent", "accuracy", "loss", "created"):
        table.add_column(col, no_wrap=True)
    for r in records:
        table.add_row(
            r.version[:12],
            str(r.status),
            str(r.round),
            (r.parent_version or "")[:8],
            _metric(r, "accuracy"),
            _metric(r, "loss"),
            time.strftime("%m-%d %H:%M", time.localtime(r.created)),
        )
    Console().print(table)


@models_app.command("show")
def show_command(
    version: str = typer.Argument(..., help="Version: 'current', a hash or a unique prefix."),
    state: Path = _STATE,
    json_output: bool = _JSON,
) -> None:
    """One version: lineage back to the first model, evaluation, task, promotions."""
    with _registry(state) as reg:
        record = reg.get(version)
        lineage = reg.lineage(record.version)
        history = [p for p in reg.history() if p.version == record.version]
        task = reg.task_name(record.version)
        size = reg.models.size(record.version)
    doc = {
        **record.to_dict(),
        "task": task,
        "file_bytes": size,
        "lineage": [r.version for r in lineage],
        "promotions": [p.__dict__ for p in history],
    }
    if json_output:
        _print_json(doc)
        return
    typer.echo(f"version    {record.version}")
    typer.echo(
        f"status     {record.status}"
        + (f" ({record.status_reason})" if record.status_reason else "")
    )
    typer.echo(f"task       {task}")
    typer.echo(f"run/round  {record.run_id} / {record.round}")
    typer.echo(f"created    {_when(record.created)} by {record.created_by}")
    typer.echo(f"file       {size:,} bytes (fp32 snapshot)")
    ev = _figures(dict(sorted(record.evaluation.items()))) or "none"
    typer.echo(f"evaluation {ev}")
    typer.echo("lineage    " + " <- ".join(r.version[:12] for r in lineage))
    for p in history:
        undone = f", rolled back {_when(p.rolled_back)}" if p.rolled_back else ""
        typer.echo(f"promoted   {_when(p.at)} {p.reason}{undone}")


@models_app.command("promote")
def promote_command(
    version: str = typer.Argument(..., help="Version: a hash or a unique prefix."),
    reason: str = typer.Option("manual", "--reason", help="Kept in the promotion history."),
    state: Path = _STATE,
) -> None:
    """Make a version current: devices and the HTTP endpoint serve it from now on."""
    with _registry(state) as reg:
        record = reg.promote(version, reason=reason)
    typer.echo(f"current is now {record.version}")


@models_app.command("rollback")
def rollback_command(
    reason: str = typer.Option("manual", "--reason", help="Kept in the promotion history."),
    state: Path = _STATE,
) -> None:
    """Undo the latest promotion: the version current before it is current again."""
    with _registry(state) as reg:
        record = reg.rollback(reason=reason)
    typer.echo(f"rolled back; current is now {record.version}")


@models_app.command("evaluate")
def evaluate_command(
    version: str = typer.Argument("current", help="Version: 'current', a hash or a prefix."),
    state: Path = _STATE,
) -> None:
    """Evaluate a version on its task's central test set and record the figures."""
    with _registry(state) as reg:
        figures = reg.evaluate(version)
        full = reg.resolve(version)
    typer.echo(f"{full}: {_figures(figures)}")


def export_command(
    version: str = typer.Option("current", "--version", help="'current', a hash or a prefix."),
    fmt: str = typer.Option("int8", "--format", click_type=click.Choice(FORMATS),
                            help="How the weights are stored."),
    out: Path = typer.Option(..., "--out", help="File to write (replaced atomically)."),
    state: Path = _STATE,
) -> None:
    """Write a model version as a self-checking export file for devices (`fedge predict`)."""
    if fmt not in FORMATS:
        raise _fail(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    onnx = fmt in ONNX_FORMATS
    if onnx and out.suffix != ".onnx":
        raise _fail(f"--out {out}: an ONNX export is named *.onnx (fedge predict goes by it)")
    if onnx:
        try:
            from fedge.common.onnx_export import to_onnx
        except ImportError:
            raise _fail("--format onnx needs the onnx package: pip install 'fedge[onnx]'") from None
    with _registry(state) as reg:
        full = reg.resolve(version)
        data = reg.export(full, ONNX_SOURCE_FORMAT.get(fmt, fmt))
    if onnx:
        from fedge.common.export import parse_model_file
        from fedge.common.onnx_file import OnnxFileError

        try:
            data = to_onnx(parse_model_file(data), fmt)
        except OnnxFileError as e:
            raise _fail(f"cannot export {full[:12]} as {fmt}: {e.detail}") from None
    atomic_write(out, data, 0o644, prefix=f".{out.name}.", make_parents=True)
    typer.echo(f"wrote {out}: {full[:12]} as {fmt}, {len(data):,} bytes")


