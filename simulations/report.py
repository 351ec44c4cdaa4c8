"""The simulation report: `report.json` (one run per codec) and `report.png`.

The JSON shape is a contract with users' notebooks and with BENCHMARKS.md:
{"runs": [{"codec", "strategy", "rounds": [{"round", "accuracy", "loss",
"uplink_bytes", "downlink_bytes", "rejected", "seconds"}, ...]}, ...]}.
Under differential privacy each round also has `epsilon` (spent so far, at
`delta`), `dp_clip` and `dp_noise_std`; `privacy_spent` gives a run's last.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROUND_KEYS = ("round", "accuracy", "loss", "uplink_bytes", "downlink_bytes", "rejected", "seconds")


@dataclass
class RunReport:
    """One federated run: its codec, its strategy and its per-round records."""

    codec: str
    strategy: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"codec": self.codec, "strategy": self.strategy, **self.extra, "rounds": self.rounds}


def round_record(values: Mapping[str, Any]) -> dict[str, Any]:
    """Keep the report's round keys (in order) plus any extra keys after them."""
    record = {key: values.get(key) for key in ROUND_KEYS}
    record.update({k: v for k, v in values.items() if k not in record})
    return record


def privacy_spent(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`epsilon` and `delta` after a run's last DP round (None for both without DP)."""
    last = next((r for r in reversed(rounds) if r.get("epsilon") is not None), None)
    return {"epsilon": None if last is None else round(float(last["epsilon"]), 4),
            "delta": None if last is None else last.get("delta")}


def write_report(out_dir: Path, runs: Sequence[RunReport], meta: Mapping[str, Any]) -> Path:
    """Write report.json atomically so a reader never sees half a report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    body = {"meta": dict(meta), "runs": [run.to_json() for run in runs]}
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".report-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(body, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)
    return path


def load_report(path: Path) -> dict[str, Any]:
    """Read a report back (used by tests, plots and BENCHMARKS.md tables)."""
    return json.loads(path.read_text())


def cumulative(values: Sequence[float]) -> list[float]:
    total = 0.0
    out = []
    for value in values:
        total += float(value or 0)
        out.append(total)
    return out


def plot_report(report: Mapping[str, Any], path: Path, title: str = "") -> Path:
    """One line per run: accuracy against round, its difference from `none`, and
    accuracy against cumulative uplink and downlink MB (where compression pays)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.6), constrained_layout=True)
    (by_round, vs_none), (by_up, by_down) = axes
    runs = [run for run in report["runs"] if run["rounds"]]
    base = next((run for run in runs if run["codec"] == "none"), None)
    base_acc = {r["round"]: r["accuracy"] for r in base["rounds"]} if base else {}
    for i, run in enumerate(runs):
        rounds = run["rounds"]
        style = {"marker": "o", "markersize": 2.5, "linewidth": 1.2,
                 "linestyle": "--" if i % 2 else "-", "label": run["codec"]}
        xs = [r["round"] for r in rounds]
        accuracy = [r["accuracy"] for r in rounds]
        by_round.plot(xs, accuracy, **style)
        diff = [(r["round"], 100 * (r["accuracy"] - base_acc[r["round"]])) for r in rounds
                if r["accuracy"] is not None and base_acc.get(r["round"]) is not None]
        if diff:
            vs_none.plot(*zip(*diff, strict=True), **style)
        for axis, key in ((by_up, "uplink_bytes"), (by_down, "downlink_bytes")):
            mb = [b / 1e6 for b in cumulative([r[key] for r in rounds])]
            axis.plot(mb, accuracy, **style)
    by_round.set(xlabel="round", ylabel="centralized accuracy")
    vs_none.set(xlabel="round", ylabel="accuracy minus `none` (points)")
    vs_none.axhline(0, color="black", linewidth=0.8)
    if not base:
        vs_none.text(0.5, 0.5, "no `none` run to compare with", ha="center",
                     transform=vs_none.transAxes)
    by_up.set(xlabel="cumulative uplink (MB, log scale)", ylabel="centralized accuracy",
              xscale="log")
    by_down.set(xlabel="cumulative downlink (MB, log scale)", ylabel="centralized accuracy",
                xscale="log")
    for axis in axes.flat:
        axis.grid(alpha=0.3, which="both")
    by_round.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_client_accuracy(report: Mapping[str, Any], path: Path, title: str = "") -> Path | None:
    """Per-client accuracy on local test splits: the global model's and, where
    personalization ran, the personal model's, one box (and the points) per run.
    None (and no file) when no run measured per-client accuracy."""
    runs = [run for run in report["runs"] if run.get("client_accuracy", {}).get("global")]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: list[tuple[str, list[float]]] = []
    for run in runs:
        accs = run["client_accuracy"]
        series.append((f"{run['codec']}\nglobal", accs["global"]))
        if accs.get("personalized"):
            series.append((f"{run['codec']}\npersonal", accs["personalized"]))
    fig, axis = plt.subplots(figsize=(max(6.0, 1.1 * len(series)), 5), constrained_layout=True)
    axis.boxplot([values for _, values in series], showmeans=True)
    for i, (_, values) in enumerate(series, start=1):
        jitter = [i + 0.18 * ((k * 0.618) % 1 - 0.5) for k in range(len(values))]
        axis.scatter(jitter, values, s=6, alpha=0.5)
    axis.set_xticks(range(1, len(series) + 1), [name for name, _ in series], fontsize=7,
                    rotation=30)
    axis.set(ylabel="accuracy on the client's own test split", ylim=(0, 1.02))
    axis.grid(alpha=0.3, axis="y")
    if title:
        axis.set_title(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
