#!/usr/bin/env bash
# One command for a single-GPU machine (torch + Triton + CUDA; DALI, TensorRT, ONNX and network optional):
#   bash bench/gpu.sh [--budget SECONDS] [--dry-run] OUTDIR
# Runs the plan in bench/gpu_plan.py: env + versions + import checks, compiled Triton kernels vs fp64, kernel timings
# vs cuDNN, the eager train step at batch 1/16/64, the CUDA-graph step, --compile at batch 16, inference, loaders,
# pytest -m gpu; in that priority order, each step in its own process under its own timeout, cut to --budget
# (default 480 s): a step whose estimate does not fit in what is left is recorded as skipped instead of started.
# Every finished measurement is one JSON line appended (and flushed) to OUTDIR/results.jsonl at once, so a run killed
# at any point keeps what it measured; the table is printed last, and again any time with
#   python -m fastp2p.bench.gpu_plan --table OUTDIR
# Step logs: OUTDIR/logs/. --dry-run: the same plan on the CPU with tiny shapes (Triton interpreter), for CI.
# Exit status: 0 when the plan ran to its end (each step's own status is in the table), 143/130 when stopped by
# TERM/INT (after the table), 2 on a usage error.
set -u
usage="usage: bash bench/gpu.sh [--budget SECONDS] [--dry-run] OUTDIR"
BUDGET=480
DRY=()
EXTRA=()  # hidden driver options (tests): --sleep=STEP=S, --timeout=STEP=S, --estimate=STEP=S
OUT=
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET=${2:?$usage}; shift 2 ;;
    --budget=*) BUDGET=${1#--budget=}; shift ;;
    --dry-run) DRY=(--dry-run); shift ;;
    --sleep=* | --timeout=* | --estimate=*) EXTRA+=("${1%%=*}" "${1#*=}"); shift ;;
    -h | --help) echo "$usage"; exit 0 ;;
    -*) echo "gpu.sh: unknown option $1; $usage" >&2; exit 2 ;;
    *) [ -n "$OUT" ] && { echo "gpu.sh: one OUTDIR only; $usage" >&2; exit 2; }; OUT=$1; shift ;;
  esac
done
[ -n "$OUT" ] || { echo "$usage" >&2; exit 2; }
case "$BUDGET" in '' | *[!0-9.]*) echo "gpu.sh: --budget $BUDGET: expected seconds (a number); $usage" >&2; exit 2 ;; esac
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
T0=$(date +%s)

# From the repository root `-m fastp2p.bench.gpu_plan` imports this checkout (fastp2p maps kernels/, engines/, bench/
# itself); an in-place install, offline, only if even that fails (e.g. a missing dependency would show here).
if ! $PY -c "import fastp2p.bench.gpu_plan" 2>"$OUT/import.log"; then
  echo "[gpu.sh] fastp2p.bench.gpu_plan does not import (see import.log); pip install --no-deps -e ." >&2
  $PY -m pip install --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || echo "[gpu.sh] pip failed" >&2
fi
LEFT=$($PY -c "print(max(1.0, $BUDGET - ($(date +%s) - $T0)))")

# The driver in the background so a TERM/INT sent to this script reaches it: it kills the step in flight, records
# it and prints the table from what was recorded.
$PY -m fastp2p.bench.gpu_plan run "$OUT" --budget "$LEFT" "${DRY[@]}" "${EXTRA[@]}" &
PID=$!
STOPPED=0
trap 'STOPPED=1; kill -TERM $PID 2>/dev/null' TERM INT
wait $PID
RC=$?
if [ "$STOPPED" = 1 ]; then wait $PID; RC=$?; fi  # the trap cut the first wait short: collect the driver's status
case "$RC" in
  0 | 130 | 143) ;;  # finished, or stopped by a signal after printing its table
  *) echo "[gpu.sh] the plan driver exited with status $RC; the table from what was recorded:" >&2
     $PY -m fastp2p.bench.gpu_plan --table "$OUT" || tail -n 40 "$OUT/results.jsonl" ;;
esac
exit "$RC"
