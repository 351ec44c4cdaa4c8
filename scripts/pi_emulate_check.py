"""Host-side checks for scripts/pi-emulate (run with the x86 venv's python).

Subcommands, each printing one JSON object or writing one file:

- `batch OUT.npy N`: the first N Fashion-MNIST test images as the CNN takes them
  (float32 in [0, 1], [N, 1, 28, 28]): the fixed batch both CPUs predict.
- `rounds STATE DEVICE_ID`: every run in the coordinator's store with its rounds,
  whether each completed, and whether DEVICE_ID's result was accepted and counted
  (a contributor of the round: its int8 update was decoded and aggregated here).
- `compare X86.json ARM64.json`: whether two `fedge predict --json` outputs agree
  label for label.
- `section ...`: the `arm64` object of `fedge bench edge --json`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any


def batch(out: str, count: str) -> None:
    import numpy as np

    from fedge.common.datasets import images_to_float, load_idx_raw

    images, _ = load_idx_raw(split="test")
    x = images_to_float(np.asarray(images[: int(count)]))
    np.save(out, np.ascontiguousarray(x.reshape(-1, 1, 28, 28), dtype=np.float32))


def rounds(state: str, device_id: str) -> None:
    from fedge.server.store import ResultStatus, RoundStatus, Store

    store = Store.open(Path(state) / "fedge.db")
    try:
        runs: list[dict[str, Any]] = []
        for run in store.list_runs():
            items = []
            for r in store.list_rounds(run.id):
                accepted = [
                    res.device_id
                    for res in store.list_results(run.id, r.round, ResultStatus.COMPLETE)
                ]
                items.append(
                    {
                        "round": r.round,
                        "completed": r.status == RoundStatus.COMPLETED,
                        "counted": device_id in r.contributors,
                        "result_stored": device_id in accepted,
                        "seconds": round((r.ended or r.started) - r.started, 1),
                    }
                )
            runs.append(
                {"run_id": run.id, "task": run.config.get("task"), "status": str(run.status),
                 "rounds": items}
            )
    finally:
        store.close()
    print(json.dumps({"runs": runs}))


def compare(x86: str, arm64: str) -> None:
    a = json.loads(Path(x86).read_text())
    b = json.loads(Path(arm64).read_text())
    la = [p["class"] for p in a["predictions"]]
    lb = [p["class"] for p in b["predictions"]]
    same = sum(1 for i, j in zip(la, lb, strict=True) if i == j)
    print(
        json.dumps(
            {
                "examples": len(la),
                "same_labels": same,
                "match": la == lb,
                "kernels": {"x86": a["model"]["kernels"], "arm64": b["model"]["kernels"]},
                "content_sha256_same": a["model"]["content_sha256"]
                == b["model"]["content_sha256"],
            }
        )
    )


def _inference_only(d: Path) -> dict[str, Any]:
    """The inference-only device's part, when pi-emulate made it (numpy ran the ONNX file)."""
    if not (d / "inference-only.json").is_file():
        return {}
    onnx = json.loads((d / "compare-onnx.json").read_text())
    vs_torch = json.loads((d / "compare-onnx-torch.json").read_text())
    return {"inference_only": {
        **json.loads((d / "inference-only.json").read_text()),
        "predictions_match_x86": onnx["match"],
        "predictions": onnx,
        "agreement_with_torch_int8": round(vs_torch["same_labels"] / max(1, vs_torch["examples"]),
                                           4),
    }}


def section(report_dir: str) -> None:
    """The bench's `arm64` object from the files pi-emulate left in `report_dir`."""
    d = Path(report_dir)
    info = json.loads((d / "install.json").read_text())
    store = json.loads((d / "rounds.json").read_text())
    preds = json.loads((d / "compare.json").read_text())
    preds_float = json.loads((d / "compare-float.json").read_text())
    per_round: list[dict[str, Any]] = []
    for name in ("coordinator-digits.log", "coordinator-fashion-mnist.log"):
        text = (d / name).read_text(errors="replace")
        task = name.removeprefix("coordinator-").removesuffix(".log")
        for m in re.finditer(r"round (\d+)/\d+: .*?, ([0-9.]+) s$", text, re.M):
            per_round.append({"task": task, "round": int(m[1]), "seconds": float(m[2])})
    accepted = sum(
        1 for run in store["runs"] for r in run["rounds"] if r["completed"] and r["counted"]
    )
    out = {
        "rounds_accepted": accepted,
        "rounds_expected": 3,
        "round_seconds": [r["seconds"] for r in per_round],
        "rounds": per_round,
        "predictions_match_x86": preds["match"],
        "predictions": {**preds, "float_kernels_match": preds_float["match"]},
        "installed_mb": info["installed_mb"],
        "install": info,
        **_inference_only(d),
        "store": store,
        "emulation": "qemu-user-static (aarch64) on x86-64: times are emulated, "
        "many times slower than a Raspberry Pi",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    commands = {"batch": batch, "rounds": rounds, "compare": compare, "section": section}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(commands)} ARGS...")
    commands[sys.argv[1]](*sys.argv[2:])
