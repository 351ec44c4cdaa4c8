"""One run config, checked once: what a new user mistypes is refused in one line, exit 2,
before Ray, Flower or torch load and before anything is stored; `--run-config` reads
Flower's syntax; fixed lists are real choices; one `--log-level` everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import click
import pytest
import typer

from fedge.cli import app
from fedge.common.codec_spec import VALUE_CODECS
from fedge.common.partition import PARTITIONERS
from fedge.common.task import BUILTIN_TASKS
from fedge.server.inprocess_grid import InProcessGrid, run_server_app_inprocess
from fedge.server.run_config import (
    STRATEGIES,
    RunConfigError,
    parse_run_config_args,
    validate_run_config,
)
from fedge.server.server_app import make_server_app

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
# the CLI, recording at exit which heavy packages it had imported by then
_RECORDING_CLI = textwrap.dedent("""
    import atexit, json, os, sys
    def _record():
        heavy = ("torch", "ray", "flwr", "grpc")
        with open(os.environ["FEDGE_TEST_MODULES"], "w") as f:
            json.dump(sorted(m for m in heavy if m in sys.modules), f)
    atexit.register(_record)
    from fedge.cli import app
    app()
""")


def _fedge(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    record = tmp_path / "modules.json"
    done = subprocess.run([sys.executable, "-c", _RECORDING_CLI, *args],
                          env={**ENV, "FEDGE_TEST_MODULES": str(record)},
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    return done, json.loads(record.read_text())


def _one_line_refusal(done: subprocess.CompletedProcess[str]) -> str:
    """Exit 2 and exactly one line of output in all, no traceback; returns the line."""
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


COORDINATOR_CASES = [
    (("--codec", "int9"), "--codec", ["int9", *VALUE_CODECS]),
    (("--strategy", "fedavgg"), "--strategy", ["fedavgg", *STRATEGIES]),
    (("--task", "nosuchmod:task"), "--task", ["nosuchmod"]),
    (("--run-config", 'partition="dirichet"'), "partition", ["dirichet", *PARTITIONERS]),
    # secure aggregation (docs/secure-aggregation.md): the masked words are the compression
    (("--codec", "int8", "--run-config", "secure-aggregation=true"), "codec",
     ["int8", "secure aggregation", "none"]),
]


@pytest.mark.parametrize(("args", "key", "words"), COORDINATOR_CASES)
def test_coordinator_refuses_a_bad_run_config_and_stores_nothing(
    tmp_path: Path, args: tuple[str, ...], key: str, words: list[str]
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    done, loaded = _fedge(tmp_path, "coordinator", "run", "--state", str(state), "--port", "0",
                          "--insecure", *args)
    line = _one_line_refusal(done)
    assert key in line and all(w in line for w in words), line
    assert list(state.iterdir()) == []  # no database (so no run row), no TLS files, nothing
    # refused before the coordinator's code loaded (Flower's parser reads --run-config)
    heavy = {"torch", "ray"} | (set() if "--run-config" in args else {"flwr", "grpc"})
    assert not heavy & set(loaded), loaded


SIMULATE_CASES = [
    (("--partition", "dirichet"), "--partition", ["dirichet", *PARTITIONERS]),
    (("--strategy", "fedavgg"), "--strategy", ["fedavgg", *STRATEGIES]),
    (("--task", "nosuchmod:task"), "--task", ["nosuchmod"]),
    (("--codec", "none,int9"), "--codec", ["int9", *VALUE_CODECS]),
    (("--alpha", "0"), "--alpha", ["> 0"]),
    (("--dataset", "cifar"), "--dataset", ["cifar", "digits", "fashion-mnist"]),
    (("--secure-aggregation", "--codec", "none,int8"), "--codec", ["int8", "--codec none"]),
    (("--secure-aggregation", "--downlink", "int8"), "--downlink", ["int8", "--downlink none"]),
    (("--secure-aggregation", "--strategy", "krum"), "--strategy", ["krum", "fedavg"]),
    (("--secagg-bits", "6"), "--secagg-bits", ["6", "8, 4"]),
    (("--secure-aggregation", "--secagg-clip", "0"), "--secagg-clip", ["> 0"]),
    (("--secure-aggregation", "--dp-noise", "1", "--dp-clip", "1", "--dp-adaptive"),
     "--dp-adaptive", ["secure aggregation"]),
]


@pytest.mark.parametrize(("args", "key", "words"), SIMULATE_CASES)
def test_simulate_refuses_a_bad_run_config_before_ray(
    tmp_path: Path, args: tuple[str, ...], key: str, words: list[str]
) -> None:
    out = tmp_path / "out"
    done, loaded = _fedge(tmp_path, "simulate", "--out", str(out), *args)
    line = _one_line_refusal(done)
    assert key in line and all(w in line for w in words), line
    assert not out.exists()
    assert not {"torch", "ray", "flwr"} & set(loaded), loaded


def test_missing_data_is_refused_naming_data_dir(tmp_path: Path) -> None:
    done, _ = _fedge(tmp_path, "simulate", "--dataset", "fashion-mnist",
                     "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    line = _one_line_refusal(done)
    assert "--data-dir" in line and "nowhere" in line
    assert not (tmp_path / "out").exists()


def test_run_config_reads_flowers_syntax(tmp_path: Path) -> None:
    assert parse_run_config_args(["lr=0.1 local-epochs=2"]) == {"lr": 0.1, "local-epochs": 2}
    assert parse_run_config_args(["lr=0.1", 'codec="int4" seed=3 fast=true']) == {
        "lr": 0.1, "codec": "int4", "seed": 3, "fast": True}
    toml = tmp_path / "run.toml"
    toml.write_text('lr = 0.05\ncodec = "int8"\n[extra]\nmu = 1\n')
    assert parse_run_config_args([str(toml)]) == {"lr": 0.05, "codec": "int8", "extra.mu": 1}
    for bad, words in ((["lr"], "'lr' is not KEY=VALUE"), (["codec=int8"], "invalid format"),
                       (["x=[1,2]"], "key x"), ([str(tmp_path / "no.toml")], "cannot read")):
        with pytest.raises(RunConfigError, match="--run-config") as refused:
            parse_run_config_args(bad)
        assert words in str(refused.value) and "\n" not in str(refused.value)


def test_run_config_pairs_reach_the_check_one_key_each(tmp_path: Path) -> None:
    """`'lr=0.1 local-epochs=0'` is two keys, so the bad second one is the one named."""
    done, _ = _fedge(tmp_path, "coordinator", "run", "--state", str(tmp_path / "s"),
                     "--run-config", "lr=0.1 local-epochs=0")
    line = _one_line_refusal(done)
    assert "run config 'local-epochs'" in line and ">= 1" in line
    assert not (tmp_path / "s").exists()


GOOD = {"task": "digits", "strategy": "fedavg", "codec": "int8", "num-rounds": 2}


@pytest.mark.parametrize(("change", "key", "words"), [
    ({"strategy": "FedAvgg"}, "strategy", list(STRATEGIES)),
    ({"strategy": 3}, "strategy", ["3"]),
    ({"partition": "shard"}, "partition", list(PARTITIONERS)),
    ({"codec": "topk=0.01"}, "codec", ["+int8", *VALUE_CODECS]),
    ({"downlink-codec": "int9"}, "downlink-codec", ["int9"]),
    ({"downlink-codec": "fp16", "downlink-first-contact": "half"}, "downlink-first-contact",
     ["full", "compressed"]),
    ({"downlink-codec": "int8", "downlink-keep": 0}, "downlink-keep", [">= 1"]),
    ({"num-rounds": 0}, "num-rounds", [">= 1"]),
    ({"num-rounds": 2.5}, "num-rounds", ["whole number"]),
    ({"fraction-train": 1.5}, "fraction-train", ["<= 1"]),
    ({"lr": 0}, "lr", ["> 0"]),
    ({"lr": "fast"}, "lr", ["'fast'", "a number"]),
    ({"trim-beta": 0.5}, "trim-beta", ["< 0.5"]),
    ({"seed": -1}, "seed", [">= 0"]),
    ({"round-timeout": True}, "round-timeout", ["True"]),
    ({"initial-model": "/nonexistent/model.pb"}, "initial-model", ["not a file"]),
    ({"task": "digts"}, "task", sorted(BUILTIN_TASKS)),
    ({"task": "json:nothing_here"}, "task", ["nothing_here"]),
    ({"task": ""}, "task", ["module:object"]),
])
def test_each_bad_key_is_named_with_its_choices(change: dict, key: str, words: list) -> None:
    with pytest.raises(RunConfigError) as refused:
        validate_run_config({**GOOD, **change})
    assert refused.value.key == key
    message = str(refused.value)
    assert message.startswith(f"run config {key!r}: ") and "\n" not in message
    assert all(w in message for w in words), message


def test_a_good_config_passes_and_loads_a_client_share() -> None:
    validate_run_config(GOOD)
    validate_run_config({**GOOD, "partition": "dirichlet", "alpha": 0.3, "downlink-codec": "int8",
                         "lr": "0.1", "local-epochs": 2}, num_partitions=5)
    with pytest.raises(RunConfigError, match="cannot load its data"):  # 11 classes of 10
        validate_run_config({**GOOD, "partition": "shards", "classes-per-client": 11},
                            num_partitions=5)


def test_a_users_task_that_raises_is_a_refusal(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "broken_task_mod.py").write_text(textwrap.dedent("""
        from fedge.common.task import Task
        def _load(pid, n, config):
            raise RuntimeError("bucket not mounted")
        task = Task(name="broken", model_fn=lambda: None, partition_fn=_load)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RunConfigError, match="bucket not mounted") as refused:
        validate_run_config({**GOOD, "task": "broken_task_mod:task"}, num_partitions=2)
    assert refused.value.key == "task"


