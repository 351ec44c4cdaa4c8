"""`fedge bench edge --json`: a Raspberry Pi-class device, one section per question.

- `budget` (always): does a device process (native, this CPU) train the
  Fashion-MNIST CNN inside a memory cgroup with a hard 512 MB limit, the RAM of
  a Pi Zero 2 W, without an OOM kill? Then the smallest limit that still
  passes, by bisection, and the bare torch loop's peak for reference. Goals:
  training within 300 MB, waiting within 50 MB (`GOALS_MB`).
- `arm64` (`--arm64`): the emulated Raspberry Pi OS run of `scripts/pi-emulate`
  (an arm64 root under qemu enrolls with an x86 coordinator and trains), or the
  object a previous run saved (`--arm64-result FILE`).

Each section is one function returning a JSON-ready dict, and `SECTIONS`
names them in output order: another section is one more function and entry.

The cgroup is cgroup v1's memory controller (`/sys/fs/cgroup/memory/`): the
bench makes its own child cgroup, moves only the device process into it
(before the process execs, so imports count), reads the kernel's OOM-kill
counter and high-water mark, and removes the cgroup afterwards. Figures are
MB of 10^6 bytes, as in the issue.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedge.bench import edge_footprint as footprint

CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
LIMIT_MB = 512
GOALS_MB = {"training": 300, "waiting": 50}
SEARCH_FLOOR_MB = 96
SEARCH_RESOLUTION_MB = 16
SEARCH_MAX_TRIALS = 6
_MB = 1_000_000
CGROUP_NOTE = (
    "a memory cgroup is charged the process's anonymous memory and the page cache it "
    "faults in first; pages of shared libraries (libtorch) already cached by other "
    "processes stay charged to those, and clean file pages are reclaimed under the limit "
    "rather than killing, so the passing limit is below the RSS peak, which counts every "
    "mapped page"
)
_REPO = Path(__file__).resolve().parents[1]
PI_EMULATE = _REPO / "scripts" / "pi-emulate"


# ------------------------------------------------------------------ the cgroup


def cgroup_v1_unusable() -> str | None:
    """Why a memory cgroup cannot be made here, or None when it can."""
    if not (CGROUP_V1_MEMORY / "memory.limit_in_bytes").is_file():
        return f"no cgroup v1 memory controller at {CGROUP_V1_MEMORY}"
    if not os.access(CGROUP_V1_MEMORY, os.W_OK):
        return f"{CGROUP_V1_MEMORY} is not writable (needs root)"
    return None


class MemoryCgroup:
    """A cgroup v1 memory cgroup with a hard limit, made on entry and removed on exit.

    `wrap(cmd)` gives a command line that joins the cgroup and then execs
    `cmd`, so the process is limited from its first byte. Only processes
    started through `wrap` are ever in it; on exit any still there (ours) are
    killed so the cgroup can be removed.
    """

    def __init__(self, limit_mb: float, name: str | None = None) -> None:
        self.limit_bytes = int(limit_mb * _MB)
        self.path = CGROUP_V1_MEMORY / (name or f"fedge-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> MemoryCgroup:
        reason = cgroup_v1_unusable()
        if reason:
            raise RuntimeError(reason)
        self.path.mkdir()
        try:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
            swap = self.path / "memory.memsw.limit_in_bytes"
            if swap.exists():  # no swapping out of trouble either
                swap.write_text(str(self.limit_bytes))
        except BaseException:
            self.path.rmdir()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        deadline = time.monotonic() + 15
        while True:
            pids = self.pids()
            if not pids:
                break
            for pid in pids:  # only processes this bench started are in here
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        self.path.rmdir()

    def wrap(self, cmd: list[str]) -> list[str]:
        procs = self.path / "cgroup.procs"
        return ["/bin/sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "fedge-cgroup", *cmd]

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def oom_kills(self) -> int:
        """OOM kills inside this cgroup so far (the kernel's counter)."""
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def peak_mb(self) -> float:
        """The cgroup's high-water mark: anonymous memory plus charged page cache."""
        return round(int((self.path / "memory.max_usage_in_bytes").read_text()) / _MB, 1)


# ------------------------------------------------------------------ one trial


def run_in_cgroup(
    limit_mb: float,
    *,
    task: str = "fashion-mnist",
    coordinator: str = "fake",
    rounds: int = 2,
    timeout_s: float = 300.0,
    idle_s: float = 3.0,
) -> dict[str, Any]:
    """One device session inside a fresh `limit_mb` cgroup: did it finish its rounds?

    `ok` is true when every round's result was delivered and the kernel killed
    nothing in the cgroup. A device that thrashes past `timeout_s` fails too.
    """
    with MemoryCgroup(limit_mb) as cg:
        started = time.monotonic()
        try:
            result = footprint.edge_footprint(
                coordinator=coordinator, idle_s=idle_s, rounds=rounds, timeout_s=timeout_s,
                task=task, bare_torch=False, device_wrapper=cg.wrap,
            )
            error = ""
        except RuntimeError as e:
            result, error = {}, str(e).splitlines()[0]
        seconds = round(time.monotonic() - started, 1)
        kills = cg.oom_kills()
        peak = cg.peak_mb()
    out: dict[str, Any] = {
        "limit_mb": limit_mb,
        "ok": not error and kills == 0,
        "oom_kills": kills,
        "cgroup_peak_mb": peak,
        "seconds": seconds,
    }
    if error:
        out["error"] = error
    keys = ("training_peak_rss_mb", "waiting_rss_mb", "waiting_peak_rss_mb", "coordinator")
    out.update({k: result[k] for k in keys if k in result})
    out.update({k: v for k, v in result.items() if k.startswith(("round_", "after_round_"))})
    return out


def smallest_passing_limit(
    passes: Callable[[float], bool],
    known_pass_mb: float,
    floor_mb: float = SEARCH_FLOOR_MB,
    resolution_mb: float = SEARCH_RESOLUTION_MB,
    max_trials: int = SEARCH_MAX_TRIALS,
) -> tuple[float, list[float]]:
    """Bisection between `floor_mb` (assumed to fail) and `known_pass_mb` (passed).

    Returns the smallest limit seen to pass and the limits tried, at most
    `max_trials` of them: the answer is within `resolution_mb` when the trials
    suffice, else the bracket's upper end (an upper bound).
    """
    lo, hi = float(floor_mb), float(known_pass_mb)
    tried: list[float] = []
    while hi - lo > resolution_mb and len(tried) < max_trials:
        mid = round((lo + hi) / 2)
        tried.append(mid)
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi, tried


# ------------------------------------------------------------------ sections


def budget_section(
    limit_mb: float = LIMIT_MB,
    *,
    task: str = "fashion-mnist",
    coordinator: str = "auto",
    rounds: int = 2,
    search: bool = True,
    max_trials: int = SEARCH_MAX_TRIALS,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """The `budget` object: the run at `limit_mb`, then the smallest limit that passes."""
    main = run_in_cgroup(limit_mb, task=task, coordinator=coordinator, rounds=rounds,
                         timeout_s=timeout_s)
    out: dict[str, Any] = {
        "limit_mb": limit_mb,
        "ok": main["ok"],
        "training_peak_rss_mb": main.get("training_peak_rss_mb"),
        "waiting_rss_mb": main.get("waiting_rss_mb"),
        "smallest_passing_limit_mb": None,
        "task": task,
        "rounds": rounds,
        "run": main,
    }
    if search and main["ok"]:
        trials: list[dict[str, Any]] = []

        def passes(mb: float) -> bool:
            # the search trials talk to the in-process test coordinator: one process fewer
            trial = run_in_cgroup(mb, task=task, coordinator="fake", rounds=rounds,
                                  timeout_s=timeout_s, idle_s=1.0)
            trials.append(trial)
            return bool(trial["ok"])

        smallest, _ = smallest_passing_limit(passes, limit_mb, max_trials=max_trials)
        out["smallest_passing_limit_mb"] = smallest
        out["search"] = {
            "floor_mb": SEARCH_FLOOR_MB, "resolution_mb": SEARCH_RESOLUTION_MB,
            "trials": [{k: t.get(k) for k in ("limit_mb", "ok", "oom_kills", "cgroup_peak_mb",
                                               "training_peak_rss_mb", "seconds", "error")}
                       for t in trials],
        }
    out["bare_torch_loop_peak_rss_mb"] = footprint.bare_torch_peak_rss_mb(timeout_s=timeout_s)
    out["goals_mb"] = dict(GOALS_MB)
    out["goals_met"] = _goals(out)
    out["unit"] = "MB = 10^6 bytes; RSS from the kernel (VmHWM)"
    out["cgroup_note"] = CGROUP_NOTE
    return out


def _goals(out: dict[str, Any]) -> dict[str, Any]:
    """Whether the 300 MB / 50 MB goals are met, and the gap (MB) where not."""
    result: dict[str, Any] = {}
    for name, key in (("training", "training_peak_rss_mb"), ("waiting", "waiting_rss_mb")):
        value = out.get(key)
        goal = GOALS_MB[name]
        result[name] = value is not None and value <= goal
        if value is not None and value > goal:
            result[f"{name}_gap_mb"] = round(value - goal, 1)
    return result


def arm64_section(result_file: Path | None = None, timeout_s: float = 7200.0) -> dict[str, Any]:
    """The `arm64` object: run `scripts/pi-emulate` (root; minutes) or read its saved output."""
    if result_file is not None:
        return json.loads(Path(result_file).read_text())
    if not PI_EMULATE.is_file():
        raise RuntimeError(f"{PI_EMULATE} not found: the emulated run needs a source checkout")
    proc = subprocess.run(
        [str(PI_EMULATE)], capture_output=True, text=True, timeout=timeout_s, check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = "\n".join(proc.stderr.splitlines()[-20:])
        raise RuntimeError(f"scripts/pi-emulate exited {proc.returncode}:\n{tail}")
    return json.loads(lines[-1])


def onnx_section() -> dict[str, Any]:
    """Torch-free inference: ONNX Runtime against `fedge predict` (bench/onnx_bench.py)."""
    from fedge.bench.onnx_bench import onnx_measurements

    return onnx_measurements()


def on_arm64(onnx: dict[str, Any], arm64: dict[str, Any]) -> None:
    """With an emulated run, the inference-only size is the one measured in the arm64 root.

    The issue asks for the size on arm64; this machine's figure stays beside it as
    `inference_only_installed_mb_here` (x86-64 wheels differ by a few MB).
    """
    measured = (arm64.get("inference_only") or {}).get("installed_mb")
    if measured is None:
        return
    from fedge.bench.onnx_bench import BARS

    onnx["inference_only_installed_mb_here"] = onnx["inference_only_installed_mb"]
    onnx["inference_only_installed_mb"] = measured
    onnx["installed_platform"] = "aarch64 (scripts/pi-emulate's root)"
    onnx["checks"]["inference_only_installed_mb"] = (
        measured <= BARS["inference_only_installed_mb"]
        and not arm64["inference_only"].get("torch_flower_or_onnxruntime_installed"))


SECTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "budget": budget_section,
    "arm64": arm64_section,
    "onnx": onnx_section,
}


def main(
    json_output: bool = True,
    *,
    arm64: bool = False,
    arm64_result: Path | None = None,
    limit_mb: float = LIMIT_MB,
    search: bool = True,
    onnx: bool = True,
    out: Path | None = None,
) -> dict[str, Any]:
    """Print the sections asked for as one JSON object (and write it to `out`)."""
    result: dict[str, Any] = {"budget": budget_section(limit_mb, search=search)}
    if arm64 or arm64_result is not None:
        result["arm64"] = arm64_section(arm64_result)
    if onnx:
        result["onnx"] = onnx_section()
        if "arm64" in result:
            on_arm64(result["onnx"], result["arm64"])
    text = json.dumps(result, indent=None if json_output else 2)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main(json_output="--json" in sys.argv, arm64="--arm64" in sys.argv)
