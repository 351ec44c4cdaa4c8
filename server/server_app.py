"""fedge's ServerApp: a wrapped Flower strategy, central evaluation, per-round records.

The same app runs in fedge's in-process Grid, Flower's simulation engine,
Flower's deployment engine and fedge's coordinator. Its settings come from the
run config (`flwr run --run-config`, or the coordinator's config), over the
defaults given to `make_server_app(config)`, over `DEFAULTS`:

`task`, `strategy` (fedavg|fedprox|fedadam|fedyogi|fedmedian|fedtrimmedavg|krum|fedavgm,
or `module:object` naming a Flower strategy object or a zero-argument factory of one),
`codec`, `num-rounds`, `fraction-train`, `min-train-nodes`, `fraction-evaluate`,
`min-evaluate-nodes`, `lr`, `local-epochs`, `batch-size`, `proximal-mu`
(FedProx only), `server-lr` (FedAdam/FedYogi's eta, default 0.01; FedAvgM's server
learning rate, default 1.0), `server-momentum` (FedAvgM), `server-tau` (FedAdam/FedYogi's
tau), `lr-decay` (the client lr of round r is lr x lr-decay^(r-1)), `trim-beta`,
`krum-malicious`, `seed`, `torch-threads`, `round-timeout`,
`max-update-bytes`, `report-path`, and for a run that resumes, `first-round`
(rounds run from here to `num-rounds`, numbered as in the original run) and
`initial-model` (a `fedge.v1.ModelSnapshot` file to start from instead of the
task's fresh model). Secure aggregation (docs/secure-aggregation.md):
`secure-aggregation` (false), `secagg-bits` (8 or 4), `secagg-clip` (the first
round's clipping range; later ones follow the released mean), and
`secagg-min-survivors` (the fewest devices a sum is released for).

Each round ends with central evaluation of the new global model on the task's
held-out test set and a `RoundMetrics` record, delivered to the listeners
given to `make_server_app` (in-process callers) and appended to the JSON-lines
file `report-path` when set (callers in another process, e.g. `flwr run`).
When the app returns, `context.state` holds `fedge.report` (ConfigRecord:
`rounds`, one JSON string per round; `initial-accuracy`, `initial-loss`) and
`fedge.final-arrays` (the final global model). Callers that must persist each
round (the coordinator) pass `on_round_end` hooks: they get the round's record
with the new global model and the node ids whose replies were aggregated,
before listeners hear of it.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from fedge.common.arrays import arrays_to_record, model_to_arrays, record_to_model
from fedge.common.contract import FINAL_ARRAYS_STATE_KEY, REPORT_STATE_KEY, RESET_RESIDUAL_KEY
from fedge.common.snapshot import snapshot_to_arrays
from fedge.common.task import Task, resolve_task
from fedge.common.training import evaluate
from fedge.common.update_codec import DEFAULT_MAX_UPDATE_BYTES
from fedge.server.app_loading import is_object_ref, load_strategy
from fedge.server.compressed_strategy import CompressedStrategy
from fedge.server.downlink import downlink_from_config
from fedge.server.dp import dp_from_config
from fedge.server.round_metrics import JsonlRoundWriter, RoundListener, RoundMetrics, notify
from fedge.server.run_config import STRATEGIES, validate_run_config

log = logging.getLogger(__name__)


#: fields whose default is None (left to the task) and the type a set value has
_OPTIONAL_KINDS: dict[str, type] = {"lr": float, "local_epochs": int, "batch_size": int,
                                    "server_lr": float}


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
    # None: not sent, so the task's own `train_defaults` apply on the device
    lr: float | None = None
    local_epochs: int | None = None
    batch_size: int | None = None
    proximal_mu: float = 0.01
    # None: the strategy's own default (FedAdam/FedYogi 0.01, FedAvgM 1.0)
    server_lr: float | None = None
    server_momentum: float = 0.0
    server_tau: float = 1e-3
    lr_decay: float = 1.0
    trim_beta: float = 0.2
    krum_malicious: int = 0
    seed: int = 0
    torch_threads: int = 1
    round_timeout: float = 3600.0
    max_update_bytes: int = DEFAULT_MAX_UPDATE_BYTES
    report_path: str = ""
    first_round: int = 1
    initial_model: str = ""
    # devices drop their error-feedback residual this round (continuous mode, after a
    # rejected candidate: the residual belongs to an update that was thrown away)
    reset_residual: bool = False
    # secure aggregation (docs/secure-aggregation.md): the coordinator learns only the sum of
    # the devices' deltas, quantized to `secagg-bits` on ranges that start at `secagg-clip`
    secure_aggregation: bool = False
    secagg_bits: int = 8
    secagg_clip: float = 0.1
    secagg_min_survivors: int = 2

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> ServerConfig:
        """Parse run-config style keys (`num-rounds`); unknown keys are left to others."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in config:
                continue
            raw = config[key]
            if f.name in _OPTIONAL_KINDS and raw == "":
                continue  # "" in an app config: the task's own default (run_config.py)
            kind = _OPTIONAL_KINDS.get(f.name, type(getattr(cls, f.name)))
            if kind is bool and isinstance(raw, str):  # "false" is not bool("false")
                raw = raw.strip().lower() in ("true", "1", "yes")
            try:
                values[f.name] = kind(raw)
            except (TypeError, ValueError):
                raise ValueError(
                    f"run config {key!r}: cannot read {raw!r} as {kind.__name__}"
                ) from None
        cfg = cls(**values)
        if cfg.first_round < 1:
            raise ValueError(f"run config 'first-round' must be at least 1, got {cfg.first_round}")
        if cfg.strategy.lower() not in STRATEGIES and not is_object_ref(cfg.strategy):
            raise ValueError(
                f"unknown strategy {cfg.strategy!r}; choose one of {', '.join(STRATEGIES)} "
                "or module:object naming a Flower Strategy"
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
    made = _STRATEGY_CLASSES.get(name)
    if made is None:
        raise ValueError(f"unknown strategy {cfg.strategy!r}")
    cls = made if cfg.lr_decay == 1.0 else with_lr_decay(made)
    extra: dict[str, Any] = {}
    if name == "fedprox":
        extra = {"proximal_mu": cfg.proximal_mu}
    elif name in ("fedadam", "fedyogi"):
        extra = {"eta": 0.01 if cfg.server_lr is None else cfg.server_lr,
                 "eta_l": cfg.lr or 0.1, "tau": cfg.server_tau}
    elif name == "fedavgm":
        extra = {"server_learning_rate": 1.0 if cfg.server_lr is None else cfg.server_lr,
                 "server_momentum": cfg.server_momentum}
    elif name == "fedtrimmedavg":
        extra = {"beta": cfg.trim_beta}
    elif name == "krum":
        extra = {"num_malicious_nodes": cfg.krum_malicious}
    strategy = cls(**common, **extra)
    if cfg.lr_decay != 1.0:
        strategy.lr_decay = cfg.lr_decay  # type: ignore[attr-defined]
    return strategy


_STRATEGY_CLASSES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi,
    "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum, "fedavgm": FedAvgM,
}