def test_the_server_app_checks_at_start() -> None:
    """Flower's runtimes hand the ServerApp a run config of their own: it is checked too."""
    server_app = make_server_app({"task": "digits", "min-train-nodes": 1})
    delivered = []

    def client(message, context):
        delivered.append(message)
        return message

    grid = InProcessGrid(client, 1)
    with pytest.raises(RunConfigError, match=r"'partition'.*iid, dirichlet, shards"):
        run_server_app_inprocess(server_app, grid, run_config={"partition": "dirichet"})
    assert delivered == []  # refused before round 1 sent anything


def _command(*path: str) -> click.Command:
    command: click.Command = typer.main.get_command(app)
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


def _option(command: click.Command, flag: str) -> click.Option:
    (option,) = [p for p in command.params if isinstance(p, click.Option) and flag in p.opts]
    return option


def test_fixed_lists_are_choices_in_help_and_completion() -> None:
    for path, flag, choices in (
        (("simulate",), "--strategy", STRATEGIES),
        (("simulate",), "--partition", PARTITIONERS),
        (("simulate",), "--dataset", ("digits", "fashion-mnist")),
        (("coordinator", "run"), "--strategy", STRATEGIES),
        (("export",), "--format", ("fp32", "fp16", "int8", "int4", "onnx", "onnx-int8")),
    ):
        command = _command(*path)
        option = _option(command, flag)
        assert isinstance(option.type, click.Choice)
        assert tuple(option.type.choices) == tuple(choices)
        ctx = click.Context(command)
        completed = [item.value for item in option.type.shell_complete(ctx, option, "")]
        assert completed == list(choices)
        assert "|".join(choices) in " ".join(option.get_help_record(ctx)[0].split())


