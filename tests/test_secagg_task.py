"""Secure aggregation with fedge's own ClientApp on a real task, and error feedback across rounds.

The digits task trains for real in every device; the round runs through
`SecAggStrategy(FedAvg)` over an InProcessGrid. Accuracy lands next to plain
FedAvg's (the masked int8 mean is the unweighted mean of clipped, stochastically
rounded deltas: close, not identical).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from fedge.client.client_app import make_client_app
from fedge.client.secagg_device import secagg_mod
from fedge.common.arrays import arrays_to_record, model_to_record, record_to_model
from fedge.common.records import records_of
from fedge.common.task import resolve_task
from fedge.common.training import evaluate
from fedge.server.inprocess_grid import InProcessGrid
from fedge.server.secagg_server import (
    AdaptiveClip,
    SecAggConfig,
    SecAggResult,
    SecAggStrategy,
    run_secagg_round,
)

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
RUN = {"task": "digits", "lr": 0.1, "seed": 3}


def _accuracy_after(strategy, rounds: int) -> float:  # type: ignore[no-untyped-def]
    task = resolve_task("digits")
    grid = InProcessGrid(make_client_app(mods=[secagg_mod]), 4, run_config=RUN)
    result = strategy.start(
        grid=grid, initial_arrays=model_to_record(task.make_model()), num_rounds=rounds
    )
    test = task.central_test(RUN)
    assert test is not None
    model = record_to_model(task.make_model(), result.arrays)
    return evaluate(model, *test)[1]


def test_fedge_client_app_learns_through_secure_aggregation_like_plain_fedavg() -> None:
    plain = _accuracy_after(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), 2)
    secure_strategy = SecAggStrategy(
        FedAvg(fraction_train=1.0, fraction_evaluate=0.0),
        # ranges from public information: the previous round's released mean (round 1: 0.1);
        # lr 0.1 moves weights by up to ~0.4 a round, and a fixed clip of 0.05 cost 4 points
        SecAggConfig(clip=AdaptiveClip(0.1, factor=8.0), error_feedback=True),
    )
    secure = _accuracy_after(secure_strategy, 2)
    assert plain >= 0.85  # the secagg mod passes non-secagg train messages through
    assert secure >= plain - 0.02, (secure, plain)
    r2 = secure_strategy.result(2)
    assert r2 is not None and len(r2.survivors) == 4 and not r2.refused


STEP = 2.0**-10
CLIP = 127 * STEP


def _round_app(deltas: dict[int, float]) -> ClientApp:
    """Every coordinate's delta is deltas[server-round]."""
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = records_of(msg.content, ConfigRecord)["config"]
        d = np.float32(deltas[int(config["server-round"])])  # type: ignore[arg-type]
        arrays = {
            k: a.numpy() + d for k, a in records_of(msg.content, ArrayRecord)["arrays"].items()
        }
        return Message(
            RecordDict(
                {"arrays": arrays_to_record(arrays), "metrics": MetricRecord({"num-examples": 1})}
            ),
            reply_to=msg,
        )

    return app


def _two_rounds(error_feedback: bool) -> np.ndarray:
    # on the quantizer's grid: 167 steps (40 beyond the clip), then 40
    grid = InProcessGrid(_round_app({1: 167 * STEP, 2: 40 * STEP}), 3)
    model = {"w": np.zeros(8, np.float32)}
    total = np.zeros(8, np.float32)
    for rnd in (1, 2):
        messages = [
            Message(
                RecordDict(
                    {
                        "arrays": arrays_to_record(model),
                        "config": ConfigRecord({"server-round": rnd}),
                    }
                ),
                node,
                MessageType.TRAIN,
            )
            for node in grid.get_node_ids()
        ]
        config = SecAggConfig(clip=CLIP, error_feedback=error_feedback)
        total += run_secagg_round(grid, messages, config, server_round=rnd).delta_sum
    return total


def test_error_feedback_repays_what_the_shared_clip_cut() -> None:
    # round 1 sends the clip (127 steps) and keeps 40 on the device; round 2 sends 40 + 40
    assert np.array_equal(_two_rounds(error_feedback=True), np.full(8, 3 * 207 * STEP, np.float32))
    # without it the 40 steps clipped in round 1 are lost for good
    assert np.array_equal(_two_rounds(error_feedback=False), np.full(8, 3 * 167 * STEP, np.float32))


def test_adaptive_clip_follows_the_released_mean_within_its_spread() -> None:
    clip = AdaptiveClip(0.1, factor=4.0, spread=4.0)
    arrays = {
        "a": np.zeros(3, np.float32),
        "n": np.zeros(1, np.int64),
        "b": np.zeros(2, np.float32),
    }
    assert clip(1, arrays) == [0.1, 0.1]
    released = np.array([0.03, -0.06, 0.0, 0.5, -0.5], np.float32) * 2  # two survivors
    result = SecAggResult(
        arrays=ArrayRecord(), delta_sum=released, survivors=[1, 2], dropped=[],
        num_examples=2, metrics=MetricRecord(),
    )  # fmt: skip
    clip.observe(result, arrays)
    got = clip(2, arrays)
    assert got[0] == pytest.approx(4 * 0.06) and got[1] == pytest.approx(0.4)  # 2.0 capped at 4x


def test_wiring_into_fedges_apps_compressed_strategy_over_a_secagg_grid() -> None:
    """How fedge's ServerApp takes secure aggregation: its `CompressedStrategy` (codec none)
    started on `SecAggGrid(grid)`, devices with `[secagg_mod, compression_mod]`."""
    from fedge.client.compression_mod import compression_mod
    from fedge.server.compressed_strategy import CompressedStrategy
    from fedge.server.secagg_server import SecAggGrid

    task = resolve_task("digits")
    grid = InProcessGrid(make_client_app(mods=[secagg_mod, compression_mod]), 4, run_config=RUN)
    secure = SecAggGrid(grid, SecAggConfig(clip=AdaptiveClip(0.1, factor=8.0), error_feedback=True))
    strategy = CompressedStrategy(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), "none")
    result = strategy.start(
        grid=secure, initial_arrays=model_to_record(task.make_model()), num_rounds=2
    )
    test = task.central_test(RUN)
    assert test is not None
    accuracy = evaluate(record_to_model(task.make_model(), result.arrays), *test)[1]
    assert accuracy >= 0.9
    assert sorted(secure.results) == [1, 2] and all(
        len(r.survivors) == 4 and not r.refused for r in secure.results.values()
    )
