"""Builds bnext._C with torch.utils.cpp_extension (ninja).

CUDA kernels are compiled when BNEXT_CUDA=1, or BNEXT_CUDA=auto (the default) and torch is a CUDA
build and an nvcc of the same CUDA major version is found. Otherwise the build is CPU-only.
torch is imported here, so build without isolation: pip install --no-build-isolation -e .
"""
import glob
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - message for users only
    sys.exit(
        "bnext: torch must be installed before building bnext, and the build must see it:\n"
        "    pip install torch && pip install --no-build-isolation -e .\n"
        "(build isolation would otherwise pull a second, possibly multi-GB CUDA, torch)."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def nvcc_version(cuda_home):
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if not nvcc or not os.path.exists(nvcc):
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def decide_cuda():
    """Returns (build_cuda, reason)."""
    mode = os.environ.get("BNEXT_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"bnext: BNEXT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "BNEXT_CUDA=0"
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
        if mode == "1":
            sys.exit(f"bnext: BNEXT_CUDA=1 but {reason}")
        return False, reason
    found = nvcc_version(cpp_extension.CUDA_HOME)
    torch_major = int(torch.version.cuda.split(".")[0])
    if found is None or found[0] != torch_major:
        reason = (f"torch uses CUDA {torch.version.cuda} but nvcc "
                  f"{'was not found' if found is None else '%d.%d' % found} (CUDA_HOME={cpp_extension.CUDA_HOME})")
        if mode == "1":
            sys.exit(f"bnext: BNEXT_CUDA=1 but {reason}")
        return False, reason
    return True, f"torch CUDA {torch.version.cuda}, nvcc {found[0]}.{found[1]}"


def cuda_archs():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return archs
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{a}.{b}" for a, b in sorted(caps))
    return "8.0;9.0"


# No FMA contraction and IEEE division and sqrt (so no --use_fast_math): the CUDA kernels then
# round every per-element formula as the CPU build does (-ffp-contract=off), and the noise is bitwise
# equal on both sides. The kernels are memory-bound or integer-bound (Philox), so this costs little.
# .ci/compile_cuda.sh passes the same flags.
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false"]


def extensions():
    build_cuda, reason = decide_cuda()
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # Baseline ISA only (never -march=native): the CPU kernels add AVX2 / AVX-512 code paths of their
    # own, chosen at run time (csrc/cpu/isa.h). No FMA contraction, so that every path
    # rounds the same way and results do not depend on the machine.
    # -Wno-psabi: the AVX helpers of csrc/cpu/noise_vec.h take and return vectors by value; they are
    # always inlined into their target-attributed entry points, so the ABI notes GCC prints are moot.
    cxx = ["-O3", "-fopenmp", "-fopenmp-simd", "-ffp-contract=off", "-std=c++17", "-DNDEBUG", "-Wno-psabi"]
    macros = [("BNEXT_TORCH_VERSION", f'"{torch.__version__}"')]
    if build_cuda:
        archs = cuda_archs()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        macros += [("BNEXT_WITH_CUDA", None), ("BNEXT_CUDA_ARCHS", f'"{archs}"')]
        print(f"bnext: building CPU + CUDA kernels for archs {archs} ({reason})", flush=True)
        return [cpp_extension.CUDAExtension(
            "bnext._C", cpp_sources + sorted(glob.glob("csrc/cuda/*.cu")),
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"])]
    print(f"bnext: building CPU-only kernels ({reason})", flush=True)
    return [cpp_extension.CppExtension(
        "bnext._C", cpp_sources, define_macros=macros,
        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]


def write_build_config(ext):
    """bnext/_build_config.py: read at import to detect a torch that differs from the build's."""
    with_cuda = any(m[0] == "BNEXT_WITH_CUDA" for m in ext.define_macros)
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    with open(os.path.join(HERE, "bnext", "_build_config.py"), "w") as f:
        f.write("# Written by setup.py at build time. Do not edit.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\nCUDA = {with_cuda!r}\nCUDA_ARCHS = {archs!r}\n")


EXTS = extensions()
write_build_config(EXTS[0])

setup(
    packages=find_packages(include=["bnext", "bnext.*"]),
    ext_modules=EXTS,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
