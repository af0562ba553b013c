"""glibc allocator tuning for large CPU activations.

glibc serves allocations above M_MMAP_THRESHOLD (dynamic, at most 32 MiB on 64-bit) with fresh
mmap()s and returns them to the OS on free, so every large activation is page-faulted again on
each step (a fresh 33.5 MB tensor: ~10 ms of page faults vs ~1 ms when the memory is reused).
Raising the mmap and trim thresholds keeps freed blocks in the heap for reuse. This is a per-
process setting, so bnext never applies it on import: call it explicitly (benchmarks and the
experiment runner do).
"""
import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_state = {"tuned": False}


def tune_cpu_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 34) -> bool:
    """Keep large freed CPU buffers in the glibc heap instead of unmapping them.

    Sets M_MMAP_THRESHOLD (allocations larger than this use mmap) and M_TRIM_THRESHOLD (free
    memory at the heap top above this is returned to the OS) through mallopt(3). Returns True
    when both settings were accepted, False on a non-glibc platform. Affects the whole process.
    """
    if not isinstance(mmap_threshold, int) or mmap_threshold <= 0:
        raise ValueError(f"tune_cpu_allocator: mmap_threshold must be a positive int, got {mmap_threshold!r}")
    if not isinstance(trim_threshold, int) or trim_threshold <= 0:
        raise ValueError(f"tune_cpu_allocator: trim_threshold must be a positive int, got {trim_threshold!r}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    clamp = (1 << 31) - 1
    ok = bool(mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, clamp)))
    ok = bool(mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, clamp))) and ok
    _state["tuned"] = ok
    return ok


def cpu_allocator_tuned() -> bool:
    """Whether tune_cpu_allocator() succeeded in this process."""
    return _state["tuned"]
