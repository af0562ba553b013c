#!/usr/bin/env bash
# Compile-only check of every CUDA source (csrc/**/*.cu) for sm_90, against the installed torch's
# headers. CUDA cannot run on the CI machine; this catches everything short of running.
#
# The flags mirror what setup.py's CUDAExtension passes to nvcc (torch's COMMON_NVCC_FLAGS, the
# NVCC_FLAGS of setup.py, BNEXT_WITH_CUDA, the torch C++ ABI), plus one define a real CUDA
# torch does not need: the CPU wheel ships c10/cuda headers but not
# c10/cuda/impl/cuda_cmake_macros.h, so -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it.
#
# Usage: .ci/compile_cuda.sh            (uses $PYTHON or python from PATH, nvcc from PATH or $CUDA_HOME)
#   TORCH_INCLUDE=DIR   compile against another torch's headers (DIR = that torch's torch/include, e.g.
#                       unzipped from the wheel the GPU machine uses, torch 2.11.0+cu130: see
#                       `pip download torch==2.11.0 --no-deps --python-version 3.12
#                       --only-binary=:all:` then `unzip WHEEL 'torch/include/*'`), so header drift
#                       between the torch here and the GPU machine's shows here
#   HOST=1              also compile every host C++ source (csrc/**/*.cpp) with g++, syntax only, against
#                       the same headers (setup.py builds them into the same extension)
# Exit status: 0 when every file compiles, or when nvcc is absent (skipped, with a message);
# non-zero when any file fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

NVCC="$(command -v nvcc || true)"
if [[ -z "$NVCC" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
  NVCC="$CUDA_HOME/bin/nvcc"
fi
if [[ -z "$NVCC" ]]; then
  echo "compile_cuda: SKIPPED: nvcc not found (not on PATH, no \$CUDA_HOME/bin/nvcc)"
  exit 0
fi

# Include paths, ABI flag and torch's own nvcc flags, from the installed torch (include paths from
# $TORCH_INCLUDE when given, laid out as torch.utils.cpp_extension.include_paths() lays out its own).
mapfile -t TORCH_FLAGS < <(TORCH_INCLUDE="${TORCH_INCLUDE:-}" "$PYTHON" - <<'PY'
import os, sysconfig
import torch
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths
root = os.environ["TORCH_INCLUDE"]
paths = [root, os.path.join(root, "torch", "csrc", "api", "include")] if root else include_paths()
for p in paths + [sysconfig.get_paths()["include"]]:
    print(f"-I{p}")
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
for f in COMMON_NVCC_FLAGS:
    print(f)
PY
)
if [[ -n "${TORCH_INCLUDE:-}" && ! -f "$TORCH_INCLUDE/torch/extension.h" ]]; then
  echo "compile_cuda: TORCH_INCLUDE=$TORCH_INCLUDE has no torch/extension.h (give that torch's torch/include)" >&2
  exit 2
fi

mapfile -t SOURCES < <(cd "$ROOT" && find csrc -name '*.cu' | sort)
[[ "${HOST:-0}" != 1 ]] || mapfile -t -O "${#SOURCES[@]}" SOURCES < <(cd "$ROOT" && find csrc -name '*.cpp' | sort)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "compile_cuda: no .cu files under csrc/"
  exit 0
fi

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

FLAGS=(-arch=sm_90 -c -O3 -std=c++17 --fmad=false -Xcompiler -fPIC
       -DBNEXT_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
       -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
       "${TORCH_FLAGS[@]}"
       # torch 2.13's headers use C++20 bit-field initializers; under the -std=c++17 of setup.py
       # both cudafe (3306) and gcc warn on every file. Silence only those two.
       -diag-suppress 3306 -Xcompiler -Wno-c++20-extensions)

JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
echo "compile_cuda: $("$NVCC" --version | grep -o 'release [0-9.]*'), ${#SOURCES[@]} file(s), $JOBS at a time"

# One nvcc per file, up to $JOBS at once; each writes its log and then its status to $OUT.
compile_one() {
  local src="$1" tag start
  tag="$OUT/$(echo "$src" | tr '/' '_')"
  start=$SECONDS
  local cmd=("$NVCC" "${FLAGS[@]}" "$src" -o "$tag.o")
  # Host sources: g++ with the flags setup.py gives them (the CUDA-only ones dropped), syntax only.
  [[ "$src" != *.cpp ]] || cmd=(g++ -fsyntax-only -std=c++17 -fPIC -fopenmp -fopenmp-simd -Wno-psabi
                               -DBNEXT_WITH_CUDA -DBNEXT_TORCH_VERSION='"check"' -DBNEXT_CUDA_ARCHS='"9.0"'
                               -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
                               -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
                               $(printf '%s\n' "${TORCH_FLAGS[@]}" | grep -E '^-[ID]') -I/usr/local/cuda/include
                               -Wno-c++20-extensions "$src")
  if (cd "$ROOT" && "${cmd[@]}") >"$tag.log" 2>&1; then
    echo "OK     $src ($((SECONDS - start)) s)" >"$tag.status"
  else
    echo "FAILED $src ($((SECONDS - start)) s)" >"$tag.status"
  fi
}
for src in "${SOURCES[@]}"; do
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; done
  compile_one "$src" &
done
wait

status=0
for src in "${SOURCES[@]}"; do
  tag="$OUT/$(echo "$src" | tr '/' '_')"
  cat "$tag.log"
  if [[ ! -f "$tag.status" ]]; then
    echo "compile_cuda: FAILED $src (no status)"
    status=1
    continue
  fi
  echo "compile_cuda: $(cat "$tag.status")"
  grep -q '^OK' "$tag.status" || status=1
done
exit $status
