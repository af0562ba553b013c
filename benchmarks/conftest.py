"""Shared set-up of the benchmarks: allocator tuning, a fixed thread count, copy bandwidth.

Environment:
  BNEXT_BENCH_UNTUNED=1   keep glibc's default allocator settings (by default the session calls
                          bnext.tune_cpu_allocator() first, see bnext/allocator.py)
  BNEXT_BENCH_THREADS=n   torch CPU threads (default: every CPU this process may run on)
  BNEXT_BENCH_ROUNDS=n    timed rounds per benchmark (default 30)
"""
import os
import platform
import statistics
import subprocess
import time

import pytest
import torch

import bnext

ROUNDS = int(os.environ.get("BNEXT_BENCH_ROUNDS", "30"))
UNTUNED = os.environ.get("BNEXT_BENCH_UNTUNED", "0") == "1"
THREADS = int(os.environ.get("BNEXT_BENCH_THREADS", str(len(os.sched_getaffinity(0)))))

# Set once, before any tensor is allocated or any torch.compile'd kernel is generated.
ALLOCATOR_TUNED = False if UNTUNED else bnext.tune_cpu_allocator()
torch.set_num_threads(THREADS)

_copy_gbps = {}
# Other processes on the machine skew the timings: the 1-minute load average at start and end is
# recorded with the results (machine_info["bnext"]["loadavg"]).
_loadavg = {"start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_gbps(numel, dtype, device, reps=40):
    """Median bandwidth of dst.copy_(src) between two preallocated tensors, counting 2 passes
    (read src, write dst), in GB/s (1e9 bytes)."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    for _ in range(5):
        dst.copy_(src)
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * numel * src.element_size() / statistics.median(times) / 1e9


@pytest.fixture(scope="session")
def copy_gbps():
    """copy_gbps(numel, dtype, device, fresh=False) -> copy bandwidth measured in this run: the first
    measurement per size (cached, also recorded in machine_info), or with fresh=True a new one taken
    now (the bandwidth of this shared machine drifts during a run: neighbours come and go)."""
    def get(numel, dtype, device, fresh=False):
        key = (numel, str(dtype), str(device))
        if fresh:
            value = measure_copy_gbps(numel, dtype, torch.device(device))
            _copy_gbps.setdefault(key, value)
            return value
        if key not in _copy_gbps:
            _copy_gbps[key] = measure_copy_gbps(numel, dtype, torch.device(device))
        return _copy_gbps[key]
    return get


def _lscpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor()
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["bnext"] = {
        "cpu_model": _lscpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bnext_cpu_isa_cap": os.environ.get("BNEXT_CPU_ISA", "none"),
        "bnext_build": bnext.build_info(),
        "allocator_tuned": ALLOCATOR_TUNED,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "copy_gbps": {f"{k[0]} x {k[1]} on {k[2]}": v for k, v in _copy_gbps.items()},
        "loadavg": {"start": _loadavg["start"], "end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
    }


def pytest_report_header(config):
    return (f"bnext benchmarks: torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"allocator {'tuned' if ALLOCATOR_TUNED else 'default (BNEXT_BENCH_UNTUNED=1)'}")
