"""Builds bnext._C with torch.utils.cpp_extension (ninja).

Which kernels (BNEXT_CUDA=auto, the default; 0: CPU only; 1: CUDA or stop):
  * torch is a CPU-only build                      -> CPU kernels (BNEXT_CUDA=1 stops with an error)
  * torch is a CUDA build and an nvcc of its CUDA major version is found (CUDA_HOME) -> CPU + CUDA kernels
  * torch is a CUDA build, no such nvcc, and either a GPU is visible or an nvcc of another major is
    found                                         -> the build stops and says why (pip shows a failed
    build's output, not a successful one's, so a silent CPU-only build is what this avoids); set
    BNEXT_CUDA=0 to build the CPU kernels anyway
  * torch is a CUDA build, no nvcc and no GPU      -> CPU kernels (a CUDA tensor then gets a bnext error
    that says how to rebuild: bnext/ops/checks.py)
`pip install -v` shows the "bnext: building ..." line; bnext.build_info() says the same after the build.

Release builds carry no debug information (-g0, stripped at link); BNEXT_DEBUG=1 keeps it (-g).

The build pins the torch release it compiled against (Requires-Dist: torch==<public version>) and
writes bnext/_build_config.py next to the extension it built (never on `setup.py --version` or
sdist), which `import bnext` checks (bnext/__init__.py). torch is imported here, so build without
isolation: pip install --no-build-isolation -e .
"""
import glob
import os
import re
import subprocess
import sys

import setuptools
from setuptools import Extension, find_packages, setup

# pyproject.toml's `license = "BSD-3-Clause"` (an SPDX expression) and `license-files` need
# setuptools >= 77 (PEP 639); an older one rejects the string with a schema error that does not say
# this. --no-build-isolation builds with whatever setuptools is installed, so check it here.
SETUPTOOLS_MIN = (77, 0)
if tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2]) < SETUPTOOLS_MIN:
    sys.exit(f"bnext: building needs setuptools >= {SETUPTOOLS_MIN[0]} (found {setuptools.__version__}):\n"
             "    pip install -U setuptools")

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
# The torch release bnext is compiled against, without the local tag (+cpu, +cu130): pip's `==` on
# a public version accepts any local build of it, and the CUDA build is checked at import instead.
TORCH_RELEASE = torch.__version__.split("+")[0]


def nvcc_version(cuda_home):
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if not nvcc or not os.path.exists(nvcc):
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def decide_cuda(mode, torch_cuda, nvcc, gpu_visible):
    """Returns (build_cuda, reason), or raises SystemExit with the fix when the build must stop.
    mode: BNEXT_CUDA (auto, 0, 1); torch_cuda: torch.version.cuda (None for a CPU torch); nvcc:
    (major, minor) of the nvcc found, or None; gpu_visible: whether torch sees a GPU."""
    mode = mode.lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"bnext: BNEXT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "BNEXT_CUDA=0"
    if torch_cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
        if mode == "1":
            sys.exit(f"bnext: BNEXT_CUDA=1 but {reason}: install a CUDA build of torch, or build with BNEXT_CUDA=0")
        return False, reason
    torch_major = int(torch_cuda.split(".")[0])
    if nvcc is not None and nvcc[0] == torch_major:
        return True, f"torch CUDA {torch_cuda}, nvcc {nvcc[0]}.{nvcc[1]}"
    reason = (f"torch uses CUDA {torch_cuda} but nvcc "
              f"{'was not found' if nvcc is None else '%d.%d was found' % nvcc} "
              f"(CUDA_HOME={cpp_extension.CUDA_HOME})")
    fix = (f"Install the CUDA {torch_major} toolkit and set CUDA_HOME to it, or build the CPU kernels only "
           "with BNEXT_CUDA=0.")
    if mode == "1":
        sys.exit(f"bnext: BNEXT_CUDA=1 but {reason}. {fix}")
    if nvcc is not None or gpu_visible:
        sys.exit(f"bnext: not building a CPU-only bnext by default: {reason}"
                 f"{' and a GPU is visible' if gpu_visible else ''}. {fix}")
    return False, reason + ", no GPU visible"


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

CPP_SOURCES = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))


