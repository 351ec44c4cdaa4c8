"""The `fedge` command: one typer app whose subcommands import their code lazily.

A device never loads the coordinator's code, so each subcommand's work is
imported only when that subcommand runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedge.client.cli import client_app_cli
from fedge.client.enroll_cli import enroll_command
from fedge.client.predict_cli import predict_command
from fedge.demo import demo_command
from fedge.server.cli import run_command as coordinator_run_command
from fedge.server.devices_cli import devices_app, token_app
from fedge.server.models_cli import export_command, models_app
from fedge.simulations.cli import simulate_command

app = typer.Typer(
    name="fedge",
    help="Federated learning for fleets of small CPU devices, built on Flower.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

bench_app = typer.Typer(help="Benchmarks that print JSON.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.command("simulate")(simulate_command)
app.command("demo")(demo_command)
coordinator_app = typer.Typer(help="The coordinator devices connect to.", no_args_is_help=True)
coordinator_app.command("run")(coordinator_run_command)
coordinator_app.add_typer(token_app, name="token")
coordinator_app.add_typer(devices_app, name="devices")
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
    json_output: bool = typer.Option(
        False, "--json", help="Print one JSON object and nothing else."
    ),
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
    json_output: bool = typer.Option(
        False, "--json", help="Print one JSON object and nothing else."
    ),
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
    out: Path | None = typer.Option(None, "--out", help="Also write the JSON to this file."),
) -> None:
    """A Pi-class device: training within a 512 MB memory cgroup; optionally an arm64 run."""
    from fedge.bench.edge_bench import cgroup_v1_unusable, main

    reason = cgroup_v1_unusable()
    if reason:
        typer.echo(f"fedge bench edge: {reason}; run it as root on a cgroup v1 host", err=True)
        raise typer.Exit(2)
    main(json_output=json_output, arm64=arm64, arm64_result=arm64_result,
         limit_mb=limit_mb, search=search, out=out)


@bench_app.command("transport")
def bench_transport(
    json_output: bool = typer.Option(
        False, "--json", help="Print one JSON object and nothing else."
    ),
    devices: int = typer.Option(50, min=1, help="Concurrent device connections pushing updates."),
    pushes: int = typer.Option(8, min=1, help="Updates each device pushes."),
    idle: int = typer.Option(500, min=1, help="Idle devices for the coordinator's RSS."),
    edge: bool = typer.Option(True, "--edge/--no-edge", help="Also measure the edge runtime."),
) -> None:
    """Coordinator ingest vs a bare gRPC echo, coordinator RSS with idle devices, edge RSS."""
    from fedge.bench.transport_bench import main

    main(json_output=json_output, devices=devices, pushes=pushes, idle=idle, edge=edge)


@bench_app.command("inference")
def bench_inference(
    json_output: bool = typer.Option(
        False, "--json", help="Print one JSON object and nothing else."
    ),
    cache: bool = typer.Option(
        True, "--cache/--no-cache", help="Reuse the trained CNN from the temp folder."
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
) -> None:
    """Export sizes, accuracy and batch-1/64 CPU latency of fp32, fp16, int8 and int4."""
    from fedge.bench.inference_bench import main

    main(json_output=json_output, cache=cache, threads=threads)
