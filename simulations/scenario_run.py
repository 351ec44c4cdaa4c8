"""Run a benchmark scenario: every run in turn, then report.json, report.png, report.md.

Runs go through fedge's in-process Grid (`engine="inprocess"`, the default:
seeded node ids, so every run trains the same clients in the same rounds and
runs differ only by what they compare; messages still cross Flower's protobuf)
or Flower's simulation engine (`engine="ray"`: parallel actors, but random node
ids per run, so each run samples different clients). Either way the apps are
the real ones: fedge's ServerApp and ClientApp with the compression mod, or
the stock Flower peer of `simulations/stock_flower.py`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedge.server.round_metrics import RoundMetrics
from fedge.simulations.client_accuracy import client_accuracies
from fedge.simulations.profiles import (
    calibrate,
    estimate,
    expected_max_examples,
    get_profile,
    partition_sizes,
)
from fedge.simulations.report import (
    RunReport,
    load_report,
    plot_client_accuracy,
    plot_report,
    round_record,
    write_report,
)
from fedge.simulations.scenarios import RunSpec, Scenario
from fedge.simulations.summary import markdown_table, run_summary

Listener = Callable[[RoundMetrics], None]
ENGINES = ("ray", "inprocess")


def run_once(run: RunSpec, config: dict[str, Any], clients: int, listeners: list[Listener],
             engine: str, seed: int = 0) -> dict[str, np.ndarray] | None:
    """One federated run of `run` on `engine`; rounds reach `listeners` as they end.

    Returns the final global model (in-process engine; None from Ray).
    In-process, training and central evaluation run on CUDA when there is a
    GPU (`use_device("auto")`), else on the CPU.
    """
    from fedge.common.training import use_device
    from fedge.simulations.stock_flower import stock_client_app, stock_server_app

    if engine == "inprocess":
        from fedge.client.client_app import FEDGE_MODS, make_client_app
        from fedge.common.contract import FINAL_ARRAYS_STATE_KEY
        from fedge.server.inprocess_grid import InProcessGrid, run_server_app_inprocess
        from fedge.server.server_app import make_server_app

        device = use_device("auto")
        client = stock_client_app(config) if run.stock else make_client_app(
            mods=FEDGE_MODS)
        server = (stock_server_app(config, listeners) if run.stock
                  else make_server_app(config, listeners=listeners))
        grid = InProcessGrid(client, clients, run_config=config, seed=seed,
                             stream_replies=True, workers=inprocess_workers(device.type))
        context = run_server_app_inprocess(server, grid)
        final = context.state.array_records.get(FINAL_ARRAYS_STATE_KEY)
        return None if final is None else {k: a.numpy() for k, a in final.items()}
    elif engine == "ray":
        from fedge.simulations.engine import ray_backend_config, run_in_ray

        if run.stock:
            from flwr.simulation import run_simulation

            logging.getLogger("flwr").setLevel(logging.WARNING)
            run_simulation(server_app=stock_server_app(config, listeners),
                           client_app=stock_client_app(config), num_supernodes=clients,
                           backend_config=ray_backend_config())
        else:
            run_in_ray(config, clients, listeners)
        return None
    raise ValueError(f"unknown engine {engine!r}; choose {', '.join(ENGINES)}")


#: environment variable: client trainings run at once by the in-process engine
WORKERS_ENV = "FEDGE_INPROCESS_WORKERS"
GPU_WORKERS = 4


def inprocess_workers(device_type: str) -> int:
    """One at a time on the CPU (runs stay bit-for-bit reproducible); a few on a GPU."""
    raw = os.environ.get(WORKERS_ENV, "")
    if raw.strip():
        return max(1, int(raw))
    return GPU_WORKERS if device_type == "cuda" else 1


def device_compute(scenario: Scenario, clients: int) -> dict[str, Any]:
    """Seconds per example here and the expected largest client of a round (for profiles)."""
    config = scenario.run_config(scenario.runs[0], clients)
    from fedge.common.task import resolve_task

    defaults = resolve_task(scenario.task).train_defaults
    batch = int(scenario.batch_size or defaults.get("batch-size", 32))
    lr = float(scenario.lr or defaults.get("lr", 0.05))
    epochs = int(scenario.local_epochs or defaults.get("local-epochs", 1))
    per_example = calibrate(scenario.task, config, clients, batch, lr,
                            examples=64 if scenario.smoke else 256)
    sizes = partition_sizes(scenario.task, config, clients)
    largest = expected_max_examples(sizes, scenario.per_round, seed=scenario.seed) * epochs
    return {"seconds_per_example_here": round(per_example, 6),
            "expected_max_examples_per_round": round(largest, 1),
            "compute_seconds_here": round(per_example * largest, 3)}


def run_scenario(
    scenario: Scenario,
    out: Path,
    console: Console | None = None,
    engine: str | None = None,
    only: Sequence[str] = (),
) -> Path:
    """Run the scenario's runs (or those labelled in `only`); returns report.json's path."""
    console = console or Console()
    engine = engine or scenario.engine
    clients = scenario.num_clients()
    runs = [r for r in scenario.runs if not only or r.label in only]
    if not runs:
        raise ValueError(f"no run of {scenario.name} is labelled {', '.join(only)}")
    compute = device_compute(scenario, clients)
    profiles = [get_profile(p) for p in scenario.profiles]
    reports: list[RunReport] = []
    started = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                  console=console) as progress:
        for run in runs:
            config = scenario.run_config(run, clients)
            report = RunReport(codec=run.label, strategy="fedavg", extra={
                "uplink_codec": run.codec, "downlink_codec": run.downlink,
                "apps": "stock-flower" if run.stock else "fedge"})
            bar = progress.add_task(f"{run.label:>20}", total=scenario.rounds,
                                    status="starting")

            def on_round(record: RoundMetrics, report: RunReport = report, bar: Any = bar
                         ) -> None:
                report.rounds.append(round_record(record.to_dict()))
                acc = "-" if record.accuracy is None else f"{record.accuracy:.3f}"
                progress.update(bar, completed=record.round,
                                status=f"acc {acc}  down {record.downlink_bytes / 1e6:.2f} MB"
                                       f"  up {record.uplink_bytes / 1e6:.2f} MB")

            t0 = time.perf_counter()
            final = run_once(run, config, clients, [on_round], engine, seed=scenario.seed)
            report.extra["wall_seconds"] = round(time.perf_counter() - t0, 2)
            report.extra["run_config"] = config
            if final is not None:
                progress.update(bar, status="per-client accuracy")
                t1 = time.perf_counter()
                report.extra["client_accuracy"] = client_accuracies(
                    config, final, clients, limit=scenario.client_eval)
                report.extra["client_accuracy_seconds"] = round(time.perf_counter() - t1, 2)
            report.extra["summary"] = run_summary(report.rounds, scenario.target_accuracy,
                                                  report.extra.get("client_accuracy"))
            report.extra["profiles"] = {
                p.name: estimate(report.rounds, p, compute["compute_seconds_here"],
                                 scenario.per_round, scenario.target_accuracy)
                for p in profiles
            }
            reports.append(report)
            # saved after every run, so a long split run stopped midway keeps what it finished
            path = write_outputs(out, reports, _meta(scenario, engine, clients, compute, started))
    return path


def _meta(scenario: Scenario, engine: str, clients: int, compute: dict[str, Any],
          started: float) -> dict[str, Any]:
    """report.json's `meta`: the scenario, its base run config and the calibration."""
    return {
        "scenario": scenario.name, "task": scenario.task, "clients": clients,
        "per_round": scenario.per_round, "rounds": scenario.rounds,
        "partition": scenario.partition, "alpha": scenario.alpha, "seed": scenario.seed,
        "target_accuracy": scenario.target_accuracy, "engine": engine,
        "run_config": scenario.run_config(RunSpec("none"), clients), **compute,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "command": f"fedge simulate --scenario {scenario.name.removesuffix('-smoke')}"
                   + (" --smoke" if scenario.smoke else ""),
    }