class LrDecay:
    """Mixin: the client learning rate of round r is the configured lr x `lr_decay`^(r-1).

    Late rounds take smaller local steps, so the global model stops swinging
    towards whichever label-skewed clients were sampled last. A mixin (not a
    wrapper) keeps the strategy's own class, so `CompressedStrategy` still
    streams FedAvg's mean for FedAvg and FedProx.
    """

    lr_decay: float = 1.0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if "lr" in config and self.lr_decay != 1.0:
            config = ConfigRecord(dict(config))
            base = config["lr"]
            assert isinstance(base, int | float)
            config["lr"] = float(base) * self.lr_decay ** max(0, server_round - 1)
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]


_DECAYED: dict[type, type] = {}


def with_lr_decay(cls: type[FedAvg]) -> type[FedAvg]:
    """`cls` with `LrDecay` mixed in (one class per strategy class)."""
    if cls not in _DECAYED:
        _DECAYED[cls] = type(f"{cls.__name__}LrDecay", (LrDecay, cls), {})
    return _DECAYED[cls]


def train_config(cfg: ServerConfig, task: Task) -> ConfigRecord:
    """What every train message tells the ClientApp (docs/CONTRACTS.md keys).

    Hyperparameters the run config leaves unset come from the task's
    `train_defaults`, so a stock client without fedge's defaults trains the same.
    """
    chosen = {"lr": cfg.lr, "local-epochs": cfg.local_epochs, "batch-size": cfg.batch_size}
    config: dict[str, Any] = {k: v for k, v in task.train_defaults.items() if k in chosen}
    config.update({k: v for k, v in chosen.items() if v is not None})
    config["torch-threads"] = cfg.torch_threads
    if cfg.reset_residual:
        config[RESET_RESIDUAL_KEY] = True
    return ConfigRecord(config)


