"""`fedge client run`: this machine becomes an edge device of a coordinator.

Only typer (and the shared `--log-level`) is imported at the top: `fedge` loads this module for
every subcommand, and a device's runtime (gRPC, then Flower and torch when
work arrives) is imported only when `run` actually runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedge.client.app_ref import DEFAULT_APP_REF
from fedge.common.cli_options import LogLevel, configure_logging, log_level_option

MAX_CHUNK = 2 << 20  # fedge.common.chunking.MAX_CHUNK_SIZE, repeated to keep imports light

client_app_cli = typer.Typer(
    help="Run this machine as a fedge edge device.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@client_app_cli.callback()
def client_group() -> None:
    """Run this machine as a fedge edge device."""


@client_app_cli.command("run")
def run_command(
    coordinator: str = typer.Option("", "--coordinator", help="The coordinator's HOST:PORT "
                                    "(default for an enrolled --data: its device port)."),
    data: Path = typer.Option(
        ..., "--data", help="The device's folder: identity, state, outbox; tasks get it as "
        "node config 'data-dir' for local data."
    ),
    ca: Path | None = typer.Option(
        None, "--ca", help="The coordinator's CA certificate (PEM), as printed by "
        "`fedge coordinator run`. Without it, TLS checks against the system's roots."
    ),
    insecure: bool = typer.Option(False, "--insecure", help="Plaintext gRPC (no TLS)."),
    name: str = typer.Option("", "--name", help="Device name shown by the coordinator "
                             "(default: host name)."),
    partition_id: int | None = typer.Option(
        None, "--partition-id", min=0, help="Node config 'partition-id' (built-in datasets)."
    ),
    num_partitions: int | None = typer.Option(
        None, "--num-partitions", min=1, help="Node config 'num-partitions'."
    ),
    app: str = typer.Option(DEFAULT_APP_REF, "--app", help="The ClientApp as module:attr (e.g. "
                            "my_app.client_app:app, found from the working directory); fedge's "
                            "own runs with the compression mod, any other as is."),
    node_config: str = typer.Option("", "--node-config", help="Node config as flower-supernode "
                                    "takes it: 'partition-id=0 num-partitions=2 "
                                    "data-path=\"/data\"' (TOML values, strings in quotes); "
                                    "over --partition-id and --num-partitions."),
    chunk_size: int | None = typer.Option(
        None, "--chunk-size", min=1, max=MAX_CHUNK,
        help="Largest chunk sent or asked for, bytes (default: the coordinator's).",
    ),
    max_backoff: float = typer.Option(60.0, "--max-backoff", min=1.0,
                                      help="Longest wait between reconnect attempts, s."),
    log_level: LogLevel = log_level_option(LogLevel.INFO),
    inference_only: bool = typer.Option(False, "--inference-only", help="Do not train: keep "
                                        "the coordinator's current model in --data (verified) "
                                        "for `fedge predict`; needs --model-url."),
    model_url: str = typer.Option("", "--model-url", help="Inference-only: the coordinator's "
                                  "HTTP API, e.g. http://127.0.0.1:9093."),
    model_format: str = typer.Option("int8", "--model-format", help="Inference-only: fp32 | "
                                     "fp16 | int8 | int4 | onnx | onnx-int8 (ONNX: no torch)."),
    poll_interval: float = typer.Option(10.0, "--poll-interval", min=0.1, help="Inference-only: "
                                        "seconds between checks for a new model."),
) -> None:
    """Join a coordinator and train on this device's data whenever it asks, until stopped."""
    import asyncio
    import logging
    import os
    import signal
    import socket
    import sys

    if inference_only:
        _run_inference_only(model_url, data, model_format, poll_interval, log_level)
    credentials = None
    if not insecure and (data.expanduser() / "identity" / "enrollment.json").exists():
        from fedge.client.enroll import EnrollError, load_credentials

        try:  # enrolled: mutual TLS with the device certificate, signed results
            credentials = load_credentials(data)
        except EnrollError as e:
            typer.echo(f"Error: {e}", err=True)
            raise typer.Exit(2) from None
        coordinator = coordinator or credentials.device_target
    if not coordinator:
        raise typer.BadParameter("give --coordinator HOST:PORT, or `fedge enroll` this --data "
                                 "folder first", param_hint="--coordinator")
    _check_options(coordinator, ca, insecure, partition_id, num_partitions, app)
    given_node_config = _parse_node_config(node_config)  # refused before the device starts
    configure_logging(log_level)
    from fedge.client.device_state import DeviceFolderError
    from fedge.client.edge_runtime import EdgeDevice
    from fedge.common.alloc import limit_heap_growth
    from fedge.common.contract import PERSONAL_FILE_NAME, PERSONAL_PATH_KEY

    limit_heap_growth()
    config: dict[str, bool | int | float | str] = {"data-dir": str(data.expanduser().resolve())}
    # a personalizing run keeps the device's head here, where `fedge predict` finds it
    config[PERSONAL_PATH_KEY] = str(data.expanduser().resolve() / PERSONAL_FILE_NAME)
    if partition_id is not None:
        config["partition-id"] = partition_id
        config["num-partitions"] = num_partitions or 1
    config.update(given_node_config)
    try:
        device = EdgeDevice(
            coordinator, data, ca_cert=ca, insecure=insecure,
            name=name or socket.gethostname(), node_config=config,
            client_app_ref=app, chunk_size=chunk_size, max_backoff=max_backoff,
            credentials=credentials,
        )
    except (OSError, ValueError, DeviceFolderError) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None

    async def serve() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, device.stop)
        return await device.run()

    try:
        code = asyncio.run(serve())
    except DeviceFolderError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None
    # Leave without interpreter teardown: everything the device keeps is already
    # on disk (written atomically, fsynced), a ClientApp still training in its
    # daemon thread is abandoned rather than raced, and tearing down torch's and
    # Flower's thousands of modules takes seconds on a small CPU.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _parse_node_config(text: str) -> dict[str, bool | int | float | str]:
    """`--node-config` read by Flower's own parser, as `flower-supernode` reads it (exit 2 if
    it is not KEY=VALUE pairs of TOML scalars)."""
    if not text.strip():
        return {}
    from fedge.common.flower_compat import RUN_CONFIG_PAIR, parse_config_args

    left = RUN_CONFIG_PAIR.sub(" ", text).split()
    if left:
        raise typer.BadParameter(f"{left[0]!r} is not KEY=VALUE; write 'partition-id=0 "
                                 "num-partitions=2' (TOML values: strings in quotes)",
                                 param_hint="--node-config")
    try:
        parsed = parse_config_args([text])
    except Exception as e:  # Flower raises ClickException, ValueError or TOMLDecodeError
        why = " ".join((getattr(e, "message", None) or str(e)).split())
        raise typer.BadParameter(why, param_hint="--node-config") from None
    return dict(parsed)  # Flower's parser refuses non-scalars and flattens tables (a.b)


