"""The `fedge` command: one typer app whose subcommands import their code lazily.

A device never loads the coordinator's code, so each subcommand's work is
imported only when that subcommand runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperGroup

from fedge.client.cli import client_app_cli
from fedge.client.enroll_cli import enroll_command
from fedge.client.predict_cli import predict_command
from fedge.common.cli_options import json_option
from fedge.demo import demo_command
from fedge.server.cli import run_command as coordinator_run_command
from fedge.server.devices_cli import devices_app, token_app
from fedge.server.http_tokens_cli import http_token_app
from fedge.server.models_cli import export_command, models_app
from fedge.simulations.cli import simulate_command


class OneLineErrors(TyperGroup):
    """The `fedge` group: a usage error (a bad flag, a value not among a flag's choices)
    is one line on stderr, exit 2, instead of a usage block and a framed panel."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        run = (args, prog_name, complete_var, False, windows_expand_args)
        if not standalone_mode:
            return super().main(*run, **extra)
        try:
            result = super().main(*run, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # the help is already printed
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            typer.echo(f"Error: {' '.join(e.format_message().split())}{where}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            typer.echo(f"Error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        # a command's own `typer.Exit(code)` arrives here as its code; a plain return as None
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    name="fedge",
    cls=OneLineErrors,
    help="Federated learning for fleets of small CPU devices, built on Flower.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"fedge {version('fedge')}")
        raise typer.Exit()


@app.callback()
def fedge_group(
    show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                      help="Print fedge's version and exit."),
) -> None:
    """Federated learning for fleets of small CPU devices, built on Flower."""

bench_app = typer.Typer(help="Benchmarks that print JSON.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.command("simulate")(simulate_command)
app.command("demo")(demo_command)
coordinator_app = typer.Typer(help="The coordinator devices connect to.", no_args_is_help=True)
coordinator_app.command("run")(coordinator_run_command)
coordinator_app.add_typer(token_app, name="token")
coordinator_app.add_typer(devices_app, name="devices")
coordinator_app.add_typer(http_token_app, name="http-token")
coordinator_app.add_typer(models_app, name="models")
app.command("export")(export_command)
app.command("predict")(predict_command)
app.command("enroll")(enroll_command)
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(client_app_cli, name="client")


@bench_app.command("codec")
def bench_codec(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON list and nothing else."),
    repeats: int = typer.Option(3, help="Timing repeats; the best is kept."),
) -> None:
    """Bytes ratio, error and speed of every codec on the CNN and a 10M-float tensor."""
    from fedge.bench.codec_bench import main

    main(json_output=json_output, repeats=repeats)


@bench_app.command("aggregate")
def bench_aggregate(
    json_output: bool = json_option(),
    params: int = typer.Option(5_000_000, help="Model parameters (float32)."),
    counts: str = typer.Option("20,200", help="Two reply counts, low,high."),
    held: bool = typer.Option(
        True, "--held/--no-held", help="Also measure with all replies resident beforehand."
    ),
) -> None:
    """Peak RSS of aggregating int8 updates: fedge's wrapper against stock Flower FedAvg."""
    from fedge.bench.aggregate_bench import main

    lo, _, hi = counts.partition(",")
    try:
        pair = (int(lo), int(hi))
    except ValueError:
        raise typer.BadParameter(
            "expected two integers, e.g. 20,200", param_hint="--counts"
        ) from None
    main(json_output=json_output, params=params, counts=pair, held=held)


@bench_app.command("edge")
def bench_edge(
    json_output: bool = json_option(),
    arm64: bool = typer.Option(
        False, "--arm64", help="Also run scripts/pi-emulate (root, Debian; many minutes)."
    ),
    arm64_result: Path | None = typer.Option(
        None, "--arm64-result", exists=True, dir_okay=False,
        help="Take the arm64 object from a saved `scripts/pi-emulate --out FILE`.",
    ),
    limit_mb: int = typer.Option(512, "--limit-mb", min=64, help="Memory cgroup limit, MB."),
    search: bool = typer.Option(
        True, "--search/--no-search", help="Also bisect for the smallest passing limit."
    ),
    onnx: bool = typer.Option(
        True, "--onnx/--no-onnx", help="Also measure torch-free inference (ONNX Runtime)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Also write the JSON to this file."),
) -> None:
    """A Pi-class device: training within a 512 MB memory cgroup; optionally an arm64 run."""
    from fedge.bench.edge_bench import cgroup_v1_unusable, main

    reason = cgroup_v1_unusable()
    if reason:
        typer.echo(f"fedge bench edge: {reason}; run it as root on a cgroup v1 host", err=True)
        raise typer.Exit(2)
    main(json_output=json_output, arm64=arm64, arm64_result=arm64_result,
         limit_mb=limit_mb, search=search, onnx=onnx, out=out)


@bench_app.command("transport")
def bench_transport(
    json_output: bool = json_option(),
    devices: int = typer.Option(50, min=1, help="Concurrent device connections pushing updates."),
    pushes: int = typer.Option(8, min=1, help="Updates each device pushes."),
    idle: int = typer.Option(500, min=1, help="Idle devices for the coordinator's RSS."),
    edge: bool = typer.Option(True, "--edge/--no-edge", help="Also measure the edge runtime."),
    repeats: int = typer.Option(2, min=1, help="Ingest runs per server; the best is kept."),
) -> None:
    """Coordinator ingest vs a bare gRPC echo, coordinator RSS with idle devices, edge RSS."""
    from fedge.bench.transport_bench import main

    main(json_output=json_output, devices=devices, pushes=pushes, idle=idle, edge=edge,
         repeats=repeats)


@bench_app.command("fleet")
def bench_fleet(
    json_output: bool = json_option(),
    idle_sizes: str = typer.Option(
        "1000,5000,10000", "--idle-sizes", help="Idle fleet sizes, growing, comma-separated."
    ),
    round_devices: int = typer.Option(1000, "--round-devices", min=0,
                                      help="Devices in the one-round figure (0: skip)."),
    storm_devices: int = typer.Option(1000, "--storm-devices", min=0,
                                      help="Devices in the kill -9 storm (0: skip)."),
    per_worker: int = typer.Option(500, "--per-worker", min=1,
                                   help="Devices per client process."),
    settle: float = typer.Option(5.0, min=0.0, help="Seconds idle before measuring."),
    window: float = typer.Option(
        60.0, min=0.1,
        help="Seconds the idle CPU is measured over (a fleet's heartbeats and polls come in "
        "waves: a short window sees one wave or none).",
    ),
) -> None:
    """One coordinator process and a fleet of light mTLS devices: idle, one round, a storm."""
    from fedge.bench.fleet_bench import main

    try:
        sizes = sorted({int(x) for x in idle_sizes.split(",") if x.strip()})
    except ValueError:
        raise typer.BadParameter(
            "expected integers, e.g. 1000,5000,10000", param_hint="--idle-sizes"
        ) from None
    if not sizes or sizes[0] < 1:
        raise typer.BadParameter("sizes must be positive integers", param_hint="--idle-sizes")
    main(json_output=json_output, idle_sizes=sizes, round_devices=round_devices,
         storm_devices=storm_devices, per_worker=per_worker, settle_s=settle, window_s=window)


@bench_app.command("secagg")
def bench_secagg(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON list and nothing else."),
    clients: str = typer.Option("10,50,100", help="Client counts, comma-separated."),
    codecs: str = typer.Option("int8,int4,flower-secaggplus", help="Codecs, comma-separated."),
    params: int | None = typer.Option(
        None, min=11, help="A small synthetic model of this many floats instead of the CNN."
    ),
) -> None:
    """Device upload bytes per coordinate and time of secure aggregation, vs Flower's SecAgg+."""
    from fedge.bench.secagg_bench import CODECS, main

    try:
        counts = [int(c) for c in clients.split(",")]
    except ValueError:
        raise typer.BadParameter(
            "expected integers, e.g. 10,50,100", param_hint="--clients"
        ) from None
    if any(c < 2 for c in counts):
        raise typer.BadParameter("at least 2 clients", param_hint="--clients")
    names = [c.strip() for c in codecs.split(",")]
    unknown = [c for c in names if c not in CODECS]
    if unknown:
        raise typer.BadParameter(
            f"unknown {unknown}; choose from {', '.join(CODECS)}", param_hint="--codecs"
        )
    main(json_output=json_output, clients=counts, codecs=names, params=params)


@bench_app.command("inference")
def bench_inference(
    json_output: bool = json_option(),
    cache: bool = typer.Option(
        True, "--cache/--no-cache", help="Reuse the trained CNN from the temp folder."
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
) -> None:
    """Export sizes, accuracy and batch-1/64 CPU latency of fp32, fp16, int8 and int4."""
    from fedge.bench.inference_bench import main

    main(json_output=json_output, cache=cache, threads=threads)


@bench_app.command("flower")
def bench_flower(
    json_output: bool = json_option(),
    clients: int = typer.Option(4, min=1, help="Simulated clients (num-supernodes)."),
    rounds: int = typer.Option(3, min=1, help="Federated rounds."),
    samples: int = typer.Option(300, min=1, help="Training examples per client."),
) -> None:
    """The example Flower app on Flower's simulation runtime with and without fedge's lines."""
    from fedge.bench.flower_bench import main

    main(json_output=json_output, clients=clients, rounds=rounds, samples=samples)
