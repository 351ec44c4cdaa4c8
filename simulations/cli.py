"""The `fedge simulate` and `fedge demo` commands (light imports: the work loads lazily)."""

from __future__ import annotations

from pathlib import Path

import click
import typer

from fedge.common.cli_options import LazyChoice, LogLevel, configure_logging, log_level_option
from fedge.server.run_config import STRATEGIES
from fedge.simulations.runner import DATASET_TASKS


def _partitioners() -> tuple[str, ...]:
    from fedge.common.partition import PARTITIONERS  # numpy: only when simulate needs it

    return PARTITIONERS


#: the run-config key each `simulate` flag sets, to name the flag in a refusal
FLAG_KEYS = {
    "task": "--task", "strategy": "--strategy", "codec": "--codec",
    "downlink-codec": "--downlink", "downlink-first-contact": "--downlink-first-contact",
    "num-rounds": "--rounds", "fraction-train": "--fraction", "min-train-nodes": "--min-clients",
    "partition": "--partition", "alpha": "--alpha", "classes-per-client": "--classes-per-client",
    "seed": "--seed", "lr": "--lr", "local-epochs": "--local-epochs",
    "batch-size": "--batch-size", "data-dir": "--data-dir",
    "dp-noise": "--dp-noise", "dp-clip": "--dp-clip", "dp-delta": "--dp-delta",
    "dp-max-epsilon": "--dp-max-epsilon", "dp-adaptive": "--dp-adaptive",
    "secure-aggregation": "--secure-aggregation", "secagg-bits": "--secagg-bits",
    "secagg-clip": "--secagg-clip", "secagg-min-survivors": "--secagg-min-survivors",
}