def _run_inference_only(
    model_url: str, data: Path, model_format: str, poll_interval: float, log_level: LogLevel
) -> None:
    if not model_url:
        raise typer.BadParameter("--inference-only needs --model-url", param_hint="--model-url")
    configure_logging(log_level)
    from fedge.client.inference_device import run_cli

    try:
        code = run_cli(model_url, data.expanduser(), fmt=model_format, interval_s=poll_interval)
    except ValueError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


def _check_options(
    coordinator: str,
    ca: Path | None,
    insecure: bool,
    partition_id: int | None,
    num_partitions: int | None,
    app: str,
) -> None:
    """Refuse unusable options with a one-line message (typer's usage error, no traceback)."""
    from fedge.client.edge_session import parse_target

    try:
        parse_target(coordinator)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--coordinator") from None
    if ca is not None and insecure:
        raise typer.BadParameter("use either --ca or --insecure, not both", param_hint="--ca")
    if ca is not None and not ca.is_file():
        raise typer.BadParameter(f"CA certificate {ca} not found", param_hint="--ca")
    if ca is not None and b"BEGIN CERTIFICATE" not in ca.read_bytes()[:1 << 20]:
        raise typer.BadParameter(f"{ca} is not a PEM certificate", param_hint="--ca")
    if partition_id is not None and partition_id >= (num_partitions or 1):
        raise typer.BadParameter(
            f"--partition-id {partition_id} needs --num-partitions above it",
            param_hint="--partition-id",
        )
    if num_partitions is not None and partition_id is None:
        raise typer.BadParameter("--num-partitions needs --partition-id",
                                 param_hint="--num-partitions")
    _check_app(app)


def _check_app(app: str) -> None:
    """The app's module must exist and define the attribute: found and read, not imported
    (importing would load torch now, before the device has any work)."""
    import importlib.util
    import os
    import sys

    module, sep, attr = app.partition(":")
    if not module or not sep or not attr:
        raise typer.BadParameter(f"{app!r} is not module:attr", param_hint="--app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise typer.BadParameter(f"module {module!r} not found (run from the app's folder or "
                                 "install its package)", param_hint="--app")
    top = attr.split(".")[0]
    names = _module_names(spec.origin) if spec.origin and spec.origin.endswith(".py") else {"*"}
    if "*" not in names and top not in names:
        raise typer.BadParameter(f"module {module!r} defines no {top!r}", param_hint="--app")


def _module_names(path: str) -> set[str]:
    """Names a module's source binds at its top level; `*` when it may bind any name."""
    import ast

    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return {"*"}
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    if "*" in names or "__getattr__" in names:
        return {"*"}
    return names


if __name__ == "__main__":
    client_app_cli()