def test_one_log_level_option_on_every_long_running_command() -> None:
    seen = []
    for path in (("coordinator", "run"), ("client", "run"), ("simulate",), ("demo",)):
        option = _option(_command(*path), "--log-level")
        assert option.opts == ["--log-level"] and isinstance(option.type, click.Choice)
        seen.append(tuple(option.type.choices))
    assert seen[0] == ("debug", "info", "warning", "error") and len(set(seen)) == 1
    assert not any("--verbose" in p.opts for p in _command("coordinator", "run").params)


def test_version(tmp_path: Path) -> None:
    done, loaded = _fedge(tmp_path, "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"fedge {version('fedge')}"
    assert not {"torch", "flwr"} & set(loaded)


SHAPELESS_TASK = '''
"""A task whose data does not fit its model: every client's training raises."""
import numpy as np

from fedge.common.models import DigitsMLP
from fedge.common.task import ClientData, Task


def _load(partition_id, num_partitions, config):
    x = np.zeros((8, 1, 3, 3), dtype=np.float32)  # the MLP wants 8x8 images
    y = np.zeros(8, dtype=np.int64)
    return ClientData(x, y, x[:2], y[:2])


task = Task(name="shapeless", model_fn=lambda: DigitsMLP(seed=0), partition_fn=_load)
'''


def test_a_simulation_that_aggregated_nothing_fails_with_the_first_client_error(
    tmp_path: Path,
) -> None:
    """Through Ray: the run ends, the report is written, and the exit says why in one line."""
    (tmp_path / "shapeless_task.py").write_text(SHAPELESS_TASK)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", "from fedge.cli import app; app()", "simulate",
         "--task", "shapeless_task:task", "--clients", "2", "--rounds", "1", "--out", str(out)],
        env={**ENV, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=280,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("Error:")]
    assert line.startswith("Error: codec none: no round of 1 aggregated anything;"), line
    assert line.endswith("first client error: RuntimeError: mat1 and mat2 shapes cannot be "
                         "multiplied (8x9 and 64x64)"), line
    (run,) = json.loads((out / "report.json").read_text())["runs"]
    assert run["rounds"][0]["accepted"] == 0 and run["rounds"][0]["rejected"] == 2
    assert run["first_client_error"] in line


def test_the_demo_checks_its_run_config_before_starting_anything(tmp_path: Path, capsys) -> None:
    from fedge.demo import run_demo

    assert run_demo(tmp_path / "demo", rounds=0) == 2
    assert not (tmp_path / "demo").exists()  # no folder, no coordinator, no device started
    err = capsys.readouterr().err.strip()
    assert err == "fedge demo: run config 'num-rounds': 0 is out of range: give a whole number >= 1"
