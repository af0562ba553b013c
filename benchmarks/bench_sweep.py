"""Shape sweep: the normalization layers at the activation sizes real networks have, training mode,
forward+backward, bnext against PyTorch eager and torch.compile in the same run.

    pytest benchmarks/bench_sweep.py --benchmark-only [--benchmark-json out.json]
    python benchmarks/bench_sweep.py out.json [more.json ...]     # the markdown tables

Shapes (SHAPES): every BatchNorm layer of the experiments' VGG (bnext/experiments/models.py) at
width 1/8 and width 1, batch 128, 32x32 input (one entry per distinct shape, `layers` = how many of
the 13 layers have it); BatchNorm1d inputs 32x256, 128x512, 4096x256, 256x4096; one 3d volume.
Layouts: NCHW and channels_last (channels_last_3d) for inputs with spatial dims.
Variants (what is timed, all with batch statistics; gradients of input, weight and bias):
  bn        bnext.batch_norm                     vs F.batch_norm                      (running stats updated)
  bn_relu   bnext.batch_norm(activation="relu")  vs F.relu(F.batch_norm(...))         (running stats updated)
  noisy_bn  bnext.noisy_batch_norm               vs BN + noise drawn with torch.rand/randn (conftest.py)
  l2        bnext.lp_norm(p=2)                   vs bnext.ops.lp_norm_reference (torch eager ops)
torch.compile of the eager composition is timed for the variants in BNEXT_SWEEP_COMPILE (default
"bn_relu": one compilation per shape and layout already takes minutes on 2 cores; "all" or "none").
BNEXT_SWEEP_QUICK=1 keeps a subset of shapes (the VGG width-1/8 layers and two BatchNorm1d shapes).

Rounds: each round runs the step `iterations` times, chosen so that a round lasts >= 1 ms, and the
number of rounds so that one implementation takes ~0.5 s (at least 5, at most BNEXT_BENCH_ROUNDS).
"""
import math
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import bnext
from bnext.ops import lp_norm_reference

from conftest import ROUNDS, noisy_batch_norm_eager

BATCH = 128


def vgg_bn_shapes(width, batch=BATCH, size=32):
    """(shape, number of layers with that shape) of the experiments' VGG-16 BatchNorm inputs (the paper's
    network; VGG-11/13/19 have the same shapes, repeated a different number of times)."""
    from bnext.experiments.models import vgg_layout
    shapes = {}
    for v in vgg_layout("vgg16"):
        if v == "M":
            size //= 2
            continue
        s = (batch, max(1, int(round(v * width))), size, size)
        shapes[s] = shapes.get(s, 0) + 1
    return list(shapes.items())


def _sweep_shapes():
    vgg8 = [(s, f"VGG 1/8 x{n}") for s, n in vgg_bn_shapes(1 / 8)]
    vgg1 = [(s, f"VGG 1 x{n}") for s, n in vgg_bn_shapes(1.0)]
    bn1d = [((32, 256), "BatchNorm1d"), ((128, 512), "BatchNorm1d"), ((4096, 256), "BatchNorm1d"),
            ((256, 4096), "BatchNorm1d")]
    vol = [((8, 32, 16, 16, 16), "3d volume")]
    if os.environ.get("BNEXT_SWEEP_QUICK", "0") == "1":
        return vgg8 + bn1d[:2]
    return vgg8 + vgg1 + bn1d + vol


SHAPES = _sweep_shapes()
WHERE = {s: w for s, w in SHAPES}
CASES = [(s, layout) for s, _ in SHAPES for layout in (["nchw", "channels_last"] if len(s) > 2 else ["nchw"])]
VARIANTS = ["bn", "bn_relu", "noisy_bn", "l2"]
IMPLS = ["bnext", "eager", "compile"]
_COMPILE = os.environ.get("BNEXT_SWEEP_COMPILE", "bn_relu")
COMPILED_VARIANTS = VARIANTS if _COMPILE == "all" else ([] if _COMPILE == "none" else _COMPILE.split(","))
EPS, MOMENTUM = 1e-5, 0.1


