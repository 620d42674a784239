#!/usr/bin/env bash
# One command for a single-GPU machine (torch + Triton; DALI, TensorRT, ONNX and network optional):
#   bash bench/gpu.sh OUTDIR
# 1. environment record (nvidia-smi, versions)            -> OUTDIR/env.txt
# 2. the GPU tests, Triton kernels compiled (no interpreter) -> OUTDIR/pytest-gpu.log, OUTDIR/pytest-kernels.log
# 3. the whole bench (train ladder, infer, data, kernels)  -> OUTDIR/bench.json, OUTDIR/ladder.png,
#                                                             OUTDIR/bench.txt (table, printed last), OUTDIR/bench.log
# Budget: under 9 minutes in all (each step has its own timeout, so one hang cannot eat the rest). Exit status: 0 when
# the bench wrote its JSON, whatever the tests said (their status is in OUTDIR/status.txt).
set -u
OUT=${1:?usage: bash bench/gpu.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # compiled kernels, not the CPU interpreter
PY=${PYTHON:-python}
T0=$(date +%s)
say() { echo "[gpu.sh +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/gpu.sh.log"; }

# fastp2p must import as a package (bench/ installs as fastp2p.bench); install it in place, offline, if needed.
if ! $PY -c "import fastp2p.bench.ladder" 2>/dev/null; then
  say "installing fastp2p in place (pip install --no-deps --no-build-isolation -e .)"
  $PY -m pip install --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || say "pip install failed (see pip.log)"
fi

{
  date -u; nvidia-smi 2>&1
  $PY - <<'PYEOF'
import json, torch
from fastp2p.bench import harness
print(json.dumps(harness.environment("cuda" if torch.cuda.is_available() else "cpu"), indent=1))
PYEOF
} >"$OUT/env.txt" 2>&1
say "env: $(grep -m1 '"gpu"' "$OUT/env.txt")"

say "pytest -m gpu (limit 150 s)"
timeout 150 $PY -m pytest -q -m gpu tests -p no:cacheprovider >"$OUT/pytest-gpu.log" 2>&1
echo "pytest-gpu rc=$?" >"$OUT/status.txt"
say "$(tail -1 "$OUT/pytest-gpu.log")"

say "pytest tests/test_kernels.py, compiled (limit 90 s)"
timeout 90 $PY -m pytest -q tests/test_kernels.py -p no:cacheprovider >"$OUT/pytest-kernels.log" 2>&1
echo "pytest-kernels rc=$?" >>"$OUT/status.txt"
say "$(tail -1 "$OUT/pytest-kernels.log")"

LEFT=$(( 520 - ($(date +%s) - T0) ))
[ "$LEFT" -lt 120 ] && LEFT=120
say "bench all --quick --device cuda (limit ${LEFT} s)"
timeout "$LEFT" $PY -m fastp2p.bench.cli all --quick --device cuda --json "$OUT/bench.json" --plot "$OUT/ladder.png" \
  >"$OUT/bench.txt" 2>"$OUT/bench.log"
RC=$?
echo "bench rc=$RC" >>"$OUT/status.txt"
if [ "$RC" -ne 0 ] || [ ! -s "$OUT/bench.json" ]; then
  say "bench all failed or ran out of time (rc=$RC); train ladder alone (limit 150 s)"
  timeout 150 $PY -m fastp2p.bench.cli train --quick --device cuda --json "$OUT/bench.json" --plot "$OUT/ladder.png" \
    >"$OUT/bench.txt" 2>>"$OUT/bench.log"
  echo "bench-train rc=$?" >>"$OUT/status.txt"
fi
cat "$OUT/bench.txt"
say "done: $(tr '\n' ' ' <"$OUT/status.txt")"
[ -s "$OUT/bench.json" ]
