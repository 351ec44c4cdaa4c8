"""`fedge simulate`: one federated run per codec, a progress bar, report.json and report.png."""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge.server.round_metrics import RoundMetrics
from fedge.server.run_config import RunConfigError, check_codec
from fedge.simulations.report import RunReport, plot_report, round_record, write_report

if TYPE_CHECKING:  # rich is imported when a run starts: the device CLI runs without it
    from rich.console import Console

#: what `--dataset` and `--model` select among the built-in tasks
DATASET_TASKS = {"digits": ("digits", "mlp"), "fashion-mnist": ("fashion-mnist", "cnn")}


@dataclass
class SimulationOptions:
    """Everything one `fedge simulate` call needs; names follow the run-config keys."""

    task: str = "digits"
    clients: int = 20
    rounds: int = 10
    fraction: float = 1.0
    min_clients: int = 2
    partition: str = "iid"
    alpha: float = 0.5
    classes_per_client: int = 2
    strategy: str = "fedavg"
    seed: int = 0
    codecs: list[str] = field(default_factory=lambda: ["none"])
    lr: float | None = None
    local_epochs: int | None = None
    batch_size: int | None = None
    data_dir: str | None = None
    downlink: str = "none"
    downlink_first_contact: str = "full"  # or "compressed": the model quantized, too
    dp: dict[str, Any] = field(default_factory=dict)  # run-config dp-* keys (server/dp.py)
    # run-config secure-aggregation / secagg-* keys (docs/secure-aggregation.md)
    secagg: dict[str, Any] = field(default_factory=dict)
    out: Path = Path("fedge-out")
    ray_address: str | None = None  # HOST:PORT of a running Ray head; None: a fresh local Ray
    gpus_per_client: float = 0.0  # Flower's num_gpus per virtual client (Ray backend)

    def run_config(self, codec: str) -> dict[str, Any]:
        """The run config one codec's run is given (ServerApp and virtual clients alike)."""
        config: dict[str, Any] = {
            "task": self.task,
            "strategy": self.strategy,
            "codec": codec,
            "downlink-codec": self.downlink,
            "downlink-first-contact": self.downlink_first_contact,
            "num-rounds": self.rounds,
            "fraction-train": self.fraction,
            "min-train-nodes": max(1, min(self.min_clients, self.clients)),
            "fraction-evaluate": 0.0,
            "partition": self.partition,
            "alpha": self.alpha,
            "classes-per-client": self.classes_per_client,
            "seed": self.seed,
            "torch-threads": 1,
        }
        optional = {"lr": self.lr, "local-epochs": self.local_epochs,
                    "batch-size": self.batch_size, "data-dir": self.data_dir}
        config.update({k: v for k, v in optional.items() if v is not None})
        config.update(self.dp)
        config.update(self.secagg)
        return config


def task_for(dataset: str, model: str) -> str:
    """Map `--dataset/--model` to a built-in task, or pass a `module:object` task through."""
    if ":" in dataset:
        return dataset
    if dataset not in DATASET_TASKS:
        raise ValueError(f"unknown dataset {dataset!r}; choose {', '.join(DATASET_TASKS)} "
                         "or name your own task as module:object with --task")
    task, native_model = DATASET_TASKS[dataset]
    if model not in ("auto", native_model):
        raise ValueError(f"dataset {dataset!r} runs with model {native_model!r}, not {model!r}")
    return task


