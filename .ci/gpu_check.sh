#!/usr/bin/env bash
# One command that proves bnext's CUDA path on a GPU machine, within a fixed time budget:
#   1. build bnext with CUDA against this machine's torch (all cores; the .cu files compile side by side)
#   2. the CUDA tests and the CPU/CUDA parity tests (tests/test_cuda*.py, tests/test_grad_stats.py)
#   3. the GPU benchmarks in their quick mode (benchmarks/bench_gpu.py --quick: no torch.compile)
#   4. compute-sanitizer memcheck and racecheck on a short subset (last: the slowest per kernel)
#   5. OUTDIR/summary.md and OUTDIR/results.json, rewritten after every step (.ci/gpu_report.py), so a
#      run cut off by its caller still leaves what it found
#
# Usage: .ci/gpu_check.sh OUTDIR [--no-build] [--no-sanitizer] [--no-bench] [--dry-run]
#   --no-build      use the bnext already built in this tree (a rerun after a fix that did not touch csrc/)
#   --dry-run       on a machine without a GPU: every step's command with its GPU part left out (a
#                   CPU-only build, the CUDA test files collected and skipped, the sanitizer subset
#                   collected, the benchmark code run on the CPU at small sizes), so that a broken
#                   script, import or benchmark shows here and not during the GPU lease
#   BNEXT_GPU_CHECK_BUDGET   seconds for the whole run (default 450, the sum of the step limits below:
#                            the device tool allows 600 s per command and a lease of 900 s in all, start
#                            included, so this leaves time for one rerun); every step's timeout is capped
#                            by what is left, so one hang cannot eat the budget.
#   PYTHON                   the interpreter (default python3, the machine's own)
# Files written to OUTDIR (8): summary.md results.json build.log tests.log tests_existing.log sanitizer.log
#   bench.log bench.json
# Exit status: 0 when every step passed; 1 when a step failed or timed out; 2 on bad arguments or
# when there is no GPU (a plain "no GPU" message; nothing is built or run).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
BUDGET="${BNEXT_GPU_CHECK_BUDGET:-450}"
# Step limits in seconds; they add up to the default budget (tests/test_gpu_check.py checks it).
LIMIT_SETUPTOOLS=10 LIMIT_BUILD=160 LIMIT_TESTS_NEW=90 LIMIT_TESTS_EXISTING=70 LIMIT_BENCH=60 LIMIT_SANITIZER=60

usage() { echo "usage: .ci/gpu_check.sh OUTDIR [--no-build] [--no-sanitizer] [--no-bench] [--dry-run]" >&2; exit 2; }

OUT="" BUILD=1 SANITIZER=1 BENCH=1 DRY=0
for arg in "$@"; do
  case "$arg" in
    --no-build) BUILD=0 ;;
    --no-sanitizer) SANITIZER=0 ;;
    --no-bench) BENCH=0 ;;
    --dry-run) DRY=1 ;;
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
if [ -n "$gpu_reason" ] && [ "$DRY" = 0 ]; then
  echo "gpu_check: no GPU: $gpu_reason; nothing was built or run" >&2
  report init --no-gpu "$gpu_reason" >/dev/null 2>&1 || true
  exit 2
fi

cd "$ROOT"
START=$SECONDS
if [ "$DRY" = 1 ]; then init_args=(--dry-run "${gpu_reason:-a GPU is present, but --dry-run was asked for}"); else init_args=(); fi
report init "${init_args[@]}" || { echo "gpu_check: .ci/gpu_report.py failed" >&2; exit 1; }
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

# The dry run builds what this machine can (CPU kernels only) with the same pip command. Its limits are
# four times the GPU run's: it checks that every step works, on a 2-core machine that may be busy; its
# timings say nothing about the GPU machine's.
if [ "$DRY" = 1 ]; then
  BUDGET=$((BUDGET * 4)) LIMIT_SETUPTOOLS=$((LIMIT_SETUPTOOLS * 4)) LIMIT_BUILD=$((LIMIT_BUILD * 4)) LIMIT_TESTS_NEW=$((LIMIT_TESTS_NEW * 4))
  LIMIT_TESTS_EXISTING=$((LIMIT_TESTS_EXISTING * 4)) LIMIT_BENCH=$((LIMIT_BENCH * 4)) LIMIT_SANITIZER=$((LIMIT_SANITIZER * 4))
