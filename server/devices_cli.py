"""`fedge coordinator token ...` and `fedge coordinator devices ...`: the operator's side of trust.

They work on the coordinator's state folder directly (SQLite in WAL mode
allows a second process), so they run while the coordinator serves: a token
created here is usable at once, and a device revoked here is refused on its
next call. Only typer is imported at the top; the store loads when a command runs.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from fedge.server.store import Device, Store

DEFAULT_STATE = Path("fedge-out/coordinator")
_STATE_HELP = "The coordinator's state folder (as given to `fedge coordinator run --state`)."
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

token_app = typer.Typer(help="One-time enrollment tokens.", no_args_is_help=True)
devices_app = typer.Typer(help="Enrolled devices: list, show, revoke.", no_args_is_help=True)


def parse_duration(text: str) -> float:
    """`90`, `90s`, `30m`, `24h`, `7d` -> seconds."""
    m = _DURATION.fullmatch(text.strip().lower())
    if m is None or float(m.group(1)) <= 0:
        raise typer.BadParameter(
            f"{text!r} is not a duration like 30m, 24h, 7d", param_hint="--ttl"
        )
    return float(m.group(1)) * _UNITS[m.group(2)]


@token_app.command("create")
def token_create(
    ttl: str = typer.Option("24h", "--ttl", help="How long the token works: 90s, 30m, 24h, 7d."),
    uses: int = typer.Option(1, "--uses", min=1, max=100_000, help="Devices it may enroll."),
    label: str = typer.Option("", "--label", help="A note shown in listings (not secret)."),
    state: Path = typer.Option(DEFAULT_STATE, "--state", help=_STATE_HELP),
) -> None:
    """Print a new enrollment token on stdout, once; only its hash is stored."""
    from fedge.server.audit import audit
    from fedge.server.tokens import TokenBook

    seconds = parse_duration(ttl)
    with _open_store(state, create=True) as store:
        try:
            issued = TokenBook(store).create(ttl_s=seconds, uses=uses, label=label)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    audit("token_created", token_id=issued.id, label=label, uses=uses, ttl_s=seconds)
    typer.echo(issued.token)
    typer.echo(
        f"token {issued.id}: {uses} use(s), expires {_when(issued.expires)}; it is shown only "
        "now, so pass it to the device (`fedge enroll --token ...`)",
        err=True,
    )


@token_app.command("list")
def token_list(
    state: Path = typer.Option(DEFAULT_STATE, "--state", help=_STATE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Tokens with their uses and expiry (never their secrets)."""
    import time

    with _open_store(state) as store:
        tokens = store.list_enrollment_tokens()
    now = time.time()
    rows = [
        {
            "id": t.id,
            "label": t.label,
            "uses": t.uses,
            "max_uses": t.max_uses,
            "expires": _when(t.expires),
            "state": _token_state(t.revoked, t.expires <= now, t.uses >= t.max_uses),
        }
        for t in tokens
    ]
    _print_rows(rows, json_output, ("id", "label", "state", "uses", "max_uses", "expires"))


@token_app.command("revoke")
def token_revoke(
    token_id: str = typer.Argument(..., help="The token's id (the part after `fdg1.`)."),
    state: Path = typer.Option(DEFAULT_STATE, "--state", help=_STATE_HELP),
) -> None:
    """Stop a token from enrolling more devices (devices it enrolled stay)."""
    from fedge.server.audit import audit
    from fedge.server.store import StoreError

    with _open_store(state) as store:
        try:
            store.revoke_enrollment_token(token_id)
        except StoreError:
            _fail(f"no token {token_id}")
    audit("token_revoked", token_id=token_id)
    typer.echo(f"token {token_id} revoked")


@devices_app.command("list")
def devices_list(
    state: Path = typer.Option(DEFAULT_STATE, "--state", help=_STATE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Every device the coordinator knows, enrolled or not."""
    with _open_store(state) as store:
        devices = store.list_devices()
    rows = [_device_row(d) for d in devices]
    _print_rows(rows, json_output, ("id", "name", "status", "node_id", "last_seen", "enrolled"))


@devices_app.command("show")
def devices_show(
    device_id: str = typer.Argument(..., help="Device id, or a unique prefix of it."),
    state: Path = typer.Option(DEFAULT_STATE, "--state", help=_STATE_HELP),
) -> None:
    """One device in full, as JSON: identity, certificate fingerprint, status, enrollment token."""
    with _open_store(state) as store:
        device = _find(store, device_id)
    typer.echo(json.dumps(_device_row(device, full=True), indent=1))


@devices_app.command("revoke")
def devices_revoke(
    device_id: str = typer.Argument(..., help="Device id, or a unique prefix of it."),
    state: Path = typer.Option(DEFAULT_STATE, "--state", help=_STATE_HELP),
) -> None:
    """Cut a device off: its next call, and any result it is uploading, is refused."""
    from fedge.server.audit import audit
    from fedge.server.store import DeviceStatus

    with _open_store(state) as store:
        device = _find(store, device_id)
        store.set_device_status(device.id, DeviceStatus.REVOKED)
    audit("device_revoked", device_id=device.id, name=device.name)
    typer.echo(f"device {device.id} ({device.name}) revoked; its next call is refused")


def _open_store(state: Path, *, create: bool = False) -> Store:
    from fedge.server.store import Store

    db = state.expanduser() / "fedge.db"
    if not create and not db.exists():
        _fail(f"no coordinator state at {db}")
    return Store.open(db)


def _find(store: Store, key: str) -> Device:
    device = store.get_device(key)
    if device is not None:
        return device
    matches = [d for d in store.list_devices() if d.id.startswith(key)] if key else []
    if len(matches) != 1:
        _fail(f"no device {key!r}" if not matches else f"{key!r} names {len(matches)} devices")
    return matches[0]


def _device_row(d: Device, *, full: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": d.id,
        "name": d.name,
        "status": str(d.status),
        "node_id": d.node_id,
        "last_seen": _when(d.last_seen),
        "enrolled": "yes" if d.cert_fingerprint else "no",
    }
    if full:
        row.update(
            created=_when(d.created),
            cert_fingerprint=d.cert_fingerprint,
            enrolled_with_token=d.enrolled_with,
            capabilities=d.capabilities,
            num_examples=d.num_examples,
        )
    return row


def _print_rows(rows: list[dict[str, Any]], as_json: bool, columns: tuple[str, ...]) -> None:
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    Console().print(table)


def _token_state(revoked: bool, expired: bool, used_up: bool) -> str:
    if revoked:
        return "revoked"
    if expired:
        return "expired"
    return "used up" if used_up else "live"


def _when(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)