def debug_flags(debug):
    """(cxx flags, link flags) for debug info. Python's own CFLAGS carry -g, which made a 59 MB
    extension of 5.3 MB of code (issue 27): a release build appends -g0 (the last -g flag wins) and
    strips the symbol table at link (-s; the dynamic symbols the loader needs stay)."""
    return (["-g"], []) if debug else (["-g0"], ["-s"])


def configure(ext):
    """Decides which kernels to build and sets `ext`'s sources and flags accordingly; returns the
    build configuration that _build_config.py records."""
    build_cuda, reason = decide_cuda(
        os.environ.get("BNEXT_CUDA", "auto"), torch.version.cuda, nvcc_version(cpp_extension.CUDA_HOME),
        torch.version.cuda is not None and torch.cuda.is_available())
    debug = os.environ.get("BNEXT_DEBUG", "0") == "1"
    debug_cxx, debug_link = debug_flags(debug)
    # Baseline ISA only (never -march=native): the CPU kernels add AVX2 / AVX-512 code paths of their
    # own, chosen at run time (csrc/cpu/isa.h). No FMA contraction, so that every path
    # rounds the same way and results do not depend on the machine.
    # -Wno-psabi: the AVX helpers of csrc/cpu/noise_vec.h take and return vectors by value; they are
    # always inlined into their target-attributed entry points, so the ABI notes GCC prints are moot.
    cxx = ["-O3", "-fopenmp", "-fopenmp-simd", "-ffp-contract=off", "-std=c++17", "-DNDEBUG", "-Wno-psabi"]
    cxx += debug_cxx
    macros = [("BNEXT_TORCH_VERSION", f'"{torch.__version__}"')]
    archs = ""
    if build_cuda:
        archs = cuda_archs()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        macros += [("BNEXT_WITH_CUDA", None), ("BNEXT_CUDA_ARCHS", f'"{archs}"')]
        made = cpp_extension.CUDAExtension(
            ext.name, CPP_SOURCES + sorted(glob.glob("csrc/cuda/*.cu")), define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS + (["-g", "-lineinfo"] if debug else [])},
            extra_link_args=["-fopenmp"] + debug_link)
        print(f"bnext: building CPU + CUDA kernels for archs {archs} ({reason})", flush=True)
    else:
        made = cpp_extension.CppExtension(
            ext.name, CPP_SOURCES, define_macros=macros, extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"] + debug_link)
        print(f"bnext: building CPU-only kernels ({reason})", flush=True)
    # setuptools has already finalized `ext` (private attributes such as _full_name): copy the
    # public fields of the extension torch made into it rather than replacing it.
    for field in ("sources", "include_dirs", "define_macros", "library_dirs", "libraries",
                  "runtime_library_dirs", "extra_compile_args", "extra_link_args", "language"):
        setattr(ext, field, getattr(made, field))
    return {"TORCH_VERSION": torch.__version__, "TORCH_CUDA": torch.version.cuda, "CUDA": build_cuda,
            "CUDA_ARCHS": archs, "CUDA_REASON": reason, "DEBUG": debug}


class BuildExt(cpp_extension.BuildExtension):
    """Decides the kernels only when an extension is really built (not for metadata, sdist or
    `setup.py --version`), and writes _build_config.py beside the extension it built: in the build
    directory (so it goes into the wheel) and, for in-place and editable builds, in the source tree."""

    def run(self):
        config = configure(self.extensions[0])
        super().run()
        inplace, self.inplace = self.inplace, 0
        built_dir = os.path.dirname(self.get_ext_fullpath(self.extensions[0].name))
        self.inplace = inplace
        targets = [built_dir] + ([os.path.join(HERE, "bnext")] if inplace else [])
        for d in targets:
            with open(os.path.join(d, "_build_config.py"), "w") as f:
                f.write("# Written by setup.py's build_ext with the extension beside it. Do not edit.\n")
                f.writelines(f"{k} = {v!r}\n" for k, v in config.items())


if __name__ == "__main__":
    setup(
        packages=find_packages(include=["bnext", "bnext.*"]),
        # The extension bnext itself loads; BuildExt.run fills in its sources and flags.
        ext_modules=[Extension("bnext._C", CPP_SOURCES)],
        # Pinned to the release compiled against: the extension uses torch's C++ ABI, which changes
        # between releases, so pip must not swap torch under it (pip check reports the conflict).
        install_requires=[f"torch=={TORCH_RELEASE}", "numpy", "matplotlib", "tqdm"],
        cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
    )