def simulate_command(
    dataset: str = typer.Option("digits", click_type=click.Choice(tuple(DATASET_TASKS)),
                                help="A built-in dataset (and its model)."),
    model: str = typer.Option("auto", help="auto | mlp | cnn (must fit the dataset)."),
    task: str = typer.Option("", help="Your own task as module:object (overrides --dataset)."),
    clients: int = typer.Option(20, min=1, help="Virtual clients."),
    rounds: int = typer.Option(10, min=1, help="Federated rounds."),
    fraction: float = typer.Option(1.0, min=0.0, max=1.0, help="Fraction of clients per round."),
    min_clients: int = typer.Option(2, min=1, help="Minimum clients per round."),
    partition: str = typer.Option("iid", help="How clients' data is split.",
                                  click_type=LazyChoice(_partitioners, case_sensitive=False)),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration (with --partition dirichlet)."),
    classes_per_client: int = typer.Option(2, help="Classes per client (with --partition shards)."),
    strategy: str = typer.Option("fedavg", help="The Flower strategy.",
                                 click_type=click.Choice(STRATEGIES, case_sensitive=False)),
    codec: str = typer.Option("none", help="One codec spec or a comma-separated list to compare, "
                              "e.g. none,int8,int4,topk=0.01+int4."),
    downlink: str = typer.Option("none", help="Downlink codec: none | int8 (the global model "
                                 "as a delta against the model a device holds)."),
    downlink_first_contact: str = typer.Option(
        "full", help="With --downlink: what a device holding no model gets: full (the plain "
        "model, any ClientApp reads it) | compressed (the model quantized; a stock ClientApp "
        "fails its first round, then gets plain models)."),
    seed: int = typer.Option(0, help="Seed for data, partitions, sampling and init."),
    lr: float | None = typer.Option(None, help="Client learning rate (task default if unset)."),
    local_epochs: int | None = typer.Option(None, help="Local epochs (task default if unset)."),
    batch_size: int | None = typer.Option(None, help="Local batch size (task default if unset)."),
    data_dir: str | None = typer.Option(None, help="Folder with IDX files (fashion-mnist)."),
    dp_noise: float = typer.Option(0.0, help="Differential privacy: the noise multiplier z "
                                   "(0: off); needs --dp-clip. docs/privacy.md."),
    dp_clip: float | None = typer.Option(None, help="With --dp-noise: the L2 norm C each "
                                         "device's update is clipped to."),
    dp_delta: float | None = typer.Option(None, help="With --dp-noise: the delta epsilon is "
                                          "stated at (default 1e-5)."),
    dp_max_epsilon: float | None = typer.Option(None, help="With --dp-noise: stop before a "
                                                "round would take epsilon past this."),
    dp_adaptive: bool = typer.Option(False, "--dp-adaptive", help="With --dp-noise: adapt C "
                                     "to the median update norm (Andrew et al.)."),
    secure_aggregation: bool = typer.Option(
        False, "--secure-aggregation", help="The coordinator learns only the sum of the "
        "devices' updates (SecAgg+ on quantized deltas; needs --codec none: the masked ring "
        "words are the compression). docs/secure-aggregation.md."),
    secagg_bits: int | None = typer.Option(None, help="With --secure-aggregation: the "
                                           "quantizer's bits, 8 or 4 (default 8)."),
    secagg_clip: float | None = typer.Option(None, help="With --secure-aggregation: the "
                                             "first round's clipping range per tensor "
                                             "(default 0.1; later rounds follow the "
                                             "released mean)."),
    secagg_min_survivors: int | None = typer.Option(
        None, help="With --secure-aggregation: the fewest devices a sum is released for "
        "(default 2)."),
    out: Path = typer.Option(Path("fedge-out/simulate"), help="Folder for report.json/.png."),
    ray_address: str = typer.Option("", "--ray-address", help="HOST:PORT of a running Ray "
                                    "head (`ray start --head`): the virtual clients run on "
                                    "that cluster instead of a fresh local Ray."),
    scenario: str = typer.Option("", help="A benchmark scenario (fashion-mnist-100 | "
                                 "shakespeare): its fixed settings and runs replace the "
                                 "options above; see simulations/BENCHMARKS.md."),
    smoke: bool = typer.Option(False, "--smoke", help="With --scenario: its 2-round variant "
                               "with few clients (what CI runs)."),
    engine: str = typer.Option("", help="With --scenario: inprocess (default: the same clients "
                               "every run) | ray (Flower's engine; clients sampled per run)."),
    only: str = typer.Option("", help="With --scenario: comma-separated run labels to run."),
    merge: str = typer.Option("", help="With --scenario: comma-separated output folders of "
                              "runs split with --only, combined into one report in --out "
                              "(no training)."),
    gpus_per_client: float = typer.Option(
        0.0, min=0.0, help="GPU share per virtual client (Flower's num_gpus, e.g. 0.25): "
        "clients train on CUDA when there is a GPU, else on the CPU."),
    log_level: LogLevel = log_level_option(LogLevel.WARNING),
) -> None:
    """Run a federation of virtual devices in Flower's simulation engine, one run per codec."""
    from rich.console import Console
    from rich.table import Table

    configure_logging(log_level, flower=log_level)
    if scenario:
        _simulate_scenario(scenario, smoke, engine, only, out, merge)
        return

    from fedge.common.errors import CodecSpecError
    from fedge.server.run_config import RunConfigError, validate_run_config
    from fedge.simulations.report import load_report
    from fedge.simulations.runner import (
        SimulationOptions,
        check_ray_address,
        nothing_aggregated,
        parse_codec_list,
        simulate,
        summary_rows,
        task_for,
    )

    console = Console()
    try:  # the whole config, before Ray starts
        options = SimulationOptions(
            task=task or task_for(dataset, model), clients=clients, rounds=rounds,
            fraction=fraction, min_clients=min_clients, partition=partition, alpha=alpha,
            classes_per_client=classes_per_client, strategy=strategy, seed=seed,
            codecs=parse_codec_list(codec), lr=lr, local_epochs=local_epochs,
            batch_size=batch_size, data_dir=data_dir, out=out, downlink=downlink,
            downlink_first_contact=downlink_first_contact, gpus_per_client=gpus_per_client,
            ray_address=check_ray_address(ray_address) if ray_address else None,
            dp=_dp_keys(dp_noise, dp_clip, dp_delta, dp_max_epsilon, dp_adaptive),
            secagg=_secagg_keys(secure_aggregation, secagg_bits, secagg_clip,
                                secagg_min_survivors),
        )
        configs = [options.run_config(c) for c in options.codecs]
        for config in configs:  # names, specs and ranges of every run first: no torch yet
            validate_run_config(config, load_task=False)
        validate_run_config(configs[0], num_partitions=clients)
        _refuse_unusable_budget(configs[0], clients, fraction, min_clients)
    except RunConfigError as error:
        typer.echo(f"Error: {error.line(FLAG_KEYS)}", err=True)
        raise typer.Exit(2) from None
    except (ValueError, CodecSpecError) as error:
        typer.echo(f"Error: {' '.join(str(error).split())}", err=True)
        raise typer.Exit(2) from None
    path = simulate(options, console, flower_log_level=log_level.number)
    table = Table(title="fedge simulate")
    for column in ("codec", "final accuracy", "uplink MB / round", "rejected"):
        table.add_column(column)
    for row in summary_rows(load_report(path)):
        table.add_row(*row)
    console.print(table)
    console.print(f"report: {path}\nplot:   {path.with_suffix('.png')}")
    failure = nothing_aggregated(load_report(path))
    if failure:
        typer.echo(f"Error: {failure}", err=True)
        raise typer.Exit(1)


