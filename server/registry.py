"""The model registry: every global model version, its lineage and evaluation, and `current`.

Versions are the model store's content hashes; their lineage rows (run, round,
parent, created) are written by `Store.complete_round`/`create_run`. The
registry adds, through the store's model tables (server/store/model_versions.py):

- central evaluation per version (`set_evaluation`, or `evaluate` on the
  task's held-out set) and a status: `candidate` (never promoted), `rejected`
  (the continuous-mode gate refused it, reason kept), `retired` (was current
  once), `current`;
- a promotion history used as a stack: `promote` pushes, `rollback` marks the
  top as rolled back, so `current` is the newest promotion not rolled back and
  repeated rollbacks walk back through earlier currents. Promotions commit
  with `synchronous=FULL`, so `current` survives a crash or a power cut.

Devices and the HTTP endpoint serve `current()`; exports of any version are
built here (`export`) and cached, bounded by bytes. The registry holds no SQL:
it resolves references, checks files and decides; the store keeps the rows.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedge.common.errors import ReasonError, UpdateRejected
from fedge.common.export import EXPORT_FORMATS, export_model
from fedge.common.snapshot import parse_snapshot, snapshot_to_arrays
from fedge.server.model_store import ModelStore, ModelStoreError
from fedge.server.store import ModelVersion, Promotion, Store, StoreError

if TYPE_CHECKING:  # resolving a task imports torch: only when a version is exported
    from fedge.common.task_base import Task

DEFAULT_EXPORT_CACHE_BYTES = 64 << 20
MIN_PREFIX = 4
_HEX = re.compile(r"[0-9a-f]+")


class RegistryError(ReasonError):
    """A registry call cannot be honoured; `reason` is a stable code.

    Reasons: `not_found`, `ambiguous`, `bad_ref`, `no_current`, `no_previous`,
    `not_evaluated`, `bad_format`, `bad_task`, `missing_file`, `corrupt`,
    `export_failed`.
    """

    what = "model registry"


@dataclass(frozen=True)
class GateDecision:
    """What `Registry.gate` decided for a version, and why."""

    version: str
    promoted: bool
    reason: str
    previous: str | None
    metric: str
    value: float | None
    baseline: float | None


class Registry:
    """Model versions over a `Store` (lineage, status, evaluation) and a `ModelStore` (files)."""

    def __init__(
        self,
        store: Store,
        models: ModelStore,
        *,
        export_cache_bytes: int = DEFAULT_EXPORT_CACHE_BYTES,
    ) -> None:
        self.store = store
        self.models = models
        self._cache: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = export_cache_bytes
        self._cache_lock = threading.Lock()
        self._task_names: dict[str, str] = {}  # a version's task never changes

    # ------------------------------------------------------------ reading

    def current(self) -> str | None:
        """The version devices and the endpoint serve, or None before any promotion."""
        return self.store.current_model()

    def resolve(self, ref: str) -> str:
        """A full version from `current`, a full hash, or a unique prefix of 4+ hex digits."""
        text = str(ref).strip().lower()
        if text == "current":
            version = self.current()
            if version is None:
                raise RegistryError("no_current", "no version has been promoted yet")
            return version
        if not (MIN_PREFIX <= len(text) <= 64 and _HEX.fullmatch(text)):
            raise RegistryError(
                "bad_ref", f"{str(ref)[:80]!r}: give 'current' or {MIN_PREFIX}-64 hex digits"
            )
        versions = self.store.model_versions_starting(text, limit=2)
        if not versions:
            raise RegistryError("not_found", f"no model version {text}")
        if len(versions) > 1:
            raise RegistryError("ambiguous", f"{text} matches several versions; give more digits")
        return versions[0]

    def get(self, ref: str) -> ModelVersion:
        """The record of one version (`current`, full hash or unique prefix)."""
        version = self.resolve(ref)
        model = self.store.get_model(version)
        if model is None:
            raise RegistryError("not_found", f"no model version {version}")
        return model

    def list_models(self, run_id: int | None = None) -> list[ModelVersion]:
        """Every version (of one run if given), oldest first."""
        return self.store.list_models(run_id)

    def lineage(self, ref: str, *, limit: int = 1000) -> list[ModelVersion]:
        """The version, its parent, the parent's parent ... as far as the table knows."""
        out: list[ModelVersion] = []
        seen: set[str] = set()
        version: str | None = self.resolve(ref)
        while version and version not in seen and len(out) < limit:
            seen.add(version)
            model = self.store.get_model(version)
            if model is None:
                break
            out.append(model)
            version = model.parent_version
        return out

    def history(self) -> list[Promotion]:
        """Every promotion, oldest first, with its rollback if any."""
        return self.store.list_promotions()

    # ------------------------------------------------------------ writing

    def set_evaluation(self, ref: str, evaluation: Mapping[str, float]) -> None:
        """Record a version's central evaluation (finite numbers; merged into what is there)."""
        version = self.resolve(ref)
        self.store.set_model_evaluation(version, _finite(evaluation))
        self._forget_exports(version)

    def evaluate(
        self, ref: str, *, config: Mapping[str, Any] | None = None, batch_size: int = 256
    ) -> dict[str, float]:
        """Evaluate a version on its task's central test set, record and return the figures."""
        from fedge.common.arrays import arrays_to_model
        from fedge.common.training import evaluate

        version = self.resolve(ref)
        task = self.task(version)
        cfg = dict(config) if config is not None else self._run_config(version)
        test = task.central_test(cfg)
        if test is None:
            raise RegistryError("bad_task", f"task {task.name!r} has no central test set")
        arrays, _ = self.snapshot(version)
        model = arrays_to_model(task.make_model(), arrays)
        loss, acc = evaluate(model, test[0], test[1], batch_size=batch_size)
        figures = {"accuracy": acc, "loss": loss, "num_examples": float(len(test[1]))}
        self.set_evaluation(version, figures)
        return figures

    def promote(self, ref: str, *, reason: str = "") -> ModelVersion:
        """Make a version current (durably); promoting the current version changes nothing."""
        version = self.resolve(ref)
        self._verify_file(version)
        self.store.promote_model(version, reason=reason)
        return self.get(version)

    def rollback(self, *, reason: str = "") -> ModelVersion:
        """Undo the latest promotion: the current before it becomes current again."""

        def file_present(target: str) -> None:
            try:
                self.models.verify(target)
            except ModelStoreError as e:
                raise RegistryError("missing_file", f"cannot roll back to {target}: {e}") from None

        try:
            target = self.store.roll_back_promotion(reason=reason, check_target=file_present)
        except StoreError as e:
            raise RegistryError(e.reason, e.detail) from None
        return self.get(target)

    def reject(self, ref: str, reason: str) -> ModelVersion:
        """Mark a version rejected (it stays a candidate that is never served), with why."""
        version = self.resolve(ref)
        if version == self.current():
            raise RegistryError("bad_ref", f"{version} is current: roll back first")
        self.store.reject_model(version, reason)
        return self.get(version)

    def gate(
        self,
        ref: str,
        *,
        margin: float,
        metric: str = "accuracy",
        higher_is_better: bool = True,
    ) -> GateDecision:
        """Promote a version unless it is worse than `current` by more than `margin` on `metric`.

        The continuous-mode rule: the version must carry `metric` in its
        evaluation; with no current (or a current never evaluated) it is
        promoted. Otherwise it is rejected with the reason recorded.
        """
        version = self.resolve(ref)
        value = self.get(version).evaluation.get(metric)
        if value is None:
            raise RegistryError("not_evaluated", f"{version[:12]} has no {metric!r} evaluation")
        previous = self.current()
        baseline = None if previous is None else self.get(previous).evaluation.get(metric)
        if previous == version:
            return GateDecision(version, True, "already current", previous, metric, value, value)
        if baseline is None:
            why = "first version" if previous is None else f"current {previous[:12]} unevaluated"
            reason = f"{metric} {value:.4f}; {why}"
            self.promote(version, reason=reason)
            return GateDecision(version, True, reason, previous, metric, value, None)
        worse_by = (baseline - value) if higher_is_better else (value - baseline)
        assert previous is not None
        if worse_by > margin:
            reason = (
                f"{metric} {value:.4f} is {worse_by:.4f} worse than current "
                f"{previous[:12]}'s {baseline:.4f} (margin {margin:g})"
            )
            self.reject(version, reason)
            return GateDecision(version, False, reason, previous, metric, value, baseline)
        reason = f"{metric} {value:.4f} vs current {baseline:.4f} (margin {margin:g})"
        self.promote(version, reason=reason)
        return GateDecision(version, True, reason, previous, metric, value, baseline)

    # ------------------------------------------------------------ files and exports

    def snapshot(self, ref: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """A version's fp32 arrays and snapshot metadata, verified against its hash."""
        version = self.resolve(ref)
        try:
            data = self.models.get(version)
            return snapshot_to_arrays(data)
        except ModelStoreError as e:
            reason = "missing_file" if e.reason == "not_found" else "corrupt"
            raise RegistryError(reason, str(e)) from None
        except UpdateRejected as e:
            raise RegistryError("corrupt", f"{version}: {e}") from None

    def task_name(self, ref: str) -> str:
        """The task a version was trained for: its snapshot's `task`, else its run's config."""
        version = self.resolve(ref)
        name = self._task_names.get(version)
        if name is None:
            try:
                meta = parse_snapshot(self.models.get(version)).metadata
            except ModelStoreError as e:
                reason = "missing_file" if e.reason == "not_found" else "corrupt"
                raise RegistryError(reason, str(e)) from None
            except UpdateRejected as e:
                raise RegistryError("corrupt", f"{version}: {e}") from None
            name = meta.get("task") or str(self._run_config(version).get("task", ""))
            if not name:
                raise RegistryError("bad_task", f"{version[:12]} names no task")
            self._task_names[version] = name
        return name

    def task(self, ref: str) -> Task:
        """The resolved `Task` of a version (the coordinator trusts its own run's task)."""
        from fedge.common.task import TaskError, resolve_task

        name = self.task_name(ref)
        try:
            return resolve_task(name)
        except TaskError as e:
            raise RegistryError("bad_task", str(e)) from None

    def export(self, ref: str, fmt: str = "fp32") -> bytes:
        """The export file of a version in `fmt` (fp32, fp16, int8, int4), cached."""
        if fmt not in EXPORT_FORMATS:
            raise RegistryError("bad_format", f"{fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
        record = self.get(ref)
        # the evaluation is in the file: a new one must not be served from an old entry
        key = (record.version, fmt, json.dumps(record.evaluation, sort_keys=True))
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        arrays, _ = self.snapshot(record.version)
        task = self.task(record.version)
        if not task.input_shape:
            raise RegistryError("bad_task", f"task {task.name!r} declares no input_shape")
        try:
            data = self._export(record, arrays, task, fmt)
        except ValueError as e:
            raise RegistryError("export_failed", f"{record.version[:12]} as {fmt}: {e}") from None
        self._remember(key, data)
        return data

    def _export(
        self, record: ModelVersion, arrays: Mapping[str, np.ndarray], task: Task, fmt: str
    ) -> bytes:
        return export_model(
            arrays,
            fmt=fmt,
            task=self.task_name(record.version),
            input_shape=task.input_shape,
            labels=task.labels,
            source_version=record.version,
            lineage={
                "run_id": record.run_id,
                "round": record.round,
                "parent_version": record.parent_version,
                "created": record.created,
            },
            evaluation=record.evaluation,
        )

    # ------------------------------------------------------------ plumbing

    def _run_config(self, version: str) -> dict[str, Any]:
        model = self.store.get_model(version)
        run = None if model is None or model.run_id is None else self.store.get_run(model.run_id)
        return run.config if run else {}

    def _verify_file(self, version: str) -> None:
        try:
            self.models.verify(version)
        except ModelStoreError as e:
            reason = "missing_file" if e.reason == "not_found" else "corrupt"
            raise RegistryError(reason, str(e)) from None

    def _remember(self, key: tuple[str, str, str], data: bytes) -> None:
        if len(data) > self._cache_limit:
            return
        with self._cache_lock:
            if key in self._cache:
                return
            self._cache[key] = data
            self._cache_bytes += len(data)
            while self._cache_bytes > self._cache_limit:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= len(old)

    def _forget_exports(self, version: str) -> None:
        with self._cache_lock:
            for key in [k for k in self._cache if k[0] == version]:
                self._cache_bytes -= len(self._cache.pop(key))


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        if v is None or isinstance(v, bool):
            continue
        f = float(v)
        if math.isfinite(f):
            out[str(k)] = f
    return out
