#!/usr/bin/env bash
# Runs bnext's CUDA tests under NVIDIA compute-sanitizer, once per tool: memcheck (out-of-bounds and
# misaligned device accesses, leaks of device allocations), racecheck (shared-memory data races),
# initcheck (reads of uninitialized device global memory) and synccheck (invalid __syncthreads /
# warp-synchronous usage). Needs a GPU, a CUDA build of bnext in the current Python environment
# (pip install --no-build-isolation -e . with a CUDA torch) and compute-sanitizer on PATH (or in
# $CUDA_HOME/bin). Exits with a clear message (status 2) when any of them is missing.
#
# Usage: .ci/compute_sanitizer.sh [--tools memcheck,racecheck,initcheck,synccheck] [pytest args...]
#   default pytest selection: the CUDA test files (see TESTS below), shrunk with -k where the full
#   set is too slow under the sanitizer (racecheck/initcheck slow kernels down 10-100x).
#   BNEXT_SANITIZER_TIMEOUT (seconds per tool, default 3600); PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

tools="memcheck,racecheck,initcheck,synccheck"
if [ "${1:-}" = "--tools" ]; then tools="$2"; shift 2; fi

die() { echo "compute_sanitizer.sh: $*" >&2; exit 2; }

sanitizer="$(command -v compute-sanitizer || true)"
if [ -z "$sanitizer" ]; then
  for d in "${CUDA_HOME:-}" /usr/local/cuda /opt/cuda; do
    [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ] && sanitizer="$d/bin/compute-sanitizer" && break
  done
fi
[ -n "$sanitizer" ] || die "compute-sanitizer not found (install the CUDA toolkit, or put it on PATH / set CUDA_HOME); nothing was run"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || die "no NVIDIA GPU visible (nvidia-smi -L failed); nothing was run"
"$PYTHON" - <<'EOF' || die "this Python environment has no CUDA torch, no visible GPU, or a CPU-only build of bnext (rebuild with BNEXT_CUDA=1); nothing was run"
import sys, torch, bnext
sys.exit(0 if torch.cuda.is_available() and bnext.build_info()["cuda"] else 1)
EOF

TESTS=(tests/test_cuda.py tests/test_cuda_variants.py tests/test_cuda_parity.py tests/test_cuda_runtime.py
       tests/test_grad_stats.py)
args=("$@")
[ ${#args[@]} -gt 0 ] || args=("${TESTS[@]}")

# torch's caching allocator hides out-of-bounds accesses inside its big blocks from memcheck:
# allocate each tensor separately. Synchronous launches attribute each error to its launch.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
export CUDA_LAUNCH_BLOCKING=1
timeout_s="${BNEXT_SANITIZER_TIMEOUT:-3600}"
status=0
IFS=, read -r -a tool_list <<<"$tools"
for tool in "${tool_list[@]}"; do
  case "$tool" in
    # memcheck checks every kernel (torch's too); the others only bnext's (kernel names containing
    # "bnext": everything in csrc/cuda lives in namespace bnext), torch's own kernels are not ours.
    # Leak checking is off: torch keeps device allocations (cuBLAS workspaces, globals) until exit.
    memcheck)  extra=() ;;
    racecheck) extra=(--racecheck-report hazard --kernel-name kns=bnext) ;;
    initcheck) extra=(--kernel-name kns=bnext) ;;
    synccheck) extra=(--kernel-name kns=bnext) ;;
    *) die "unknown tool '$tool' (memcheck, racecheck, initcheck, synccheck)" ;;
  esac
  sel=()
  # racecheck and initcheck are the slowest: skip the > 2^31-element test there (memcheck runs it).
  case "$tool" in racecheck|initcheck) sel=(-k "not more_than_2_to_31") ;; esac
  echo "=== compute-sanitizer --tool $tool: pytest ${args[*]} ${sel[*]}" >&2
  # --error-exitcode makes any reported error or hazard fail the run.
  timeout "$timeout_s" "$sanitizer" --tool "$tool" --error-exitcode 1 --print-limit 50 \
    --target-processes all "${extra[@]}" \
    "$PYTHON" -m pytest -q -p no:cacheprovider -x "${args[@]}" "${sel[@]}"
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "=== compute-sanitizer --tool $tool FAILED (exit $rc)" >&2
    status=1
  else
    echo "=== compute-sanitizer --tool $tool: clean" >&2
  fi
done
exit $status
