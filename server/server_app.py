"""fedge's ServerApp: a wrapped Flower strategy, central evaluation, per-round records.

The same app runs in fedge's in-process Grid, Flower's simulation engine,
Flower's deployment engine and fedge's coordinator. Its settings come from the
run config (`flwr run --run-config`, or the coordinator's config), over the
defaults given to `make_server_app(config)`, over `DEFAULTS`:

`task`, `strategy` (fedavg|fedprox|fedadam|fedyogi|fedmedian|fedtrimmedavg|krum),
`codec`, `num-rounds`, `fraction-train`, `min-train-nodes`, `fraction-evaluate`,
`min-evaluate-nodes`, `lr`, `local-epochs`, `batch-size`, `proximal-mu`
(FedProx only), `server-lr` (FedAdam/FedYogi's eta), `trim-beta`,
`krum-malicious`, `seed`, `torch-threads`, `round-timeout`,
`max-update-bytes`, `report-path`.

Each round ends with central evaluation of the new global model on the task's
held-out test set and a `RoundMetrics` record, delivered to the listeners
given to `make_server_app` (in-process callers) and appended to the JSON-lines
file `report-path` when set (callers in another process, e.g. `flwr run`).
When the app returns, `context.state` holds `fedge.report` (ConfigRecord:
`rounds`, one JSON string per round; `initial-accuracy`, `initial-loss`) and
`fedge.final-arrays` (the final global model).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from fedge.common.arrays import model_to_record, record_to_model
from fedge.common.task import Task, resolve_task
from fedge.common.training import evaluate
from fedge.common.update_codec import DEFAULT_MAX_UPDATE_BYTES
from fedge.server.compressed_strategy import CompressedStrategy
from fedge.server.round_metrics import JsonlRoundWriter, RoundListener, RoundMetrics, notify
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

log = logging.getLogger(__name__)

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")


@dataclass(frozen=True)
class ServerConfig:
    """The ServerApp's settings, one field per run-config key (dashes become underscores)."""

    task: str = "digits"
    strategy: str = "fedavg"
    codec: str = "none"
    num_rounds: int = 3
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    fraction_evaluate: float = 0.0
    min_evaluate_nodes: int = 2
    lr: float = 0.05
    local_epochs: int = 1
    batch_size: int = 32
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    trim_beta: float = 0.2
    krum_malicious: int = 0
    seed: int = 0
    torch_threads: int = 1
    round_timeout: float = 3600.0
    max_update_bytes: int = DEFAULT_MAX_UPDATE_BYTES
    report_path: str = ""

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> ServerConfig:
        """Parse run-config style keys (`num-rounds`); unknown keys are left to others."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in config:
                continue
            raw = config[key]
            kind = type(getattr(cls, f.name))
            try:
                values[f.name] = kind(raw)
            except (TypeError, ValueError):
                raise ValueError(
                    f"run config {key!r}: cannot read {raw!r} as {kind.__name__}"
                ) from None
        cfg = cls(**values)
        if cfg.strategy.lower() not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {cfg.strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        return cfg


def build_strategy(cfg: ServerConfig) -> Strategy:
    """The stock Flower strategy the run config names (not yet wrapped)."""
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_train_nodes,
        "min_evaluate_nodes": cfg.min_evaluate_nodes,
        "min_available_nodes": cfg.min_train_nodes,
    }
    name = cfg.strategy.lower()
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    if name == "fedadam":
        return FedAdam(**common, eta=cfg.server_lr, eta_l=cfg.lr)
    if name == "fedyogi":
        return FedYogi(**common, eta=cfg.server_lr, eta_l=cfg.lr)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=cfg.trim_beta)
    if name == "krum":
        return Krum(**common, num_malicious_nodes=cfg.krum_malicious)
    raise ValueError(f"unknown strategy {cfg.strategy!r}")


def train_config(cfg: ServerConfig) -> ConfigRecord:
    """What every train message tells the ClientApp (docs/CONTRACTS.md keys)."""
    return ConfigRecord(
        {
            "lr": cfg.lr,
            "local-epochs": cfg.local_epochs,
            "batch-size": cfg.batch_size,
            "torch-threads": cfg.torch_threads,
        }
    )


class _RoundRecorder:
    """The strategy's `evaluate_fn`: central evaluation, then one RoundMetrics per round."""

    def __init__(
        self,
        task: Task,
        run_config: Mapping[str, Any],
        strategy: CompressedStrategy,
        listeners: Sequence[RoundListener],
    ) -> None:
        self.model = task.make_model()
        self.test = task.central_test(run_config)
        self.strategy = strategy
        self.listeners = listeners
        self.rounds: list[RoundMetrics] = []
        self.initial: tuple[float, float] | None = None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        loss = accuracy = None
        if self.test is not None:
            record_to_model(self.model, arrays)
            loss, accuracy = evaluate(self.model, *self.test)
        if server_round == 0:
            if loss is not None and accuracy is not None:
                self.initial = (loss, accuracy)
        else:
            self._record(server_round, loss, accuracy)
        if loss is None:
            return None
        return MetricRecord({"loss": float(loss), "accuracy": float(accuracy)})

    def _record(self, server_round: int, loss: float | None, accuracy: float | None) -> None:
        stats = self.strategy.traffic(server_round)
        record = RoundMetrics(
            round=server_round,
            accuracy=None if accuracy is None else float(accuracy),
            loss=None if loss is None else float(loss),
            uplink_bytes=stats.uplink_bytes,
            downlink_bytes=stats.downlink_bytes,
            rejected=stats.rejected,
            rejected_reasons=dict(stats.rejected_reasons),
            seconds=time.perf_counter() - stats.started_at,
            accepted=stats.accepted,
            train_loss=stats.train_metrics.get("train-loss"),
            codec=stats.codec,
        )
        self.rounds.append(record)
        notify(self.listeners, record)


def make_server_app(
    config: Mapping[str, Any] | None = None,
    *,
    listeners: Sequence[RoundListener] = (),
    strategy_factory: Callable[[ServerConfig], Strategy] = build_strategy,
) -> ServerApp:
    """A ServerApp with `config` as defaults under the run config, reporting to `listeners`.

    `strategy_factory` builds the inner Flower strategy (default: by the
    `strategy` key); the app always wraps it in `CompressedStrategy`.
    """
    defaults = dict(config or {})
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = {**defaults, **dict(context.run_config)}
        cfg = ServerConfig.from_mapping(run_config)
        random.seed(cfg.seed)  # Flower's node sampling uses `random`: same seed, same clients
        task = resolve_task(cfg.task)
        strategy = CompressedStrategy(
            strategy_factory(cfg),
            cfg.codec,
            max_update_bytes=cfg.max_update_bytes,
            run_id=str(context.run_id),
        )
        targets = list(listeners)
        if cfg.report_path:
            targets.append(JsonlRoundWriter(cfg.report_path))
        recorder = _RoundRecorder(task, run_config, strategy, targets)
        result = strategy.start(
            grid=grid,
            initial_arrays=model_to_record(task.make_model()),
            num_rounds=cfg.num_rounds,
            timeout=cfg.round_timeout,
            train_config=train_config(cfg),
            evaluate_fn=recorder,
        )
        report = ConfigRecord({"rounds": [json.dumps(r.to_dict()) for r in recorder.rounds]})
        if recorder.initial is not None:
            report["initial-loss"], report["initial-accuracy"] = recorder.initial
        context.state["fedge.report"] = report
        if len(result.arrays) > 0:
            context.state["fedge.final-arrays"] = result.arrays

    return server_app


#: The default app (`fedge.server.server_app:app`), configured by the run config alone.
app = make_server_app()
