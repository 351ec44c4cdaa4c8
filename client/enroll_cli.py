"""`fedge enroll`: make this device's key, trade a one-time token for its certificate.

Only typer is imported at the top; cryptography (and gRPC, for a gRPC
enrollment port) load when the command runs. The token is never printed:
take it from `--token` or, to keep it out of shell history and `ps`, from
the `FEDGE_ENROLL_TOKEN` variable.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

DEFAULT_DATA = Path("fedge-out/device")
EXIT_BY_STATUS = {"UNAUTHENTICATED": 2, "RESOURCE_EXHAUSTED": 3, "UNAVAILABLE": 4}
"""Exit codes a script can act on: token refused, retry later, cannot reach or trust."""


def enroll_command(
    coordinator: str = typer.Option(
        ...,
        "--coordinator",
        help="The coordinator's enrollment HOST:PORT (gRPC), or https://HOST:PORT of its HTTP "
        "API (then the device needs no gRPC).",
    ),
    token: str = typer.Option(
        ...,
        "--token",
        envvar="FEDGE_ENROLL_TOKEN",
        show_envvar=True,
        help="One-time token from `fedge coordinator token create`.",
    ),
    ca: Path = typer.Option(
        ...,
        "--ca",
        exists=True,
        dir_okay=False,
        readable=True,
        help="The coordinator's CA certificate (PEM); it authenticates the coordinator.",
    ),
    name: str = typer.Option(
        "", "--name", help="Device name shown by the coordinator (default: host name)."
    ),
    data: Path = typer.Option(
        DEFAULT_DATA, "--data", help="The device's folder; the identity goes to DATA/identity/."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Enroll again with a new key even if this folder is already enrolled.",
    ),
) -> None:
    """Enroll this device: its private key is made here and never leaves it."""
    import socket

    from fedge.client.enroll import EnrollError, enroll

    try:
        creds = enroll(
            coordinator,
            token,
            ca.read_bytes(),
            data_dir=data,
            name=name or socket.gethostname(),
            force=force,
        )
    except EnrollError as e:
        hint = {
            "UNAUTHENTICATED": " (the token is wrong, expired or used up: ask for a new one)",
            "RESOURCE_EXHAUSTED": " (too many attempts: wait a minute and retry)",
            "UNAVAILABLE": " (check the address, and that --ca is this coordinator's CA)",
        }.get(e.code, "")
        print(f"error: enrollment failed: {e}{hint}", file=sys.stderr)
        raise typer.Exit(EXIT_BY_STATUS.get(e.code, 1)) from None
    typer.echo(f"enrolled as device {creds.device_id} (node {creds.node_id})")
    typer.echo(f"certificate fingerprint (SHA-256): {creds.fingerprint}")
    typer.echo(f"device port (mutual TLS): {creds.device_target}")
    typer.echo(f"identity folder: {creds.folder}")
    typer.echo(f"Flower SuperNode key: {creds.ssh_key_path} (public: {creds.ssh_public_key_path})")
