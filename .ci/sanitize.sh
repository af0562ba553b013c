#!/usr/bin/env bash
# Builds the CPU extension with AddressSanitizer + UndefinedBehaviorSanitizer in a scratch copy of
# the tree and runs the CPU tests against it. Usage: .ci/sanitize.sh [pytest args...]
# (default: the op tests). Needs the current Python environment to have torch and the test extras.
#
# .ci/sanitize.sh thread: ThreadSanitizer on the CUDA kernels instead. The SIMT emulation
# (csrc/simt, tests/simt.py) of csrc/cuda/batch_norm.cu (its reductions, merges and elementwise
# passes) is built with -fsanitize=thread into build/simt-thread and run with one OS thread per CUDA
# thread in subprocesses with libtsan preloaded: a planted missing __syncthreads must be reported as
# a data race, and BatchNorm's kernels must run without one (tests/test_simt.py -k tsan).
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
if [ "${1:-}" = "thread" ]; then
  shift
  cd "$src"
  echo "sanitize: ThreadSanitizer on the SIMT emulation of csrc/cuda" >&2
  BNEXT_SIMT_TSAN=1 MAX_JOBS="${MAX_JOBS:-1}" exec python -m pytest -q -p no:cacheprovider tests/test_simt.py -k tsan "$@"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git -C "$src" ls-files -z --cached --others --exclude-standard | (cd "$src" && xargs -0 cp --parents -t "$work")
cd "$work"
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
echo "sanitize: building the CPU extension with $san" >&2
BNEXT_DEBUG=1 CFLAGS="$san" CXXFLAGS="$san" LDFLAGS="$san" BNEXT_CUDA=0 python setup.py -q build_ext --inplace >/dev/null
asan_lib="$(gcc -print-file-name=libasan.so)"
ubsan_lib="$(gcc -print-file-name=libubsan.so)"
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(tests/test_batch_norm.py tests/test_fuzz.py tests/test_grad_stats.py
                                 tests/test_noisy_batch_norm.py tests/test_lp_norm.py
                                 tests/test_sync.py tests/test_bad_input.py tests/test_numerics.py
                                 tests/test_hardening.py)
existing=()
for t in "${tests[@]}"; do [ -e "${t%%::*}" ] || [[ "$t" == -* ]] && existing+=("$t") || true; done
# Python itself is not instrumented: leak checking would report the interpreter's own allocations.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# ASan's quarantine keeps freed memory resident: the resident-memory (leak) tests skip themselves.
export BNEXT_SANITIZE=1
LD_PRELOAD="$asan_lib $ubsan_lib" PYTHONPATH="$work" python -m pytest -q -p no:cacheprovider -x \
  -k "not compile" "${existing[@]}"
