"""The `fedge` command: one typer app whose subcommands import their code lazily.

A device never loads the coordinator's code, so each subcommand's work is
imported only when that subcommand runs.
"""

from __future__ import annotations

import typer

from fedge.simulations.cli import demo_command, simulate_command

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


@bench_app.command("codec")
def bench_codec(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON list and nothing else."),
    repeats: int = typer.Option(3, help="Timing repeats; the best is kept."),
) -> None:
    """Bytes ratio, error and speed of every codec on the CNN and a 10M-float tensor."""
    from fedge.bench.codec_bench import main

    main(json_output=json_output, repeats=repeats)
