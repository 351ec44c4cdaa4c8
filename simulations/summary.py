"""A scenario report as the figures BENCHMARKS.md shows: one row per run.

Final accuracy is the mean of the last 5 rounds' central accuracy (one round's
figure moves by a point or more on a non-IID federation); bytes are totals
over the run, in MB (10^6 bytes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedge.simulations.report import privacy_spent

LAST_ROUNDS = 5
SWING_ROUNDS = 10  # issue 18: the round-to-round swing is the std over the last 10 rounds


def final_accuracy(rounds: Sequence[Mapping[str, Any]], last: int = LAST_ROUNDS) -> float | None:
    """Mean central accuracy of the last `last` rounds (None when there is none)."""
    accs = [r["accuracy"] for r in rounds[-last:] if r.get("accuracy") is not None]
    return sum(accs) / len(accs) if accs else None


def last_std(rounds: Sequence[Mapping[str, Any]], last: int = SWING_ROUNDS) -> float | None:
    """Population standard deviation of central accuracy over the last `last` rounds."""
    accs = [float(r["accuracy"]) for r in rounds[-last:] if r.get("accuracy") is not None]
    if len(accs) < 2:
        return None
    mean = sum(accs) / len(accs)
    return (sum((a - mean) ** 2 for a in accs) / len(accs)) ** 0.5


def _mean(values: Sequence[float] | None) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def rounds_to(rounds: Sequence[Mapping[str, Any]], target: float) -> int | None:
    """First round whose central accuracy reaches `target`."""
    for r in rounds:
        if r.get("accuracy") is not None and r["accuracy"] >= target:
            return int(r["round"])
    return None


def run_summary(rounds: Sequence[Mapping[str, Any]], target: float,
                clients: Mapping[str, Sequence[float]] | None = None) -> dict[str, Any]:
    """The figures of one run (stored in report.json under each run's `summary`).

    `clients`: per-client accuracies on local test splits (`global`, and
    `personalized` where personalization ran), as `client_accuracy` measures them.
    """
    final = final_accuracy(rounds)
    swing = last_std(rounds)
    clients = clients or {}
    return {
        "final_accuracy": None if final is None else round(final, 4),
        "last10_std": None if swing is None else round(swing, 4),
        "global_mean_client_accuracy": _mean(clients.get("global")),
        "personalized_mean_client_accuracy": _mean(clients.get("personalized")),
        "rounds_to_target": rounds_to(rounds, target),
        "target_accuracy": target,
        "uplink_mb": round(sum(r.get("uplink_bytes") or 0 for r in rounds) / 1e6, 3),
        "downlink_mb": round(sum(r.get("downlink_bytes") or 0 for r in rounds) / 1e6, 3),
        "rounds": len(rounds),
        **privacy_spent(rounds),
    }


def _fmt(value: Any, spec: str = "") -> str:
    return "–" if value is None else format(value, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not reached"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def markdown_table(report: Mapping[str, Any]) -> str:
    """BENCHMARKS.md's table for one scenario report."""
    runs = report["runs"]
    base = next((r for r in runs if r["codec"] == "none"), None)
    base_acc = base["summary"]["final_accuracy"] if base else None
    base_up = base["summary"]["uplink_mb"] if base else None
    base_down = base["summary"]["downlink_mb"] if base else None
    profiles = list(runs[0].get("profiles", {})) if runs else []
    private = any(r["summary"].get("epsilon") is not None for r in runs)
    head = ["run", "final acc (last 5)", "vs none (pts)", *(["epsilon"] if private else []),
            "std last 10", "client acc global", "client acc personal", "rounds to target",
            "uplink MB", "x fewer up", "downlink MB", "x fewer down",
            *[f"time to target, {p}" for p in profiles], "wall time here"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        s = run["summary"]
        acc = s["final_accuracy"]
        delta = None if acc is None or base_acc is None else 100 * (acc - base_acc)
        cells = [
            f"`{run['codec']}`", _fmt(acc, ".4f"), _fmt(delta, "+.2f"),
            *([_fmt(s.get("epsilon"), ".2f")] if private else []),
            _fmt(s.get("last10_std"), ".4f"), _fmt(s.get("global_mean_client_accuracy"), ".4f"),
            _fmt(s.get("personalized_mean_client_accuracy"), ".4f"),
            _fmt(s["rounds_to_target"]), _fmt(s["uplink_mb"], ".2f"),
            _fmt(base_up / s["uplink_mb"] if base_up and s["uplink_mb"] else None, ".1f"),
            _fmt(s["downlink_mb"], ".2f"),
            _fmt(base_down / s["downlink_mb"] if base_down and s["downlink_mb"] else None,
                 ".2f"),
            *[_duration(run["profiles"][p]["time_to_target_s"]) for p in profiles],
            _duration(run.get("wall_seconds")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
