"""Shared set-up of the benchmarks: allocator tuning, a fixed thread count, copy bandwidth; and the
pieces several benchmark files use: a synchronized step, the fused-op-vs-composition benchmark body,
noisy BatchNorm from eager ops, the landscape benchmarks' VGG-16, reading result JSON files.

Environment:
  BNEXT_BENCH_UNTUNED=1   keep glibc's default allocator settings (by default the session calls
                          bnext.tune_cpu_allocator() first, see bnext/allocator.py)
  BNEXT_BENCH_THREADS=n   torch CPU threads (default: every CPU this process may run on)
  BNEXT_BENCH_ROUNDS=n    timed rounds per benchmark (default 30)
"""
import json
import os
import platform
import statistics
import subprocess
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

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


def synced(step, device):
    """step, followed by a CUDA synchronize when device is "cuda" (so a timing covers the kernels)."""
    if device != "cuda":
        return step

    def run():
        out = step()
        torch.cuda.synchronize()
        return out
    return run


def noisy_batch_norm_eager(x, w, b, eps=1e-5):
    """Noisy BN's Algorithm 1 from eager ops: BN with batch statistics, then s * y + m with the noise
    materialized by torch.rand / torch.randn (noise constants 0.5, 1.25, 0.1, 0.1)."""
    y = F.batch_norm(x, None, None, w, b, True, 0.1, eps)
    view = [1, -1] + [1] * (x.dim() - 2)
    C = x.shape[1]
    mu = (torch.rand(C, device=x.device) * 2 - 1) * 0.5
    sigma = 1 + torch.rand(C, device=x.device) * 0.25
    s = torch.randn_like(y) * 0.1 + sigma.view(view)
    m = (torch.rand_like(y) * 2 - 1) * 0.1 + mu.view(view)
    return s * y + m


# Tensor passes a normalization must make: forward reads x and writes y; forward+backward also reads
# dy and x and writes dx.
PASSES = {"fwd": 2, "fwd_bwd": 5}


def time_fused_op(benchmark, copy_gbps, fn, op, shape, layout, group, **info):
    """Times fn(x, w, b) on fp32 CPU inputs of `shape` in `layout` ("contiguous" or "channels_last"),
    forward only (op "fwd", no autograd) or forward + the gradients of x, w, b (op "fwd_bwd"); three
    warm-up calls first (torch.compile compiles there). Records GB/s over PASSES[op] tensor passes
    against the copy bandwidth of the run, and `info` in extra_info."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    grad = op != "fwd"
    C = shape[1]
    x = torch.randn(shape)
    dy = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(grad)
    w = (torch.rand(C) + 0.5).requires_grad_(grad)
    b = torch.randn(C).requires_grad_(grad)

    def step():
        if not grad:
            with torch.no_grad():
                return fn(x, w, b)
        return torch.autograd.grad(fn(x, w, b), (x, w, b), dy)

    for _ in range(3):
        step()
    benchmark.group = group
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    nbytes = PASSES[op] * x.numel() * x.element_size()
    copy = copy_gbps(x.numel(), torch.float32, "cpu")
    benchmark.extra_info.update(op=op, shape=list(shape), layout=layout, bytes=nbytes, passes=PASSES[op],
                                copy_gbps=copy, **info)
    if benchmark.stats is not None:
        gbps = nbytes / benchmark.stats.stats.median / 1e9
        benchmark.extra_info.update(gbps=gbps, fraction_of_copy=gbps / copy)


VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16(width=1.0, num_classes=10):
    """Flat Sequential: conv -> bnext BN -> ReLU blocks, max-pools, 3 linear layers (16 layers)."""
    layers, c = [], 3
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        out = max(1, int(round(v * width)))
        layers += [nn.Conv2d(c, out, 3, padding=1), bnext.nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        c = out
    hidden = max(1, int(round(512 * width)))
    layers += [nn.Flatten(), nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
               nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


def benchmark_rows(paths, benches):
    """(benchmark entry, its extra_info) of every row of the pytest-benchmark JSON files `paths` whose
    extra_info["bench"] is in `benches`."""
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for bench in data["benchmarks"]:
            info = bench.get("extra_info", {})
            if info.get("bench") in benches:
                yield bench, info


def ratio_table(paths, baselines):
    """Markdown table: median per variant and the ratio of bnext's variant to each baseline;
    baselines maps a bench name to (bnext's variant, [baseline variants])."""
    rows = {}
    for bench, info in benchmark_rows(paths, baselines):
        rows.setdefault((info["device"], info["bench"], bench["group"]), {})[info["variant"]] = \
            (bench["stats"]["median"], info)
    lines = ["| device | benchmark | variant | median (ms) | speedup of bnext's variant | GB/s (of copy) |",
             "|---|---|---|---|---|---|"]
    for (device, name, group), variants in rows.items():
        ours, bases = baselines[name]
        t_ours = variants.get(ours, (None,))[0]
        for v in [ours] + bases:
            if v not in variants:
                continue
            t, info = variants[v]
            speed = "" if v == ours or t_ours is None else f"{t / t_ours:.2f}x"
            bw = f"{info['gbps']:.1f} ({info['fraction_of_copy']:.0%})" if "gbps" in info else ""
            lines.append(f"| {device} | {group} | {v} | {t * 1e3:.2f} | {speed} | {bw} |")
    return "\n".join(lines)
