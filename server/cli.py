"""`fedge coordinator run`: the command's options; the coordinator itself loads lazily.

Only typer is imported at the top, so `fedge --help` and the device's own
commands never pay for the coordinator's imports (grpc, SQLite, torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer


def parse_run_config(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs as a run config; values are JSON scalars when they parse as one."""
    config: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--run-config")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if not isinstance(value, str | int | float | bool):
            raise typer.BadParameter(f"{key}: only scalars", param_hint="--run-config")
        config[key.strip()] = value
    return config


def run_command(
    state: Path = typer.Option(Path("fedge-out/coordinator"), help="State folder (SQLite, "
                               "models, TLS). Restarting with the same folder resumes the run."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 for every interface."),
    port: int = typer.Option(9092, min=0, max=65535, help="Port; 0 picks a free one (printed)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plaintext gRPC (no TLS, no "
                                  "device identity: any caller can join; lab use only)."),
    enroll_port: int | None = typer.Option(None, "--enroll-port", min=0, max=65535,
                                           help="Enrollment port (server TLS; `fedge enroll` "
                                           "talks to it). Default 9095, or a free one when "
                                           "--port is 0 (printed)."),
    task: str = typer.Option("digits", help="digits | fashion-mnist | module:object."),
    codec: str = typer.Option("int8", help="Codec devices use for their updates."),
    rounds: int = typer.Option(5, min=1, help="Federated rounds."),
    min_devices: int = typer.Option(2, min=1, help="Devices that must join before round 1."),
    min_train_nodes: int | None = typer.Option(None, min=1, help="Devices per round at least "
                                               "(default: min(2, --min-devices))."),
    round_timeout: float = typer.Option(600.0, min=0.1, help="Seconds a round waits for results; "
                                        "devices that have not answered are left out."),
    strategy: str = typer.Option("fedavg", help="fedavg | fedprox | fedadam | fedyogi | "
                                 "fedmedian | fedtrimmedavg | krum."),
    chunk_size: int = typer.Option(1 << 20, min=1, max=2 << 20, help="Transfer chunk, bytes."),
    max_result_bytes: int = typer.Option(256 << 20, min=1, help="Largest result accepted, bytes."),
    heartbeat_interval: float = typer.Option(5.0, min=0.1, help="Device heartbeat, seconds."),
    run_config: list[str] = typer.Option([], "--run-config", help="More run config, KEY=VALUE "
                                         "(e.g. lr=0.1, local-epochs=2, seed=1); repeatable."),
    tls_hostname: list[str] = typer.Option([], "--tls-hostname", help="Extra name or IP for the "
                                           "server certificate; repeatable."),
    keep_serving: bool = typer.Option(False, "--keep-serving", help="Serve on after the run."),
    new_run: bool = typer.Option(False, "--new-run", help="Start a new run even if one can be "
                                 "resumed (the old one is marked stopped)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the service does."),
    http_port: int | None = typer.Option(None, "--http-port", min=0, max=65535, help="Serve the "
                                         "HTTP API (models, predict, /metrics) on this port; "
                                         "0 picks a free one (printed)."),
    http_host: str = typer.Option("127.0.0.1", "--http-host", help="Address the HTTP API binds "
                                  "(beyond loopback only with --http-auth)."),
    http_auth: str = typer.Option("none", "--http-auth", help="HTTP API authentication: none "
                                  "(loopback only) | mtls (enrolled devices) | token (bearer, "
                                  "`fedge coordinator http-token add`) | any (either); HTTPS."),
    continuous: bool = typer.Option(False, "--continuous", help="Rounds without end; each new "
                                    "version becomes current only if it passes the gate."),
    min_ready: int | None = typer.Option(None, "--min-ready", min=1, help="Continuous: a round "
                                         "starts when this many devices are ready "
                                         "(default: --min-devices)."),
    every_minutes: float = typer.Option(0.0, "--every-minutes", min=0.0, help="Continuous: also "
                                        "start a round this often with fewer devices (0: off)."),
    promote_margin: float = typer.Option(0.01, "--promote-margin", min=0.0, help="Continuous: "
                                         "a version may be this much less accurate than "
                                         "current and still be promoted."),
) -> None:
    """Serve a federation: devices join over gRPC (TLS), the ServerApp runs the rounds."""
    import asyncio
    import logging
    import signal

    from fedge.server.http_auth import BindRefused, check_bind

    if http_port is not None:
        try:  # before anything binds or is stored
            check_bind(http_host, http_auth, tls=not insecure)
        except BindRefused as e:
            typer.echo(f"Error: {e}", err=True)
            raise typer.Exit(2) from None
    from fedge.server.continuous import ContinuousSettings
    from fedge.server.coordinator import Coordinator, CoordinatorOptions

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    flwr_log = logging.getLogger("flwr")  # has its own handler: do not print twice
    flwr_log.propagate = False
    flwr_log.setLevel(logging.INFO if verbose else logging.ERROR)
    config: dict[str, Any] = {
        "task": task,
        "codec": codec,
        "strategy": strategy,
        "num-rounds": rounds,
        "min-train-nodes": min_train_nodes or min(2, min_devices),
        "round-timeout": round_timeout,
    }
    config.update(parse_run_config(run_config))
    options = CoordinatorOptions(
        state_dir=state,
        host=host,
        port=port,
        insecure=insecure,
        enroll_port=enroll_port,
        run_config=config,
        min_devices=min_devices,
        chunk_size=chunk_size,
        max_result_bytes=max_result_bytes,
        heartbeat_interval_s=heartbeat_interval,
        keep_serving=keep_serving,
        new_run=new_run,
        tls_hostnames=tuple(tls_hostname),
        http_port=http_port,
        http_host=http_host,
        http_auth=http_auth,
        continuous=ContinuousSettings(
            min_ready=min_ready or min_devices, every_minutes=every_minutes,
            promote_margin=promote_margin,
        ) if continuous else None,
    )

    def say(line: str) -> None:
        print(line, flush=True)

    async def main() -> int:
        coordinator = Coordinator(options, out=say)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, coordinator.request_stop)
        try:
            await coordinator.start()
        except Exception as e:
            say(f"error: cannot start the coordinator: {type(e).__name__}: {e}")
            await coordinator.close()
            return 2
        return await coordinator.run()

    code = asyncio.run(main())
    if code:
        raise typer.Exit(code)
