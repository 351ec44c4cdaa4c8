"""`fedge bench aggregate`: its machinery runs at a tiny size and prints the promised JSON.

Only the plumbing is tested here (child processes, baselines, both paths, the
checks' arithmetic); the memory bars belong to the full-size benchmark output.
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from fedge.bench import aggregate_bench as ab
from fedge.cli import app

TINY = 20_000
PER_RUN_KEYS = {"peak_above_baseline_mb", "baseline_mb", "seconds"}


@pytest.mark.parametrize("params", [TINY, 5_000_000, 4, 1001])
def test_layout_sums_to_params(params: int) -> None:
    layout = ab.model_layout(params)
    assert sum(math.prod(shape) for _, shape in layout) == params
    assert len({name for name, _ in layout}) == len(layout)


def test_default_layout_is_a_few_big_tensors() -> None:
    assert ab.model_layout(5_000_000) == [
        ("fc1.weight", (2000, 2000)), ("fc2.weight", (1000, 999)), ("fc2.bias", (1000,))
    ]


def _check_report(report: dict, held: bool) -> None:
    assert report["model_params"] == TINY
    assert report["model_mb"] == pytest.approx(TINY * 4 / 2**20, abs=1e-3)
    assert set(report["results"]) == {"wrapper", "stock_fedavg"}
    assert ("held_inputs" in report) == held
    for path in ("wrapper", "stock_fedavg"):
        rows = list(report["results"][path].values())
        assert set(report["results"][path]) == {"2", "3"}
        if held:
            assert set(report["held_inputs"][path]) == {"3"}
            rows += list(report["held_inputs"][path].values())
        for row in rows:
            assert row.keys() >= PER_RUN_KEYS
            assert row["baseline_mb"] > 0 and row["seconds"] >= 0
            assert row["seconds"] == min(row["seconds_runs"])
        # the time check's count is timed TIMING_REPEATS times, the others once
        assert len(report["results"][path]["3"]["seconds_runs"]) == ab.TIMING_REPEATS
        assert len(report["results"][path]["2"]["seconds_runs"]) == 1
    checks = report["checks"]
    assert set(checks) == {
        "wrapper_growth_model_sizes", "wrapper_vs_stock_at_3", "wrapper_time_vs_stock_at_3"
    }
    assert report["wrapper_time_vs_stock_at_3"] == checks["wrapper_time_vs_stock_at_3"]["value"]
    for c in checks.values():
        assert isinstance(c["pass"], bool) and {"value", "bar"} <= c.keys()
    w = report["results"]["wrapper"]
    growth = w["3"]["peak_above_baseline_mb"] - w["2"]["peak_above_baseline_mb"]
    assert report["wrapper_growth_model_sizes"] == pytest.approx(
        growth / (TINY * 4 / 2**20), abs=2e-3
    )
    # both paths averaged the same updates, the wrapper's arriving as int8 (about 1/4 the bytes)
    assert report["results_agree"] is True
    wrapper_in = report["results"]["wrapper"]["3"]["inputs_mb"]
    assert wrapper_in < 0.3 * report["results"]["stock_fedavg"]["3"]["inputs_mb"]
    assert report["pass"] == (all(c["pass"] for c in checks.values()) and report["results_agree"])


def test_report_in_process_with_held_inputs() -> None:
    """The report's structure and arithmetic, measuring in this process to stay fast."""
    report = ab.run(TINY, (2, 3), held=True, measure_fn=ab.run_child)
    _check_report(report, held=True)


def test_cli_prints_one_json_object(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ab, "measure", ab.run_child)  # in this process: the child is tested below
    result = CliRunner().invoke(
        app, ["bench", "aggregate", "--json", "--no-held", "--params", str(TINY), "--counts", "2,3"]
    )
    assert result.exit_code == 0, result.output
    _check_report(json.loads(result.stdout), held=False)


def test_measure_runs_in_a_fresh_child_process() -> None:
    row = ab.measure("wrapper", 2, TINY, "streamed")
    assert row["path"] == "wrapper" and row["count"] == 2 and row["delivery"] == "streamed"
    assert row.keys() >= PER_RUN_KEYS
    assert row["baseline_mb"] > 0 and row["seconds"] >= 0


def test_bad_counts_are_refused() -> None:
    result = CliRunner().invoke(app, ["bench", "aggregate", "--counts", "20"])
    assert result.exit_code != 0
    with pytest.raises(ValueError):
        ab.run(TINY, (5, 5), measure_fn=lambda *a: {})