def make_fn(variant, impl):
    """fn(x, rm, rv, w, b) -> output, for one variant and implementation."""
    if impl == "bnext":
        if variant in ("bn", "bn_relu"):
            act = "relu" if variant == "bn_relu" else None
            return lambda x, rm, rv, w, b: bnext.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS, act)
        if variant == "noisy_bn":
            return lambda x, rm, rv, w, b: bnext.noisy_batch_norm(x, None, None, w, b, True)
        return lambda x, rm, rv, w, b: bnext.lp_norm(x, 2, None, None, w, b, True)
    if variant == "bn":
        fn = lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS)  # noqa: E731
    elif variant == "bn_relu":
        fn = lambda x, rm, rv, w, b: F.relu(F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS))  # noqa: E731
    elif variant == "noisy_bn":
        fn = lambda x, rm, rv, w, b: noisy_batch_norm_eager(x, w, b, EPS)  # noqa: E731
    else:
        fn = lambda x, rm, rv, w, b: lp_norm_reference(x, 2, w, b, None, None, None, True, EPS)  # noqa: E731
    return torch.compile(fn, dynamic=False) if impl == "compile" else fn


def make_inputs(shape, layout, seed=0):
    torch.manual_seed(seed)
    C = shape[1]
    x, dy = torch.randn(shape), torch.randn(shape)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    w = (torch.rand(C) + 0.5).requires_grad_()
    b = torch.randn(C).requires_grad_()
    return x.requires_grad_(), dy, torch.zeros(C), torch.ones(C), w, b


def plan_rounds(step, budget_s=0.5):
    """(rounds, iterations) for pedantic: rounds of >= 1 ms, ~budget_s in all."""
    t0 = time.perf_counter()
    step()
    t = max(time.perf_counter() - t0, 1e-6)
    iterations = max(1, int(1e-3 / t))
    rounds = int(min(ROUNDS, max(5, budget_s / (t * iterations))))
    return rounds, iterations


def shape_id(s):
    return "x".join(map(str, s))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape,layout", CASES, ids=[f"{shape_id(s)}-{l}" for s, l in CASES])
def bench_sweep(benchmark, shape, layout, variant, impl):
    if impl == "compile" and variant not in COMPILED_VARIANTS:
        pytest.skip(f"torch.compile baseline only for BNEXT_SWEEP_COMPILE={_COMPILE}")
    if impl == "compile":
        torch._dynamo.reset()  # a fresh cache: no recompile limit across the sweep's many shapes
    x, dy, rm, rv, w, b = make_inputs(shape, layout)
    fn = make_fn(variant, impl)

    def step():
        return torch.autograd.grad(fn(x, rm, rv, w, b), (x, w, b), dy)

    for _ in range(3):  # warm-up outside the timed region (torch.compile compiles here)
        step()
    rounds, iterations = plan_rounds(step)
    benchmark.group = f"sweep {variant} {shape_id(shape)} {layout}"
    benchmark.pedantic(step, rounds=rounds, iterations=iterations, warmup_rounds=1)
    benchmark.extra_info.update(bench="sweep", variant=variant, impl=impl, shape=list(shape), layout=layout,
                                where=WHERE[shape], threads=torch.get_num_threads())


# -------------------------------------------------------------------------------------------------
# Per-call overhead: bnext's functional API against the raw operator it calls, on small inputs
# where the wrapper's cost shows (BN + ReLU, training, running stats updated).
# -------------------------------------------------------------------------------------------------

OVERHEAD_SHAPES = [(32, 256), (128, 512), (128, 64, 1, 1)]
OVERHEAD_OPS = ["fwd", "bwd", "fwd_bwd"]


def overhead_step(impl, op, x, dy, rm, rv, w, b):
    ops = torch.ops.bnext
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    if impl == "torch":
        f = lambda: F.relu(F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS))  # noqa: E731
    elif impl == "bnext":
        f = lambda: bnext.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS, "relu")  # noqa: E731
    if op == "fwd":
        if impl == "raw":
            return lambda: ops.batch_norm_forward(xd, wd, bd, rm, rv, True, EPS, True)
        return f  # with autograd recording, as in training
    if op == "bwd":
        if impl == "raw":
            _, mean, var = ops.batch_norm_forward(xd, wd, bd, rm, rv, True, EPS, True)
            return lambda: ops.batch_norm_backward(dy, xd, wd, bd, mean, var, True, EPS, True)
        y = f()
        return lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
    if impl == "raw":
        def raw():
            _, mean, var = ops.batch_norm_forward(xd, wd, bd, rm, rv, True, EPS, True)
            return ops.batch_norm_backward(dy, xd, wd, bd, mean, var, True, EPS, True)
        return raw
    return lambda: torch.autograd.grad(f(), (x, w, b), dy)


