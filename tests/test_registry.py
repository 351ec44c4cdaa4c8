"""The model registry on a real SQLite store and model store, and `fedge coordinator models`."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedge.common.arrays import model_to_arrays
from fedge.common.export import parse_model_file
from fedge.common.models import DigitsMLP
from fedge.common.snapshot import arrays_to_snapshot
from fedge.server import store as store_mod
from fedge.server.model_store import ModelStore
from fedge.server.registry import Registry, RegistryError
from fedge.server.round_metrics import RoundMetrics
from fedge.server.store import ModelStatus, Store

RUN_ID = (1 << 64) - 3  # Flower run ids are unsigned 64-bit


@dataclass
class State:
    folder: Path
    store: Store
    models: ModelStore
    registry: Registry
    versions: list[str]  # round 0, 1, 2, ...


def make_state(folder: Path, rounds: int = 3, task: str = "digits") -> State:
    """A state folder as the coordinator leaves it: a run, its rounds, their model files."""
    store = Store.open(folder / "fedge.db")
    models = ModelStore(folder / "models")
    rng = np.random.default_rng(0)
    arrays = model_to_arrays(DigitsMLP(seed=0))
    versions = []
    for rnd in range(rounds + 1):
        if rnd:
            arrays = {
                k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype)
                for k, v in arrays.items()
            }
        meta = {"task": task, "run-id": str(RUN_ID), "round": str(rnd)}
        snap = arrays_to_snapshot(arrays, meta)
        versions.append(models.put(snap.SerializeToString(deterministic=True)))
        if rnd == 0:
            store.create_run(
                RUN_ID, {"task": task, "num-rounds": rounds}, model_version=versions[0]
            )
        else:
            store.open_round(RUN_ID, rnd)
            store.close_round(RUN_ID, rnd)
            store.complete_round(
                RUN_ID,
                rnd,
                model_version=versions[-1],
                metrics=RoundMetrics(round=rnd, seconds=1.0),
            )
    return State(folder, store, models, Registry(store, models), versions)


@pytest.fixture
def state(tmp_path: Path) -> State:
    s = make_state(tmp_path / "state")
    yield s
    s.store.close()


def test_lineage_and_statuses(state: State) -> None:
    reg, v = state.registry, state.versions
    records = reg.list_models()
    assert [r.version for r in records] == v
    assert all(r.status == ModelStatus.CANDIDATE for r in records)
    assert [r.round for r in records] == [0, 1, 2, 3]
    assert records[0].parent_version is None and records[2].parent_version == v[1]
    assert all(r.run_id == RUN_ID and r.created > 0 for r in records)
    assert records[1].created_by == "round"
    assert [r.version for r in reg.lineage(v[3])] == [v[3], v[2], v[1], v[0]]
    assert reg.current() is None
    with pytest.raises(RegistryError, match="no_current"):
        reg.resolve("current")


def test_resolve_prefixes(state: State) -> None:
    reg, v = state.registry, state.versions
    assert reg.resolve(v[1][:8]) == v[1]
    assert reg.resolve(v[1].upper()) == v[1]
    for bad in ("abc", "xyz123", "", "../etc", v[1] + "0"):
        with pytest.raises(RegistryError, match="bad_ref"):
            reg.resolve(bad)
    with pytest.raises(RegistryError, match="not_found"):
        reg.resolve("f" * 64 if not v[0].startswith("ffff") else "0" * 64)


def test_promote_rollback_as_a_stack_and_durable(state: State) -> None:
    reg, v = state.registry, state.versions
    with pytest.raises(RegistryError, match="no_current"):
        reg.rollback()
    reg.promote(v[1], reason="round 1")
    with pytest.raises(RegistryError, match="no_previous"):
        reg.rollback()
    reg.promote(v[2])
    reg.promote(v[2])  # promoting the current one again changes nothing
    reg.promote(v[3])
    assert reg.current() == v[3]
    statuses = {r.version: r.status for r in reg.list_models()}
    assert statuses == {
        v[0]: ModelStatus.CANDIDATE,
        v[1]: ModelStatus.RETIRED,
        v[2]: ModelStatus.RETIRED,
        v[3]: ModelStatus.CURRENT,
    }
    assert reg.rollback(reason="bad").version == v[2]
    assert reg.rollback().version == v[1]  # walks back, not forth
    assert len(reg.history()) == 3 and reg.history()[2].rollback_reason == "bad"
    # current survives closing and reopening the store (a coordinator restart)
    state.store.close()
    store = Store.open(state.folder / "fedge.db")
    try:
        assert Registry(store, state.models).current() == v[1]
    finally:
        state.store = store


def test_gate_promotes_unless_worse_by_more_than_the_margin(state: State) -> None:
    reg, v = state.registry, state.versions
    with pytest.raises(RegistryError, match="not_evaluated"):
        reg.gate(v[0], margin=0.01)
    reg.set_evaluation(v[0], {"accuracy": 0.80, "loss": 0.5})
    first = reg.gate(v[0], margin=0.01)
    assert first.promoted and "first version" in first.reason
    reg.set_evaluation(v[1], {"accuracy": 0.795})  # worse, within the margin
    assert reg.gate(v[1], margin=0.01).promoted
    reg.set_evaluation(v[2], {"accuracy": 0.70})  # diverged
    refused = reg.gate(v[2], margin=0.01)
    assert not refused.promoted and refused.previous == v[1]
    assert reg.current() == v[1]
    record = reg.get(v[2])
    assert record.status == ModelStatus.REJECTED
    assert "0.0950 worse" in (record.status_reason or "")
    reg.set_evaluation(v[3], {"loss": 0.4})
    assert reg.gate(v[3], margin=0.0, metric="loss", higher_is_better=False).promoted
    # an operator may still promote a rejected version by hand
    assert reg.promote(v[2], reason="override").status == ModelStatus.CURRENT
    with pytest.raises(RegistryError, match="is current"):
        reg.reject(v[2], "no")


def test_evaluation_is_merged_and_finite(state: State) -> None:
    reg, v = state.registry, state.versions
    reg.set_evaluation(v[1], {"accuracy": 0.5, "loss": float("nan"), "n": None})
    reg.set_evaluation(v[1], {"loss": 1.25})
    assert reg.get(v[1]).evaluation == {"accuracy": 0.5, "loss": 1.25}


def test_central_evaluation_on_the_task_test_set(state: State) -> None:
    figures = state.registry.evaluate(state.versions[2])
    assert 0.0 <= figures["accuracy"] <= 1.0 and figures["num_examples"] > 300
    assert state.registry.get(state.versions[2]).evaluation["accuracy"] == figures["accuracy"]


def test_export_carries_lineage_and_is_cached(state: State) -> None:
    reg, v = state.registry, state.versions
    reg.set_evaluation(v[2], {"accuracy": 0.9})
    data = reg.export(v[2], "int8")
    assert reg.export(v[2][:10], "int8") is data  # cached
    mf = parse_model_file(data)
    assert mf.format == "int8" and mf.task == "digits" and mf.input_shape == (1, 8, 8)
    assert mf.source_version == v[2] and mf.evaluation == {"accuracy": 0.9}
    assert mf.lineage["round"] == 2 and mf.lineage["parent_version"] == v[1]
    assert mf.lineage["run_id"] == RUN_ID
    reg.set_evaluation(v[2], {"accuracy": 0.95})  # a new evaluation invalidates the cache
    assert parse_model_file(reg.export(v[2], "int8")).evaluation == {"accuracy": 0.95}
    with pytest.raises(RegistryError, match="bad_format"):
        reg.export(v[2], "int3")
    arrays, _ = reg.snapshot(v[2])
    np.testing.assert_allclose(
        parse_model_file(reg.export(v[2], "fp32")).arrays["fc1.weight"], arrays["fc1.weight"]
    )


def test_damaged_model_file_is_reported(state: State) -> None:
    reg, v = state.registry, state.versions
    path = state.models.path(v[1])
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(RegistryError, match="corrupt"):
        reg.export(v[1], "fp32")
    with pytest.raises(RegistryError, match="corrupt"):
        reg.promote(v[1])
    reg.promote(v[2])
    path.unlink()
    with pytest.raises(RegistryError, match="missing_file"):
        reg.snapshot(v[1])


def test_migration_upgrades_an_existing_database(tmp_path: Path) -> None:
    """A database from before the registry gets its columns; old rows default to candidate."""
    path = tmp_path / "old.db"
    raw = sqlite3.connect(path)
    for stmts in store_mod.MIGRATIONS[:-1]:
        for stmt in stmts:
            raw.execute(stmt)
    raw.execute(f"PRAGMA user_version={len(store_mod.MIGRATIONS) - 1}")
    raw.execute(
        "INSERT INTO models (version, run_id, round, parent_version, created)"
        " VALUES (?, NULL, 0, NULL, 1.0)",
        ("a" * 64,),
    )
    raw.commit()
    raw.close()
    store = Store.open(path)
    try:
        reg = Registry(store, ModelStore(tmp_path / "models"))
        record = reg.get("a" * 64)
        assert record.status == ModelStatus.CANDIDATE and record.evaluation == {}
        assert reg.history() == []
    finally:
        store.close()


# ---------------------------------------------------------------- the CLI

runner = CliRunner()


def _cli(*args: str):
    from fedge.cli import app

    return runner.invoke(app, list(args))


def test_models_cli(state: State, tmp_path: Path) -> None:
    folder, v = str(state.folder), state.versions
    listed = _cli("coordinator", "models", "list", "--state", folder, "--json")
    assert listed.exit_code == 0, listed.output
    assert [m["version"] for m in json.loads(listed.stdout)["models"]] == v
    assert _cli("coordinator", "models", "list", "--state", folder).exit_code == 0

    promoted = _cli("coordinator", "models", "promote", v[2][:12], "--state", folder)
    assert promoted.exit_code == 0 and v[2] in promoted.stdout
    _cli("coordinator", "models", "promote", v[3][:12], "--state", folder, "--reason", "r3")
    shown = _cli("coordinator", "models", "show", "current", "--state", folder, "--json")
    doc = json.loads(shown.stdout)
    assert doc["version"] == v[3] and doc["status"] == "current" and doc["task"] == "digits"
    assert doc["lineage"] == [v[3], v[2], v[1], v[0]]
    assert doc["promotions"][0]["reason"] == "r3"
    assert _cli("coordinator", "models", "show", v[1][:8], "--state", folder).exit_code == 0

    back = _cli("coordinator", "models", "rollback", "--state", folder)
    assert back.exit_code == 0 and v[2] in back.stdout

    out = tmp_path / "exports" / "m.pb"
    exported = _cli(
        "export", "--version", "current", "--format", "int4", "--out", str(out), "--state", folder
    )
    assert exported.exit_code == 0, exported.output
    mf = parse_model_file(out.read_bytes())
    assert mf.format == "int4" and mf.source_version == v[2]

    for args, words in (
        (("coordinator", "models", "show", "zzzz"), "bad_ref"),
        (("coordinator", "models", "promote", "f" * 64), "not_found"),
        (("export", "--format", "int3", "--out", str(out)), "--format"),
        (("coordinator", "models", "list", "--state", str(tmp_path / "nothing")), "no coordinator"),
    ):
        if "--state" not in args:
            args = (*args, "--state", folder)
        result = _cli(*args)
        # a --format outside its choices is a usage error (2); the others fail at work (1)
        assert result.exit_code == (2 if "--format" in args else 1), (args, result.output)
        assert words in result.stderr and "Traceback" not in result.output


def test_rollback_to_a_missing_file_changes_nothing(state: State) -> None:
    reg, v = state.registry, state.versions
    reg.promote(v[1])
    reg.promote(v[2])
    state.models.path(v[1]).unlink()
    with pytest.raises(RegistryError, match="missing_file"):
        reg.rollback(reason="try")
    assert reg.current() == v[2]
    assert [p.rolled_back for p in reg.history()] == [None, None]