fi
if [ "$DRY" = 1 ]; then CUDA_SWITCH=0 JOBS=$(nproc); else CUDA_SWITCH=1 JOBS=16; fi
# setup.py needs setuptools >= 77 (pyproject.toml's SPDX license); the GPU machine's Python may have an
# older one and cannot reach a registry. A wheel put in .ci/wheels before the lease (ignored by git, so pass
# it to the device tool's carry: `pip download 'setuptools>=77,<82' --no-deps -d .ci/wheels`; torch 2.11
# wants < 82) is installed from there, offline, when the machine's is too old.
if [ "$BUILD" = 1 ] && ! "$PYTHON" -c "import re, setuptools, sys; sys.exit(tuple(map(int, re.findall(r'\d+', setuptools.__version__)[:1])) < (77,))" 2>/dev/null; then
  wheel=$(ls "$ROOT"/.ci/wheels/setuptools-*.whl 2>/dev/null | tail -1)
  if [ -n "$wheel" ]; then
    run_step setuptools "$LIMIT_SETUPTOOLS" "$OUT/build.log" "$PYTHON" -m pip install --no-index --no-deps "$wheel"
  else
    echo "gpu_check: this Python's setuptools is older than 77 and .ci/wheels has none; the build will say so" >&2
  fi
fi
if [ "$BUILD" = 1 ]; then
  run_step build "$LIMIT_BUILD" "$OUT/build.log" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$JOBS" BNEXT_CUDA="$CUDA_SWITCH" \
    "$PYTHON" -m pip install --no-build-isolation --no-deps -e . \
    || { report finish; echo "gpu_check: the build failed; see $OUT/build.log" >&2; exit 1; }
fi
# The CUDA tests and the CPU/CUDA parity tests, the new ones first (each pytest run is one step, so a
# timeout in one leaves the other's results), after a check that the build really has CUDA kernels
# (else every CUDA test would skip). --durations tells the next run where the time went.
check_cuda='import bnext; info = bnext.build_info(); print(info); assert info["cuda"], "bnext was built without CUDA kernels"'
[ "$DRY" = 0 ] || check_cuda='import bnext; print(bnext.build_info())'
pytest_args=(-q -p no:cacheprovider -rfEs --durations=15)
# The dry run collects the test files (imports, parametrization) without running them: their CUDA cases
# would skip, and their CPU cases run in the normal suite anyway.
[ "$DRY" = 0 ] || pytest_args+=(--collect-only)
run_step tests-new "$LIMIT_TESTS_NEW" "$OUT/tests.log" bash -c '"$0" -c "$1" && "$0" -m pytest "${@:2}"' "$PYTHON" "$check_cuda" \
  "${pytest_args[@]}" tests/test_cuda_parity.py tests/test_cuda_runtime.py
run_step tests-existing "$LIMIT_TESTS_EXISTING" "$OUT/tests_existing.log" "$PYTHON" -m pytest "${pytest_args[@]}" \
  tests/test_cuda.py tests/test_cuda_variants.py tests/test_grad_stats.py

if [ "$BENCH" = 1 ]; then
  bench_args=(--quick --json "$OUT/bench.json")
  [ "$DRY" = 0 ] || bench_args+=(--dry-run)
  run_step bench "$LIMIT_BENCH" "$OUT/bench.log" "$PYTHON" benchmarks/bench_gpu.py "${bench_args[@]}"
fi

if [ "$SANITIZER" = 1 ]; then
  # A short subset: every kernel once, at small shapes. The dry run can only check that it is collected.
  if [ "$DRY" = 0 ]; then
    run_step sanitizer "$LIMIT_SANITIZER" "$OUT/sanitizer.log" env BNEXT_SANITIZER_TIMEOUT=$((LIMIT_SANITIZER / 2 - 5)) \
      PYTHON="$PYTHON" "$ROOT/.ci/compute_sanitizer.sh" --tools memcheck,racecheck tests/test_cuda_parity.py::test_sanitizer_subset
  else
    run_step sanitizer "$LIMIT_SANITIZER" "$OUT/sanitizer.log" "$PYTHON" -m pytest "${pytest_args[@]}" \
      tests/test_cuda_parity.py::test_sanitizer_subset
  fi
fi

report finish
echo "gpu_check: $( [ $status -eq 0 ] && echo 'all steps passed' || echo 'FAILED' ) in $((SECONDS - START)) s; see $OUT/summary.md" >&2
exit $status
