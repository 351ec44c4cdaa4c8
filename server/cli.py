"""`fedge coordinator run`: the command's options; the coordinator itself loads lazily.

Only typer, click and the run config's vocabulary (`server/run_config.py`: no
torch, no Flower) are imported at the top, so `fedge --help` and the device's
own commands never pay for the coordinator's imports (grpc, SQLite, torch), and
a bad run config is refused before any of them load.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import click
import typer

from fedge.common.cli_options import LogLevel, configure_logging, log_level_option
from fedge.server.run_config import STRATEGIES

#: the run-config key each `coordinator run` flag sets, to name the flag in a refusal
FLAG_KEYS = {
    "task": "--task", "codec": "--codec", "strategy": "--strategy", "num-rounds": "--rounds",
    "min-train-nodes": "--min-train-nodes", "round-timeout": "--round-timeout",
}


class ChoiceOrObjectRef(click.Choice):
    """One of `choices` (shown in help and completion), or a `module:object` reference."""

    def __init__(self, choices: tuple[str, ...]) -> None:
        super().__init__(choices, case_sensitive=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and ":" in value:
            return value
        return super().convert(value, param, ctx)


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
    strategy: str = typer.Option("fedavg", click_type=ChoiceOrObjectRef(STRATEGIES),
                                 help="The Flower strategy of fedge's own ServerApp: a "
                                 "built-in name, or module:object naming your strategy object "
                                 "(or a zero-argument factory of one)."),
    server_app: str = typer.Option("", "--server-app", help="Run your own Flower ServerApp "
                                   "(module:app, e.g. my_app.server_app:app) instead of "
                                   "fedge's; its settings come from --run-config alone."),
    chunk_size: int = typer.Option(1 << 20, min=1, max=2 << 20, help="Transfer chunk, bytes."),
    max_result_bytes: int = typer.Option(256 << 20, min=1, help="Largest result accepted, bytes."),
    heartbeat_interval: float = typer.Option(
        5.0, min=0.1,
        help="Device heartbeat, seconds; stretched for large fleets (at most 50 a second in all).",
    ),
    run_config: list[str] = typer.Option([], "--run-config", help="More run config in "
                                         "Flower's syntax: 'lr=0.1 local-epochs=2' (TOML "
                                         "values, strings in quotes) or a .toml file."),
    tls_hostname: list[str] = typer.Option([], "--tls-hostname", help="Extra name or IP for the "
                                           "server certificate; repeatable."),
    keep_serving: bool = typer.Option(False, "--keep-serving", help="Serve on after the run."),
    new_run: bool = typer.Option(False, "--new-run", help="Start a new run even if one can be "
                                 "resumed (the old one is marked stopped)."),
    log_level: LogLevel = log_level_option(LogLevel.WARNING),
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
    import os
    import signal
    import sys

    if os.getcwd() not in sys.path:  # module:object refs name the user's modules, as flwr does
        sys.path.insert(0, os.getcwd())
    if server_app:
        config = _user_app_config(server_app, run_config, round_timeout, continuous)
        extra = {k: v for k, v in config.items() if k != "round-timeout"}
    else:
        config, extra = _own_app_config(
            task, codec, strategy, rounds, min_train_nodes or min(2, min_devices), round_timeout,
            run_config,
        )

    from fedge.server.continuous import ContinuousSettings
    from fedge.server.coordinator import Coordinator, CoordinatorOptions
    from fedge.server.run_plan import StartRefused

    quiet_flower = log_level in (LogLevel.WARNING, LogLevel.ERROR)
    configure_logging(log_level, flower=LogLevel.ERROR if quiet_flower else log_level)
    options = CoordinatorOptions(
        state_dir=state,
        host=host,
        port=port,
        insecure=insecure,
        enroll_port=enroll_port,
        run_config=config,
        given_flags={**_given_flags(extra), **({"server-app": "--server-app"} if server_app
                                                else {})},
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
        loop = asyncio.get_running_loop()
        early_stop = asyncio.Event()  # a signal during start is honoured once started
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, early_stop.set)
        try:  # a refused or failed start stores no run
            coordinator = await Coordinator.start(options, out=say)
        except StartRefused as e:
            typer.echo(f"Error: {e}", err=True)
            return 2
        except Exception as e:
            typer.echo(f"Error: cannot start the coordinator: {type(e).__name__}: {e}", err=True)
            return 2
        # this process is one coordinator: what start-up built (imports, the model, the app)
        # lives as long as it does, so keep it out of every garbage collection, which would
        # otherwise walk it again and again as the fleet's per-call objects churn
        gc.freeze()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, coordinator.request_stop)
        if early_stop.is_set():
            coordinator.request_stop()
        return await coordinator.run()

    code = asyncio.run(main())
    if code:
        raise typer.Exit(code)


def _own_app_config(
    task: str, codec: str, strategy: str, rounds: int, min_train_nodes: int,
    round_timeout: float, run_config: list[str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """fedge's own ServerApp's run config from the flags and --run-config (exit 2 if bad)."""
    from fedge.server.run_config import RunConfigError, parse_run_config_args, validate_run_config

    config: dict[str, Any] = {
        "task": task, "codec": codec, "strategy": strategy, "num-rounds": rounds,
        "min-train-nodes": min_train_nodes, "round-timeout": round_timeout,
    }
    extra: dict[str, Any] = {}
    try:  # before anything is started or stored
        extra = parse_run_config_args(run_config) if run_config else {}
        config.update(extra)
        validate_run_config(config)
        if ":" in str(config["strategy"]):  # module:object: load and check it now
            from fedge.server.app_loading import AppRefError, load_strategy

            try:
                load_strategy(str(config["strategy"]))
            except AppRefError as e:
                raise RunConfigError("strategy", str(e)) from None
    except RunConfigError as e:
        flags = {k: v for k, v in FLAG_KEYS.items() if k not in extra}
        typer.echo(f"Error: {e.line(flags)}", err=True)
        raise typer.Exit(2) from None
    return config, extra


def _user_app_config(
    server_app: str, run_config: list[str], round_timeout: float, continuous: bool
) -> dict[str, Any]:
    """A user's ServerApp's run config: --run-config as given (the app reads its own keys).

    fedge's own flags (`--task`, `--codec`, ...) would be silently ignored, so
    they are refused; so is an app that does not load (exit 2, one line).
    """
    from click.core import ParameterSource

    from fedge.server.run_config import RunConfigError, parse_run_config_args

    ctx = click.get_current_context()
    own = [flag for key, flag in FLAG_KEYS.items() if key != "round-timeout"
           and ctx.get_parameter_source(flag[2:].replace("-", "_")) != ParameterSource.DEFAULT]
    own += ["--continuous"] if continuous else []
    if own:
        typer.echo(f"Error: {own[0]} sets fedge's own ServerApp; with --server-app give your "
                   "app's settings in --run-config (or drop --server-app)", err=True)
        raise typer.Exit(2)
    try:
        extra = parse_run_config_args(run_config) if run_config else {}
    except RunConfigError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None
    from fedge.server.app_loading import AppRefError, load_server_app

    try:
        load_server_app(server_app)
    except AppRefError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None
    return {"server-app": server_app, "round-timeout": round_timeout, **extra}


def _given_flags(run_config: dict[str, Any]) -> dict[str, str]:
    """Run-config keys this command line sets, each with its flag: what a resume compares.

    A flag left at its default is not given, so "the same command without
    the differing flags" resumes the stored run.
    """
    from click.core import ParameterSource

    ctx = click.get_current_context()
    defaulted = (None, ParameterSource.DEFAULT)
    given = {
        key: flag
        for key, flag in FLAG_KEYS.items()
        if ctx.get_parameter_source(flag[2:].replace("-", "_")) not in defaulted
    }
    given.update({key: f"--run-config {key}" for key in run_config})
    return given