@pytest.mark.parametrize("impl", ["raw", "bnext", "torch"])
@pytest.mark.parametrize("op", OVERHEAD_OPS)
@pytest.mark.parametrize("shape", OVERHEAD_SHAPES, ids=shape_id)
def bench_overhead(benchmark, shape, op, impl):
    x, dy, rm, rv, w, b = make_inputs(shape, "nchw")
    step = overhead_step(impl, op, x, dy, rm, rv, w, b)
    for _ in range(20):
        step()
    benchmark.group = f"overhead {op} {shape_id(shape)}"
    benchmark.pedantic(step, rounds=ROUNDS, iterations=100, warmup_rounds=1)
    benchmark.extra_info.update(bench="overhead", op=op, impl=impl, shape=list(shape), threads=torch.get_num_threads())


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------

def load(paths):
    """{(threads, bench key...): {impl: median seconds}} from pytest-benchmark JSON files."""
    import json
    rows, machine = {}, None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = machine or data.get("machine_info", {})
        for bench in data["benchmarks"]:
            info = bench.get("extra_info", {})
            if info.get("bench") == "sweep":
                key = ("sweep", info["threads"], info["variant"], tuple(info["shape"]), info["layout"], info["where"])
            elif info.get("bench") == "overhead":
                key = ("overhead", info["threads"], info["op"], tuple(info["shape"]))
            else:
                continue
            # Overhead rows: the fastest round (each the mean of 100 calls), the cost without the
            # preemptions a shared machine adds; sweep rows: the median.
            stat = "min" if key[0] == "overhead" else "median"
            rows.setdefault(key, {})[info["impl"]] = bench["stats"][stat]
    return rows, machine


def _ms(t):
    return "-" if t is None else (f"{t * 1e3:.3f}" if t < 1e-3 else f"{t * 1e3:.2f}")


def _ratio(base, ours):
    return None if base is None or ours is None else base / ours


def _x(r):
    return "-" if r is None else f"{r:.2f}x"


def _geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def sweep_tables(rows):
    """One markdown table per (threads, variant): shape, layout, medians, bnext's speedups."""
    out = []
    keys = sorted({(k[1], k[2]) for k in rows if k[0] == "sweep"}, key=lambda t: (t[0], VARIANTS.index(t[1])))
    for threads, variant in keys:
        lines = [f"#### {variant}, {threads} thread{'s' if threads > 1 else ''} (forward+backward, training)", "",
                 "| shape | where | layout | bnext ms | eager ms | compile ms | vs eager | vs compile |",
                 "|---|---|---|---:|---:|---:|---:|---:|"]
        speedups = []
        for k, r in rows.items():
            if k[0] != "sweep" or k[1] != threads or k[2] != variant:
                continue
            _, _, _, shape, layout, where = k
            ours, eager, comp = r.get("bnext"), r.get("eager"), r.get("compile")
            speedups.append(_ratio(eager, ours))
            lines.append(f"| {shape_id(shape)} | {where} | {layout} | {_ms(ours)} | {_ms(eager)} | {_ms(comp)} | "
                         f"{_x(_ratio(eager, ours))} | {_x(_ratio(comp, ours))} |")
        worst = min((s for s in speedups if s), default=None)
        lines += ["", f"Geometric mean of the speedup over eager: {_x(_geomean(speedups))}; "
                      f"slowest row: {_x(worst)}; rows: {len(speedups)}.", ""]
        out += lines
    return "\n".join(out)


def overhead_table(rows):
    lines = ["| threads | op | shape | raw op ms | bnext ms | bnext - raw (us) | torch ms |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for k, r in sorted((k, r) for k, r in rows.items() if k[0] == "overhead"):
        _, threads, op, shape = k
        raw, ours, tor = r.get("raw"), r.get("bnext"), r.get("torch")
        extra = "-" if raw is None or ours is None else f"{(ours - raw) * 1e6:.1f}"
        lines.append(f"| {threads} | {op} | {shape_id(shape)} | {_ms(raw)} | {_ms(ours)} | {extra} | {_ms(tor)} |")
    return "\n".join(lines)


def report(paths):
    rows, _ = load(paths)
    parts = []
    if any(k[0] == "overhead" for k in rows):
        parts += ["### Per-call overhead (BN + ReLU, training; fastest round of 100 calls)", "",
                  overhead_table(rows), ""]
    if any(k[0] == "sweep" for k in rows):
        parts += ["### Shape sweep", "", sweep_tables(rows)]
    return "\n".join(parts)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/bench_sweep.py run.json [more.json ...]")
    print(report(sys.argv[1:]))