def _refuse_unusable_budget(config: dict, clients: int, fraction: float,
                            min_clients: int) -> None:
    """A --dp-max-epsilon that one round already passes trains nothing: refused up front."""
    from fedge.server.dp import budget_refusal, dp_from_config
    from fedge.server.run_config import RunConfigError

    settings = dp_from_config(config)
    if settings is None or settings.max_epsilon is None:
        return
    sampled = min(clients, max(int(clients * fraction), min_clients))  # as FedAvg samples
    why = budget_refusal(settings, sampled, clients)
    if why:
        raise RunConfigError("dp-max-epsilon", why)


def _dp_keys(noise: float, clip: float | None, delta: float | None,
             max_epsilon: float | None, adaptive: bool) -> dict[str, float | bool]:
    """The `--dp-*` flags as run-config keys (validated with the rest of the run config)."""
    keys = {"dp-noise": noise, "dp-clip": clip, "dp-delta": delta,
            "dp-max-epsilon": max_epsilon, "dp-adaptive": adaptive}
    return {k: v for k, v in keys.items() if v not in (None, False) and not (
        k == "dp-noise" and v == 0.0)}


def _secagg_keys(on: bool, bits: int | None, clip: float | None,
                 min_survivors: int | None) -> dict[str, bool | int | float]:
    """The `--secure-aggregation` / `--secagg-*` flags as run-config keys (validated with the
    rest of the run config); only those given."""
    keys = {"secure-aggregation": on or None, "secagg-bits": bits, "secagg-clip": clip,
            "secagg-min-survivors": min_survivors}
    return {k: v for k, v in keys.items() if v is not None}


def _simulate_scenario(name: str, smoke: bool, engine: str, only: str, out: Path,
                       merge: str = "") -> None:
    """`fedge simulate --scenario NAME`: run the scenario, print its table, name the files."""
    from rich.console import Console

    from fedge.common.datasets import DatasetError
    from fedge.simulations.report import load_report
    from fedge.simulations.scenario_run import merge_reports, run_scenario
    from fedge.simulations.scenarios import get_scenario
    from fedge.simulations.summary import markdown_table

    console = Console()
    if out == Path("fedge-out/simulate"):
        out = Path("fedge-out") / (name + ("-smoke" if smoke else ""))
    labels = [label.strip() for label in only.split(",") if label.strip()]
    try:
        chosen = get_scenario(name, smoke=smoke)
        parts = [Path(p.strip()) for p in merge.split(",") if p.strip()]
        if parts:
            path = merge_reports(chosen, parts, out)
        else:
            path = run_scenario(chosen, out, console, engine=engine or None, only=labels)
    except (ValueError, DatasetError, OSError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    console.print(markdown_table(load_report(path)))
    console.print(f"report: {path}\nplot:   {path.with_suffix('.png')}\n"
                  f"table:  {path.with_suffix('.md')}")
