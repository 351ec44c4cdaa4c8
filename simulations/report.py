"""The simulation report: `report.json` (one run per codec) and `report.png`.

The JSON shape is a contract with users' notebooks and with BENCHMARKS.md:
{"runs": [{"codec", "strategy", "rounds": [{"round", "accuracy", "loss",
"uplink_bytes", "downlink_bytes", "rejected", "seconds"}, ...]}, ...]}.
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
    """Accuracy against round and against cumulative uplink MB, one line per codec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for run in report["runs"]:
        rounds = run["rounds"]
        if not rounds:
            continue
        label = f"{run['codec']} ({run['strategy']})"
        xs = [r["round"] for r in rounds]
        accuracy = [r["accuracy"] for r in rounds]
        uplink_mb = [b / 1e6 for b in cumulative([r["uplink_bytes"] for r in rounds])]
        by_round.plot(xs, accuracy, marker="o", markersize=3, label=label)
        by_bytes.plot(uplink_mb, accuracy, marker="o", markersize=3, label=label)
    by_round.set_xlabel("round")
    by_round.set_ylabel("centralized accuracy")
    by_round.grid(alpha=0.3)
    by_bytes.set_xlabel("cumulative uplink (MB, log scale)")
    by_bytes.set_xscale("log")
    by_bytes.grid(alpha=0.3, which="both")
    by_round.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
