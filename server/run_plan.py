"""Which run a coordinator start serves, decided before anything is stored.

A start either resumes the run an earlier process left `running` (a crash,
`kill -9`, SIGTERM) or begins a new one. The decision is made by reading
the state folder only; the plan is written (`RunPlan.commit`) once the
coordinator is serving, so a start that fails (a port in use, a refusal)
leaves no run behind, and a corrected rerun does not resume a run it never
meant to start.

A resume continues with the stored run's config. Flags this command sets
explicitly must agree with it: a flag that would otherwise lose silently
(`--codec int4` against a stored int8 run) is refused in one line that lists
the differences and the two ways on, `--new-run` or the same command without
the differing flags.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.common.chunking import sha256_hex
from fedge.common.errors import ReasonError
from fedge.server.model_store import ModelStore
from fedge.server.store import RunStatus, Store

_MISSING = object()

SERVER_APP_KEY = "server-app"
"""The run-config key of a run of a user's own ServerApp (`--server-app module:app`)."""


class StartRefused(ReasonError):
    """The coordinator will not start; `str(e)` is the one line the user reads (exit 2).

    `reason` is a short stable code ("run_flags_differ", "port_in_use", ...),
    `detail` the line itself.
    """

    what = ""


@dataclass(frozen=True)
class RunPlan:
    """The run this start serves; nothing of it is stored until `commit`."""

    run_id: int
    config: dict[str, Any]
    first_round: int  # the next round to run (current_round + 1)
    model_version: str  # the global model the next round starts from
    resumed_after: int | None  # the last completed round of a resumed run; None: a new run
    initial_snapshot: bytes = b""  # a new run: its round-0 model, stored by `commit`
    stop_runs: tuple[int, ...] = ()  # `--new-run`: runs left running, marked stopped by `commit`

    def commit(self, store: Store, models: ModelStore) -> None:
        """Store the plan: old runs stopped, a new run's initial model and row written."""
        for run_id in self.stop_runs:
            store.set_run_status(run_id, RunStatus.STOPPED)
        if self.resumed_after is None:
            version = models.put(self.initial_snapshot)
            store.create_run(self.run_id, self.config, model_version=version)

    def describe(self) -> str:
        """What the coordinator prints about its run."""
        if self.resumed_after is None:
            return f"run {self.run_id}: new, {_describe(self.config)}"
        return (
            f"run {self.run_id}: resuming after round {self.resumed_after} "
            f"(model {self.model_version[:12]}), {_describe(self.config)}"
        )


def plan_run(
    store: Store | None,
    models: ModelStore | None,
    run_config: Mapping[str, Any],
    *,
    new_run: bool = False,
    given_flags: Mapping[str, str] | None = None,
    current: str | None = None,
    state_dir: Path | None = None,
) -> RunPlan:
    """Resume the latest running run, or plan a new one; raises StartRefused.

    `store`/`models` are None for a state folder that holds no database yet.
    `given_flags` maps each run-config key this command sets to the flag
    that set it (`{"codec": "--codec"}`): a resume compares exactly those
    with the stored config; None compares every key of `run_config`.
    `current` (continuous mode: the registry's current version) is where a
    resumed run's next round starts, instead of the last candidate.
    """
    running = store.list_runs(RunStatus.RUNNING) if store is not None else []
    if running and not new_run and store is not None and models is not None:
        run = running[-1]
        flags = given_flags if given_flags is not None else {k: k for k in run_config}
        _refuse_differences(run.id, run.config, run_config, flags, state_dir)
        models.verify(run.model_version or "")
        return RunPlan(
            run_id=run.id,
            config=dict(run.config),
            first_round=run.current_round + 1,
            model_version=current or run.model_version or "",
            resumed_after=run.current_round,
        )
    config = dict(run_config)
    app = config.get(SERVER_APP_KEY)
    task = str(config.get("task", "digits"))
    snapshot = app_snapshot(str(app)) if app else initial_snapshot(task)
    return RunPlan(
        run_id=_new_run_id(store),
        config=config,
        first_round=1,
        model_version=sha256_hex(snapshot),
        resumed_after=None,
        initial_snapshot=snapshot,
        stop_runs=tuple(r.id for r in running),
    )


def config_differences(
    stored: Mapping[str, Any], given: Mapping[str, Any], keys: Mapping[str, str]
) -> list[tuple[str, Any, Any]]:
    """(key, stored value, given value) for each of `keys` the configs disagree on.

    A key absent from `stored` shows as `_MISSING`; keys `given` lacks are skipped.
    """
    out = []
    for key in keys:
        have, want = stored.get(key, _MISSING), given.get(key, _MISSING)
        if want is not _MISSING and have != want:
            out.append((key, have, want))
    return out


def _refuse_differences(
    run_id: int,
    stored: Mapping[str, Any],
    given: Mapping[str, Any],
    flags: Mapping[str, str],
    state_dir: Path | None,
) -> None:
    diffs = config_differences(stored, given, flags)
    if not diffs:
        return
    where = f" in {state_dir}" if state_dir is not None else ""
    was = ", ".join(f"{k} {_value(h)}" for k, h, _ in diffs)
    asked = ", ".join(f"{k} {_value(w)}" for k, _, w in diffs)
    drop = ", ".join(dict.fromkeys(flags[k] for k, _, _ in diffs))
    raise StartRefused(
        "run_flags_differ",
        f"run {run_id}{where} was started with {was}; this command asks for {asked}: "
        f"add --new-run to start a new run, or resume run {run_id} with the same command "
        f"without {drop}",
    )


def initial_snapshot(task_ref: str) -> bytes:
    """The snapshot of the task's freshly built model: a new run's round 0."""
    from fedge.common.arrays import model_to_arrays
    from fedge.common.task import resolve_task
    from fedge.server.round_keeper import snapshot_bytes

    return snapshot_bytes(model_to_arrays(resolve_task(task_ref).make_model()), task_ref)


def app_snapshot(server_app: str) -> bytes:
    """A foreign ServerApp's round 0: an empty snapshot naming the app (server/app_rounds.py).
    The app keeps its own model; fedge stores none of it."""
    from fedge.server.round_keeper import snapshot_bytes

    return snapshot_bytes({}, f"server-app {server_app}")


def _new_run_id(store: Store | None) -> int:
    while True:
        run_id = secrets.randbits(63)
        if run_id > 0 and (store is None or store.get_run(run_id) is None):
            return run_id


def _value(v: Any) -> str:
    return "(unset)" if v is _MISSING else str(v)


def _describe(config: Mapping[str, Any]) -> str:
    keys = (SERVER_APP_KEY, "task", "codec", "strategy", "num-rounds", "round-timeout")
    return ", ".join(f"{k} {config[k]}" for k in keys if k in config)
