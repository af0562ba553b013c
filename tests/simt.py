"""The SIMT emulation of bnext's CUDA backend (csrc/simt): csrc/cuda/<op>.cu compiled as host C++ and
run on the CPU, one fiber per CUDA thread. Test-only: nothing in bnext/ or setup.py imports it.

    ns = simt.load()            # torch.ops.bnext_simt: the CUDA backend's ops, for CPU tensors
    ns.batch_norm_forward(x, ...)   # same names and schemas as torch.ops.bnext
    with simt.sm_count(7): ...  # the SM count cudaDeviceGetAttribute reports (reduction plans)

load() builds once into build/simt (torch.utils.cpp_extension.load: later calls, in this process or
the next, reuse the build unless a source changed) and returns the namespace.
"""
import contextlib
import os
from pathlib import Path

import torch

import bnext  # noqa: F401  (defines torch.ops.bnext, whose schemas bnext_simt copies)

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
# registration.cpp includes planted.cpp and csrc/running_stats.cpp (one translation unit)
SOURCES = ["simt.cpp", "registration.cpp", "cuda_batch_norm.cpp", "cuda_noisy_batch_norm.cpp", "cuda_lp_norm.cpp",
           "cuda_sync.cpp", "cuda_grad_stats.cpp"]
# The ThreadSanitizer build's subset: BatchNorm's kernels (reductions with their shuffles and barrier,
# merges, elementwise passes) and the planted kernels.
SOURCES_TSAN = ["simt.cpp", "registration.cpp", "cuda_batch_norm.cpp"]
# The ops of torch.ops.bnext with a CUDA kernel (csrc/registration.cpp's register_backend).
OPS = ["batch_norm_forward", "batch_norm_backward", "noisy_batch_norm_forward", "noisy_batch_norm_backward",
       "lp_norm_forward", "lp_norm_backward", "grad_stats", "multi_axpy", "batch_norm_stats", "lp_norm_stats",
       "sync_backward_elementwise", "noise_apply", "update_running_stats"]

_LIB = None
_LOADED = {}


def _flags(sanitize):
    # -ffp-contract=off: no fused multiply-add, as nvcc --fmad=false (setup.py) and the CPU build;
    # csrc/simt/include first, so the kernels' CUDA and c10/cuda includes reach the emulator, and
    # cuda_runtime.h included first in every file, as nvcc does.
    flags = ["-O2", "-std=c++17", "-DBNEXT_SIMT", "-ffp-contract=off", "-fvisibility=hidden",
             "-fvisibility-inlines-hidden", "-Wno-unknown-pragmas", f"-I{CSRC / 'simt' / 'include'}",
             "-include", str(CSRC / "simt" / "include" / "cuda_runtime.h")]
    if sanitize == "thread":
        flags += ["-fsanitize=thread", "-g", "-fno-omit-frame-pointer", "-DBNEXT_SIMT_BATCH_NORM_ONLY"]
    return flags


def _define_schemas():
    global _LIB
    if _LIB is not None:
        return
    _LIB = torch.library.Library("bnext_simt", "DEF")
    for name in OPS:
        schema = str(getattr(torch.ops.bnext, name).default._schema)
        _LIB.define(schema.split("::", 1)[1])


def load(sanitize=None, verbose=False):
    """Builds (once) and loads the emulated CUDA backend; returns torch.ops.bnext_simt.
    sanitize="thread" builds BatchNorm's kernels (SOURCES_TSAN) with ThreadSanitizer into
    build/simt-thread (OS-thread mode only; the process must run with libtsan preloaded, see
    .ci/sanitize.sh)."""
    key = sanitize or "plain"
    if key not in _LOADED:
        from torch.utils import cpp_extension

        _define_schemas()
        name = "bnext_simt" if sanitize is None else f"bnext_simt_{sanitize}"
        build = ROOT / "build" / ("simt" if sanitize is None else f"simt-{sanitize}")
        build.mkdir(parents=True, exist_ok=True)
        ldflags = ["-fsanitize=thread"] if sanitize == "thread" else []
        jobs = os.environ.get("MAX_JOBS")
        os.environ["MAX_JOBS"] = jobs or "1"  # the CI machine has two cores (one compile at a time)
        try:
            sources = SOURCES if sanitize is None else SOURCES_TSAN
            cpp_extension.load(name=name, sources=[str(CSRC / "simt" / s) for s in sources],
                               extra_cflags=_flags(sanitize), extra_ldflags=ldflags, build_directory=str(build),
                               is_python_module=False, verbose=verbose)
        finally:
            if jobs is None:
                del os.environ["MAX_JOBS"]
        _LOADED[key] = True
    return torch.ops.bnext_simt


def ctl():
    """torch.ops.bnext_simt_ctl: set_sm_count, sm_count, set_mode, mode, launch_stats, to_16bit,
    from_16bit, umulhi, planted."""
    load()
    return torch.ops.bnext_simt_ctl


@contextlib.contextmanager
def _temporarily(get, set_, value):
    """set_(value) inside the block, the value get() gave before restored after it."""
    old = get()
    set_(value)
    try:
        yield
    finally:
        set_(old)


def sm_count(n):
    """The SM count the emulated device reports inside the block."""
    c = ctl()
    return _temporarily(c.sm_count, c.set_sm_count, n)


def mode(m):
    """'fiber' (default) or 'os' (one OS thread per CUDA thread) inside the block."""
    c = ctl()
    return _temporarily(c.mode, c.set_mode, m)