@dataclass(frozen=True)
class RoundEnd:
    """A finished round as an `on_round_end` hook sees it: record, new model, contributors."""

    metrics: RoundMetrics
    arrays: ArrayRecord
    accepted_nodes: list[int]


RoundEndHook = Callable[[RoundEnd], None]


class ContinuedRounds(Strategy):
    """Run `strategy` from round `offset + 1`: what a resumed run needs from `Strategy.start`.

    `start(num_rounds=n)` counts 1..n; this wrapper shifts every round number
    the wrapped strategy and `evaluate_fn` see by `offset`, so round numbers in
    messages (`server-round`), records and the store continue where the run
    stopped. Round 0 (the initial evaluation) stays 0.
    """

    def __init__(self, strategy: Strategy, offset: int) -> None:
        self.strategy = strategy
        self.offset = int(offset)

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        return list(
            self.strategy.configure_train(server_round + self.offset, arrays, config, grid)
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        return list(
            self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    def shift(
        self, evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None]
    ) -> Callable[[int, ArrayRecord], MetricRecord | None]:
        """`evaluate_fn` as called with the run's own round numbers."""

        def shifted(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            return evaluate_fn(server_round + self.offset if server_round else 0, arrays)

        return shifted


def initial_arrays(task: Task, cfg: ServerConfig) -> ArrayRecord:
    """The model the run starts from: `initial-model`'s snapshot, else the task's fresh model.

    A snapshot must hold exactly the task model's tensors (names, shapes, dtypes).
    """
    fresh = model_to_arrays(task.make_model())
    if not cfg.initial_model:
        return arrays_to_record(fresh)
    with open(cfg.initial_model, "rb") as f:
        data = f.read()
    expected = {k: (tuple(a.shape), a.dtype) for k, a in fresh.items()}
    arrays, _ = snapshot_to_arrays(data, expected=expected)
    return arrays_to_record(arrays)


class _RoundRecorder:
    """The strategy's `evaluate_fn`: central evaluation, then one RoundMetrics per round."""

    def __init__(
        self,
        task: Task,
        run_config: Mapping[str, Any],
        strategy: CompressedStrategy,
        listeners: Sequence[RoundListener],
        round_end: Sequence[RoundEndHook] = (),
    ) -> None:
        self.model = task.make_model()
        self.test = task.central_test(run_config)
        self.strategy = strategy
        self.listeners = listeners
        self.round_end = round_end
        self.rounds: list[RoundMetrics] = []
        self.initial: tuple[float, float] | None = None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round and self.strategy.stopped:  # the DP budget ended training: no round
            return None
        loss = accuracy = None
        if self.test is not None:
            record_to_model(self.model, arrays)
            loss, accuracy = evaluate(self.model, *self.test)
        if server_round == 0:
            if loss is not None and accuracy is not None:
                self.initial = (loss, accuracy)
        else:
            self._record(server_round, loss, accuracy, arrays)
        if loss is None or accuracy is None:
            return None
        return MetricRecord({"loss": float(loss), "accuracy": float(accuracy)})

    def _downlink_messages(self, server_round: int) -> dict[str, int]:
        downlink = self.strategy.downlink
        sent = downlink.history.get(server_round) if downlink is not None else None
        if sent is None:
            return {}
        return {"full": sent.full_messages, "first": sent.first_messages,
                "delta": sent.delta_messages, "returning": sent.returning}

    def _record(
        self, server_round: int, loss: float | None, accuracy: float | None, arrays: ArrayRecord
    ) -> None:
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
            codec=stats.wire_codec,  # what arrived, not what was asked for
            downlink_messages=self._downlink_messages(server_round),
        )
        if stats.secagg is not None:
            record.secagg = dict(stats.secagg)
        if stats.dp is not None:
            record.epsilon, record.delta = stats.dp.epsilon, stats.dp.delta
            record.dp_clip, record.dp_noise_std = stats.dp.clip, stats.dp.noise_std
        self.rounds.append(record)
        end = RoundEnd(record, arrays, list(stats.accepted_nodes))
        for hook in self.round_end:
            hook(end)
        notify(self.listeners, record)


def secure_grid(grid: Grid, cfg: ServerConfig) -> Grid:
    """`grid` with every train round securely aggregated as the run config says: ranges from
    public information (`AdaptiveClip`, starting at `secagg-clip`), error feedback on."""
    from fedge.server.secagg_server import AdaptiveClip, SecAggConfig, SecAggGrid

    return SecAggGrid(grid, SecAggConfig(
        clip=AdaptiveClip(cfg.secagg_clip), bits=cfg.secagg_bits, error_feedback=True,
        min_survivors=cfg.secagg_min_survivors, timeout=cfg.round_timeout))


def make_server_app(
    config: Mapping[str, Any] | None = None,
    *,
    listeners: Sequence[RoundListener] = (),
    strategy_factory: Callable[[ServerConfig], Strategy] = build_strategy,
    on_round_end: Sequence[RoundEndHook] = (),
) -> ServerApp:
    """A ServerApp with `config` as defaults under the run config, reporting to `listeners`.

    `strategy_factory` builds the inner Flower strategy (default: by the
    `strategy` key); the app always wraps it in `CompressedStrategy`.
    `on_round_end` hooks run as each round ends, before `listeners`; an
    exception there stops the run (the coordinator persists rounds there).
    """
    defaults = dict(config or {})
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = {**defaults, **dict(context.run_config)}
        validate_run_config(run_config)  # RunConfigError names the bad key, before any round
        cfg = ServerConfig.from_mapping(run_config)
        random.seed(cfg.seed)  # Flower's node sampling uses `random`: same seed, same clients
        task = resolve_task(cfg.task)
        strategy = CompressedStrategy(
            # `module:object` names the user's own strategy object (server/app_loading.py)
            load_strategy(cfg.strategy) if is_object_ref(cfg.strategy) else strategy_factory(cfg),
            cfg.codec,
            max_update_bytes=cfg.max_update_bytes,
            run_id=str(context.run_id),
            downlink=downlink_from_config(run_config, run_id=str(context.run_id)),
            dp=dp_from_config(run_config),
        )
        targets = list(listeners)
        if cfg.report_path:
            targets.append(JsonlRoundWriter(cfg.report_path))
        recorder = _RoundRecorder(task, run_config, strategy, targets, on_round_end)
        offset = cfg.first_round - 1
        # secure aggregation goes in one level down, on the grid: every train round becomes
        # the four SecAgg+ exchanges and the strategy gets one reply (docs/secure-aggregation.md)
        if cfg.secure_aggregation:
            grid = secure_grid(grid, cfg)
        runner: Strategy = strategy
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] = recorder
        if offset:  # a resumed run: round numbers continue where it stopped
            continued = ContinuedRounds(strategy, offset)
            runner, evaluate_fn = continued, continued.shift(recorder)
        result = runner.start(
            grid=grid,
            initial_arrays=initial_arrays(task, cfg),
            num_rounds=max(0, cfg.num_rounds - offset),
            timeout=cfg.round_timeout,
            train_config=train_config(cfg, task),
            evaluate_fn=evaluate_fn,
        )
        report = ConfigRecord({"rounds": [json.dumps(r.to_dict()) for r in recorder.rounds]})
        if recorder.initial is not None:
            report["initial-loss"], report["initial-accuracy"] = recorder.initial
        if strategy.stopped:  # the DP budget ended training early (server/dp.py)
            report["stopped"] = strategy.stopped
        context.state[REPORT_STATE_KEY] = report
        if len(result.arrays) > 0:
            context.state[FINAL_ARRAYS_STATE_KEY] = result.arrays

    return server_app


#: The default app (`fedge.server.server_app:app`), configured by the run config alone.
app = make_server_app()