def check_ray_address(text: str) -> str:
    """`HOST:PORT` of a Ray head (what `ray start --head` prints), or a ValueError saying so."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--ray-address {text!r} is not HOST:PORT; give the address "
                         "`ray start --head` printed, e.g. 127.0.0.1:6379")
    return f"{host}:{int(port)}"


def parse_codec_list(text: str) -> list[str]:
    """`none,int8,int4` -> validated specs (a bad one fails before any run starts)."""
    specs = [part.strip() for part in text.split(",") if part.strip()]
    if not specs:
        raise RunConfigError("codec", "needs at least one spec")
    for spec in specs:
        check_codec("codec", spec)
    return specs


Runner = Callable[[dict[str, Any], int, list[Callable[[RoundMetrics], None]]], None]

#: the logger the strategy wrapper names each dropped reply on (client errors among them)
_DROPPED_REPLIES = "fedge.server.compressed_strategy"
#: Flower's logger: its simulation engine logs a ClientApp's exception there, traceback and all
_FLOWER = "flwr"
#: a traceback's closing line, `SomeError: what happened` (wrappers with an empty message skip)
_CAUSE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (\S.*)$", re.MULTILINE)


class _FirstRecord(logging.Handler):
    """Keeps, as one line, the first record at `level` or above (with `cause`: the first
    record holding a traceback's closing line, and only that line)."""

    def __init__(self, level: int, cause: bool = False) -> None:
        super().__init__(level)
        self.cause = cause
        self.line: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.line is not None:
            return
        text = record.getMessage()
        if self.cause:
            found = _CAUSE.search(text)
            if found is None:
                return
            text = found.group(0)
        self.line = " ".join(text.split())


@contextmanager
def _first_client_error() -> Iterator[Callable[[], str | None]]:
    """While a run runs: why the first dropped reply was dropped, as one line (the client's
    own exception when Flower logged it, else the strategy's reason)."""
    handlers = {_DROPPED_REPLIES: _FirstRecord(logging.WARNING),
                _FLOWER: _FirstRecord(logging.ERROR, cause=True)}
    levels = {}
    for name, handler in handlers.items():
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.addHandler(handler)
        if not logger.isEnabledFor(handler.level):
            logger.setLevel(handler.level)
    try:
        yield lambda: handlers[_FLOWER].line or handlers[_DROPPED_REPLIES].line
    finally:
        for name, handler in handlers.items():
            logging.getLogger(name).removeHandler(handler)
            logging.getLogger(name).setLevel(levels[name])


def nothing_aggregated(report: dict[str, Any]) -> str | None:
    """One line for the first run in which no round aggregated any reply, else None."""
    for run in report["runs"]:
        if not any(r.get("accepted") for r in run["rounds"]):
            first = run.get("first_client_error") or "none logged (did any client answer?)"
            return (f"codec {run['codec']}: no round of {len(run['rounds'])} aggregated "
                    f"anything; first client error: {first}")
    return None


def simulate(
    options: SimulationOptions,
    console: Console | None = None,
    runner: Runner | None = None,
    flower_log_level: int = logging.WARNING,
) -> Path:
    """Run every codec in turn and write the report; returns the report.json path.

    A run whose replies were dropped keeps the first drop's reason as
    `first_client_error` (see `nothing_aggregated`)."""
    if runner is None:
        from fedge.simulations.engine import run_in_ray

        runner = functools.partial(run_in_ray, flower_log_level=flower_log_level,
                                   ray_address=options.ray_address,
                                   gpus_per_client=options.gpus_per_client)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = console or Console()
    reports: list[RunReport] = []
    started = time.perf_counter()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        for codec in options.codecs:
            report = RunReport(codec=codec, strategy=options.strategy)
            bar = progress.add_task(f"{codec:>14}", total=options.rounds, status="starting")

            def on_round(record: RoundMetrics, report: RunReport = report, bar: Any = bar) -> None:
                report.rounds.append(round_record(record.to_dict()))
                acc = "-" if record.accuracy is None else f"{record.accuracy:.3f}"
                status = (f"acc {acc}  up {record.uplink_bytes / 1e6:.2f} MB"
                          f"  rejected {record.rejected}")
                progress.update(bar, completed=record.round, status=status)

            with _first_client_error() as first_error:
                runner(options.run_config(codec), options.clients, [on_round])
            if first_error():
                report.extra["first_client_error"] = first_error()
            report.extra["uplink_codec"] = uplink_codec(report.rounds)
            reports.append(report)
    meta = {
        "task": options.task,
        "clients": options.clients,
        "rounds": options.rounds,
        "fraction": options.fraction,
        "partition": options.partition,
        "alpha": options.alpha,
        "seed": options.seed,
        "downlink": options.downlink,
        "downlink_first_contact": options.downlink_first_contact,
        "ray_address": options.ray_address or "",
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    path = write_report(options.out, reports, meta)
    plot_report({"runs": [r.to_json() for r in reports]}, options.out / "report.png",
                title=f"{options.task}: {options.clients} clients, {options.partition}")
    return path


def uplink_codec(rounds: Sequence[dict[str, Any]]) -> str:
    """What a run's replies carried, from the rounds' wire labels ("" if none arrived)."""
    seen = {part for r in rounds for part in str(r.get("codec") or "").split(" | ") if part}
    return " | ".join(sorted(seen))


def summary_rows(report: dict[str, Any]) -> Sequence[tuple[str, str, str, str]]:
    """Final accuracy and uplink per round of each run, for the closing table.

    A run whose replies arrived in another format than the one asked for says so:
    `int8 (sent: none)`."""
    rows = []
    for run in report["runs"]:
        rounds = run["rounds"]
        label = run["codec"]
        sent = run.get("uplink_codec")
        if sent and sent != label:
            label = f"{label} (sent: {sent})"
        if not rounds:
            rows.append((label, "-", "-", "-"))
            continue
        last = rounds[-1]
        mean_up = sum(r["uplink_bytes"] for r in rounds) / len(rounds)
        acc = "-" if last["accuracy"] is None else f"{last['accuracy']:.4f}"
        rows.append((label, acc, f"{mean_up / 1e6:.3f}",
                     str(sum(r["rejected"] for r in rounds))))
    return rows