def write_outputs(out: Path, reports: Sequence[RunReport], meta: dict[str, Any]) -> Path:
    """report.json, report.png and report.md of a scenario; returns report.json's path."""
    path = write_report(out, reports, meta)
    body = {"runs": [r.to_json() for r in reports]}
    plot_report(body, out / "report.png",
                title=f"{meta['scenario']}: {meta['clients']} clients, "
                      f"{meta['per_round']} a round")
    plot_client_accuracy(body, out / "clients.png",
                         title=f"{meta['scenario']}: accuracy on own test split")
    (out / "report.md").write_text(f"## {meta['scenario']}\n\n`{meta['command']}`\n\n"
                                   + markdown_table(body))
    return path


def merge_reports(scenario: Scenario, parts: Sequence[Path], out: Path) -> Path:
    """One report from the reports of a scenario split with `--only`, in the scenario's order.

    Each part must be a report of this scenario with the same run config; a run
    label found in two parts is an error, so nothing is silently dropped. Each
    part calibrated the device compute time on its own (on a shared machine the
    figures differ by some percent), so profile estimates are redone with the
    first part's calibration: runs compare on the same compute assumption.
    Summaries and estimates use the scenario's target as defined now, so a
    merge of one part re-renders a report after the target changed.
    """
    loaded = [load_report(p / "report.json" if p.is_dir() else p) for p in parts]
    if not loaded:
        raise ValueError("nothing to merge: name the parts' output folders")
    first = loaded[0].get("meta") or {}
    runs: dict[str, dict[str, Any]] = {}
    for part, body in zip(parts, loaded, strict=True):
        meta = body.get("meta") or {}
        if (meta.get("scenario") != scenario.name or "runs" not in body
                or meta.get("run_config") != first.get("run_config")):
            raise ValueError(f"{part}: not a {scenario.name} report with the same run config")
        for run in body["runs"]:
            if run["codec"] in runs:
                raise ValueError(f"run {run['codec']!r} is in more than one part")
            runs[run["codec"]] = run
    unknown = sorted(set(runs) - {r.label for r in scenario.runs})
    if unknown:
        raise ValueError(f"runs {', '.join(unknown)} are not runs of {scenario.name}")
    order = [r.label for r in scenario.runs if r.label in runs]
    reports = [RunReport(codec=label, strategy=runs[label]["strategy"],
                         rounds=runs[label]["rounds"],
                         extra={k: v for k, v in runs[label].items()
                                if k not in ("codec", "strategy", "rounds")})
               for label in order]
    compute = first.get("compute_seconds_here")
    for report in reports:  # the scenario's target, and one calibration for every run
        report.extra["summary"] = run_summary(report.rounds, scenario.target_accuracy,
                                              report.extra.get("client_accuracy"))
        if compute is not None:
            report.extra["profiles"] = {
                name: estimate(report.rounds, get_profile(name), compute, scenario.per_round,
                               scenario.target_accuracy)
                for name in scenario.profiles}
    meta = {**first, "wall_seconds": round(sum(b["meta"]["wall_seconds"] for b in loaded), 2),
            "target_accuracy": scenario.target_accuracy, "merged_from": [str(p) for p in parts]}
    return write_outputs(out, reports, meta)
