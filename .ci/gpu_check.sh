#!/usr/bin/env bash
# One command that proves bnext's CUDA path on a GPU machine, within a fixed time budget:
#   1. build bnext with CUDA against this machine's torch (all cores; the .cu files compile side by side)
#   2. the CUDA tests and the CPU/CUDA parity tests (tests/test_cuda*.py, tests/test_grad_stats.py)
#   3. compute-sanitizer memcheck and racecheck on a short subset
#   4. the GPU benchmarks (benchmarks/bench_gpu.py)
#   5. OUTDIR/summary.md and OUTDIR/results.json, rewritten after every step (.ci/gpu_report.py), so a
#      run cut off by its caller still leaves what it found
#
# Usage: .ci/gpu_check.sh OUTDIR [--no-build] [--no-sanitizer] [--no-bench]
#   --no-build      use the bnext already built in this tree (a rerun after a fix that did not touch csrc/)
#   BNEXT_GPU_CHECK_BUDGET   seconds for the whole run (default 470); every step has its own timeout,
#                            capped by what is left, so one hang cannot eat the budget.
#   PYTHON                   the interpreter (default python3, the machine's own)
# Files written to OUTDIR (8): summary.md results.json build.log tests.log tests_existing.log sanitizer.log
#   bench.log bench.json
# Exit status: 0 when every step passed; 1 when a step failed or timed out; 2 on bad arguments or
# when there is no GPU (a plain "no GPU" message; nothing is built or run).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
BUDGET="${BNEXT_GPU_CHECK_BUDGET:-470}"

usage() { echo "usage: .ci/gpu_check.sh OUTDIR [--no-build] [--no-sanitizer] [--no-bench]" >&2; exit 2; }

OUT="" BUILD=1 SANITIZER=1 BENCH=1
for arg in "$@"; do
  case "$arg" in
    --no-build) BUILD=0 ;;
    --no-sanitizer) SANITIZER=0 ;;
    --no-bench) BENCH=0 ;;
    -h|--help) usage ;;
    -*) echo "gpu_check: unknown option $arg" >&2; usage ;;
    *) [ -z "$OUT" ] || { echo "gpu_check: more than one OUTDIR given ($OUT, $arg)" >&2; usage; }; OUT="$arg" ;;
  esac
done
[ -n "$OUT" ] || { echo "gpu_check: OUTDIR is required" >&2; usage; }
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check: BNEXT_GPU_CHECK_BUDGET must be a whole number of seconds, got '$BUDGET'" >&2; exit 2; }
mkdir -p "$OUT" || { echo "gpu_check: cannot create OUTDIR $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"

report() { "$PYTHON" "$ROOT/.ci/gpu_report.py" "$OUT" "$@"; }

# --- no GPU: say so plainly, touch nothing ---------------------------------------------------------
gpu_reason=""
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  gpu_reason="nvidia-smi finds no NVIDIA GPU"
elif ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)" 2>/dev/null; then
  gpu_reason="$PYTHON's torch is not a CUDA build or sees no GPU"
fi
if [ -n "$gpu_reason" ]; then
  echo "gpu_check: no GPU: $gpu_reason; nothing was built or run" >&2
  report init --no-gpu "$gpu_reason" >/dev/null 2>&1 || true
  exit 2
fi

cd "$ROOT"
START=$SECONDS
report init || { echo "gpu_check: .ci/gpu_report.py failed" >&2; exit 1; }
status=0

# run_step NAME TIMEOUT LOG CMD...: runs CMD under the smaller of TIMEOUT and the budget left, then
# records the step (status, seconds, log tail) in results.json and rewrites summary.md.
run_step() {
  local name="$1" limit="$2" log="$3"; shift 3
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 10 ]; then
    report step "$name" skipped 0 "$log" "time budget spent"
    status=1
    return 1
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "=== gpu_check: $name (timeout ${limit} s)" >&2
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  local took=$((SECONDS - t0)) result=passed
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then result=timeout; elif [ $rc -ne 0 ]; then result=failed; fi
  report step "$name" "$result" "$took" "$log" "exit $rc"
  echo "=== gpu_check: $name $result ($took s)" >&2
  [ "$result" = passed ] || { status=1; return 1; }
}

if [ "$BUILD" = 1 ]; then
  run_step build 300 "$OUT/build.log" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 BNEXT_CUDA=1 \
    "$PYTHON" -m pip install --no-build-isolation --no-deps -e . \
    || { report finish; echo "gpu_check: the build failed; see $OUT/build.log" >&2; exit 1; }
fi
# The CUDA tests and the CPU/CUDA parity tests, the new ones first (each pytest run is one step, so a
# timeout in one leaves the other's results), after a check that the build really has CUDA kernels
# (else every CUDA test would skip). --durations tells the next run where the time went.
check_cuda='import bnext; info = bnext.build_info(); print(info); assert info["cuda"], "bnext was built without CUDA kernels"'
pytest_args=(-q -p no:cacheprovider -rfEs --durations=15)
run_step tests-new 150 "$OUT/tests.log" bash -c '"$0" -c "$1" && "$0" -m pytest "${@:2}"' "$PYTHON" "$check_cuda" \
  "${pytest_args[@]}" tests/test_cuda_parity.py tests/test_cuda_runtime.py
run_step tests-existing 150 "$OUT/tests_existing.log" "$PYTHON" -m pytest "${pytest_args[@]}" \
  tests/test_cuda.py tests/test_cuda_variants.py tests/test_grad_stats.py

if [ "$SANITIZER" = 1 ]; then
  # A short subset: every kernel once, at small shapes.
  run_step sanitizer 150 "$OUT/sanitizer.log" env BNEXT_SANITIZER_TIMEOUT=70 PYTHON="$PYTHON" \
    "$ROOT/.ci/compute_sanitizer.sh" --tools memcheck,racecheck tests/test_cuda_parity.py::test_sanitizer_subset
fi

if [ "$BENCH" = 1 ]; then
  run_step bench 150 "$OUT/bench.log" "$PYTHON" benchmarks/bench_gpu.py --json "$OUT/bench.json"
fi

report finish
echo "gpu_check: $( [ $status -eq 0 ] && echo 'all steps passed' || echo 'FAILED' ) in $((SECONDS - START)) s; see $OUT/summary.md" >&2
exit $status
