"""`fedge bench secagg`: its code path at a tiny size prints the promised JSON rows.

The cost figures belong to the full-size run (bench/results/secagg.json); here
only the plumbing and the arithmetic that is size-independent are checked.
"""

from __future__ import annotations

import json
import os

from typer.testing import CliRunner

from fedge.cli import app

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
KEYS = {
    "clients",
    "codec",
    "bytes_per_coordinate",
    "round_trips",
    "client_seconds",
    "server_seconds",
}


def test_bench_prints_one_row_per_clients_and_codec() -> None:
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "secagg",
            "--json",
            "--clients",
            "3,4",
            "--codecs",
            "int8,int4,flower-secaggplus",
            "--params",
            "4000",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output.strip().splitlines()[-1])
    assert [(r["clients"], r["codec"]) for r in rows] == [
        (3, "int8"),
        (4, "int8"),
        (3, "int4"),
        (4, "int4"),
        (3, "flower-secaggplus"),
        (4, "flower-secaggplus"),
    ]
    for r in rows:
        assert set(r) >= KEYS, r
        assert r["round_trips"] == 4
        assert r["client_seconds"] > 0 and r["server_seconds"] > 0
    by = {(r["clients"], r["codec"]): r for r in rows}
    # packed words: int8 with 4 clients is 10 bits, int4 6 bits; Flower masks int64 words
    assert (
        10 / 8
        <= by[(4, "int8")]["bytes_per_coordinate"]
        < by[(4, "flower-secaggplus")]["bytes_per_coordinate"]
    )
    assert by[(4, "int4")]["bytes_per_coordinate"] < by[(4, "int8")]["bytes_per_coordinate"]
    assert by[(4, "flower-secaggplus")]["bytes_per_coordinate"] >= 8.0


def test_bench_refuses_bad_options_in_one_line() -> None:
    result = CliRunner().invoke(app, ["bench", "secagg", "--codecs", "int7"])
    assert result.exit_code == 2 and "int7" in result.output
    result = CliRunner().invoke(app, ["bench", "secagg", "--clients", "ten"])
    assert result.exit_code == 2 and "--clients" in result.output


def test_the_goal_check_reads_the_int8_row_at_100_clients() -> None:
    """bench/secagg_bench.py's own bar: int8 at 100 clients at most 2.0 bytes a coordinate."""
    from fedge.bench import secagg_bench

    row = {"clients": 100, "codec": "int8", "bytes_per_coordinate": 1.882}
    (passed,) = secagg_bench.check_goal([row])
    assert passed.startswith("PASS")
    (failed,) = secagg_bench.check_goal([{**row, "bytes_per_coordinate": 2.5}])
    assert failed.startswith("FAIL")
    assert secagg_bench.check_goal([{**row, "clients": 10}]) == []  # another row: no verdict
