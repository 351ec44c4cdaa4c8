#!/usr/bin/env bash
# fashion-mnist-100's issue-18 runs on one GPU machine, in parallel, in under 9 minutes.
#
# Run from the repository root on a machine with python3 + torch (CUDA) but
# without flwr and its wheels' dependencies, and without network:
#   .whl/   wheels for flwr 1.42 and what the machine lacks (pip download, see
#           /work/.library/device/README.md); installed into /tmp/site
#   .data/fashion-mnist/   the four IDX .gz files (a copy of Debian's folder)
# fedge is not pip-installed: /tmp/fedge-pkg/fedge is a tree of symlinks to the
# repository's package folders (pyproject's package-dir map).
#
# Each run is its own `fedge simulate --scenario fashion-mnist-100 --only LABEL`
# process (training and central evaluation on CUDA, a few clients at once in
# threads), at most $JOBS at a time; each is stopped after $RUN_BUDGET_S seconds,
# and the runs that finished are merged into one report:
#   $OUT/fashion-mnist-100/report.{json,md,png}, clients.png, parts/*/, logs/*.log
#
#   scripts/gpu_scenario.sh            # the issue-18 runs (3 labelled + the sweep)
#   scripts/gpu_scenario.sh --smoke    # 2 rounds, 2 clients a round: checks the setup
#   LABELS="fedge-tuned none" scripts/gpu_scenario.sh   # chosen runs
# Environment: OUT (default fedge-out/gpu), PYTHON (python3), JOBS (11),
# RUN_BUDGET_S (470), FEDGE_INPROCESS_WORKERS (2), SKIP_WHEELS=1 (use the
# interpreter's own packages, e.g. a CPU check with the project's venv).
set -uo pipefail

ROOT=$(pwd)
[[ -f "$ROOT/pyproject.toml" && -d "$ROOT/simulations" ]] || {
    echo "gpu_scenario.sh: run it from the repository root" >&2; exit 2; }
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/fedge-out/gpu}
JOBS=${JOBS:-11}
RUN_BUDGET_S=${RUN_BUDGET_S:-470}
SMOKE=""
[[ "${1:-}" == "--smoke" ]] && SMOKE="--smoke"
started=$(date +%s)
mkdir -p "$OUT/logs" "$OUT/parts"

# ---- 1. wheels and the fedge package (no pip install of fedge)
SITE=""
if [[ -z "${SKIP_WHEELS:-}" ]]; then
    compgen -G ".whl/*.whl" >/dev/null || { echo "gpu_scenario.sh: no wheels in .whl/" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "gpu_scenario.sh: wheel install failed" >&2; exit 2; }
    SITE=/tmp/site
fi
PKG=/tmp/fedge-pkg
rm -rf "$PKG" && mkdir -p "$PKG/fedge"
for f in fedge/*.py; do ln -s "$ROOT/$f" "$PKG/fedge/$(basename "$f")"; done
for pair in common:common server:server client:client simulations:simulations bench:bench \
            v1:common/wire/fedge/v1; do
    ln -s "$ROOT/${pair#*:}" "$PKG/fedge/${pair%%:*}"
done
export PYTHONPATH="${SITE:+$SITE:}$PKG"
# PYTHONSAFEPATH: the repo root holds a `fedge/` folder that would shadow the symlink tree
export PYTHONSAFEPATH=1 PYTHONDONTWRITEBYTECODE=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MPLBACKEND=Agg
export FEDGE_INPROCESS_WORKERS=${FEDGE_INPROCESS_WORKERS:-2}
if [[ -d "$ROOT/.data/fashion-mnist" ]]; then
    export FEDGE_FASHION_MNIST_DIR="$ROOT/.data/fashion-mnist"
fi

# ---- 2. the import path works, the in-process engine loads no Ray, what the GPU is
"$PY" - > "$OUT/environment.txt" 2>&1 <<'EOF'
import sys, time
t = time.perf_counter()
import flwr, torch
import fedge.simulations.scenario_run, fedge.server.inprocess_grid, fedge.client.personal
from fedge.common.datasets import DEFAULT_FASHION_MNIST_DIR
from fedge.common.training import use_device
assert "ray" not in sys.modules, "the in-process path imported ray"
print("python", sys.version.split()[0], "flwr", flwr.__version__, "torch", torch.__version__)
print("device", use_device("auto"), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("fashion-mnist", DEFAULT_FASHION_MNIST_DIR, "imports", round(time.perf_counter() - t, 2), "s")
EOF
rc=$?
cat "$OUT/environment.txt"
[[ $rc -eq 0 ]] || { echo "gpu_scenario.sh: the import check failed" >&2; exit 2; }

# ---- 3. the runs, $JOBS at a time
if [[ -n "${LABELS:-}" ]]; then
    read -r -a labels <<< "$LABELS"
else
    mapfile -t labels < <("$PY" -c '
from fedge.simulations.scenarios import FASHION_MNIST_100 as s
print("\n".join(r.label for r in s.runs if r.label.startswith(("fedge-tuned", "stock-flower-best", "tune:"))))')
fi
safe() { printf '%s' "$1" | tr -c 'A-Za-z0-9._-' '_'; }
run_one() {
    local label=$1 dir
    dir="$OUT/parts/$(safe "$label")"
    timeout -k 10 "$RUN_BUDGET_S" "$PY" -c 'from fedge.cli import app; app()' simulate \
        --scenario fashion-mnist-100 $SMOKE --only "$label" --out "$dir" \
        > "$OUT/logs/$(safe "$label").log" 2>&1
    local rc=$?
    echo "$(date -u +%T) $label: exit $rc ($(( $(date +%s) - started )) s since start)"
}
export -f run_one safe
export PY OUT SMOKE RUN_BUDGET_S started
monitor=""
if command -v nvidia-smi >/dev/null; then  # GPU use every 5 s while the runs go
    nvidia-smi dmon -s um -d 5 > "$OUT/gpu-use.txt" 2>&1 &
    monitor=$!
fi
echo "$(date -u +%T) ${#labels[@]} runs, $JOBS at a time, $RUN_BUDGET_S s each at most"
printf '%s\n' "${labels[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one "$1"' _ {}
[[ -n "$monitor" ]] && kill "$monitor" 2>/dev/null

# ---- 4. one report from the runs that finished (in the scenario's order)
parts=""
for label in "${labels[@]}"; do
    dir="$OUT/parts/$(safe "$label")"
    [[ -f "$dir/report.json" ]] && parts="${parts:+$parts,}$dir"
done
if [[ -z "$parts" ]]; then
    echo "gpu_scenario.sh: no run finished; see $OUT/logs" >&2; exit 1
fi
"$PY" -c 'from fedge.cli import app; app()' simulate --scenario fashion-mnist-100 $SMOKE \
    --merge "$parts" --out "$OUT/fashion-mnist-100" > "$OUT/logs/merge.log" 2>&1
rc=$?
tail -n 30 "$OUT/logs/merge.log"
echo "total $(( $(date +%s) - started )) s; report: $OUT/fashion-mnist-100/report.json"
exit $rc
