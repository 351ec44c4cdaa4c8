"""`fedge coordinator http-token add|list|revoke`: bearer tokens for the HTTP API.

A token is printed once; `<state>/http-tokens.json` keeps only its hash and
scopes (`server/http_auth.py`). The coordinator re-reads the file when it
changes, so adding or revoking a token needs no restart. Only typer is
imported at the top.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

DEFAULT_STATE = Path("fedge-out/coordinator")

http_token_app = typer.Typer(
    help="Bearer tokens for the HTTP API (--http-auth token|any).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
_STATE = typer.Option(DEFAULT_STATE, "--state", help="The coordinator's state folder.")


def _tokens(state: Path):  # -> TokenFile
    from fedge.server.http_auth import TOKENS_FILE, TokenFile

    if not state.is_dir():
        typer.echo(f"fedge: no coordinator state folder {state}; pass --state", err=True)
        raise typer.Exit(2)
    return TokenFile(state / TOKENS_FILE)


@http_token_app.command("add")
def add_command(
    scope: list[str] = typer.Option(..., "--scope", help="read | predict; repeatable."),
    label: str = typer.Option("", "--label", help="Who or what the token is for."),
    state: Path = _STATE,
) -> None:
    """Make a token with the given scopes and print it (only this once)."""
    from fedge.server.http_auth import SCOPES

    bad = [s for s in scope if s not in SCOPES]
    if bad:
        typer.echo(f"fedge: --scope {bad[0]!r}: use {' or '.join(SCOPES)}", err=True)
        raise typer.Exit(2)
    try:
        token = _tokens(state).add(scope, label)
    except ValueError as e:
        typer.echo(f"fedge: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(token)


@http_token_app.command("list")
def list_command(state: Path = _STATE) -> None:
    """Token ids, scopes and labels (never the tokens)."""
    try:
        entries = _tokens(state).entries()
    except ValueError as e:
        typer.echo(f"fedge: {e}", err=True)
        raise typer.Exit(2) from None
    rows = [
        {"id": k, "scopes": v.get("scopes", []), "label": v.get("label", ""),
         "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.get("created", 0)))}
        for k, v in sorted(entries.items())
    ]
    sys.stdout.write(json.dumps(rows) + "\n")


@http_token_app.command("revoke")
def revoke_command(
    token_id: str = typer.Argument(..., help="The token's id (its middle part)."),
    state: Path = _STATE,
) -> None:
    """Remove a token: the next request with it is refused."""
    if not _tokens(state).revoke(token_id):
        typer.echo(f"fedge: no token {token_id!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {token_id}")
