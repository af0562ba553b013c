"""BatchNorm(+ReLU), training mode: bnext vs PyTorch eager vs torch.compile of the eager composition.

    pytest benchmarks --benchmark-only [--benchmark-json out.json]
    python benchmarks/report.py out.json        # the markdown table of benchmarks/README.md

Ops (all with batch statistics and running-stat updates, as in a training step):
  fwd           y = batch_norm(x)                                   bytes counted: 2 passes (x, y)
  fwd_bwd       y = batch_norm(x); grad of (x, w, b) for a given dy  5 passes (x, y, dy, x, dx)
  fwd_bwd_relu  the same with y = relu(batch_norm(x))               5 passes
A pass is one read or one write of a tensor the size of x: the least memory traffic the op needs.
GB/s = bytes counted / median time, compared with the copy bandwidth measured right after each
benchmark in the same process (conftest.copy_gbps; the machine's bandwidth drifts during a run). Gradients use torch.autograd.grad, so nothing accumulates into .grad.
"""
import pytest
import torch
import torch.nn.functional as F

import bnext
from conftest import ROUNDS, synced

SHAPES = [(128, 64, 32, 32), (256, 128, 16, 16)]
LAYOUTS = ["nchw", "channels_last"]
OPS = {"fwd": 2, "fwd_bwd": 5, "fwd_bwd_relu": 5}  # op -> tensor passes counted
IMPLS = ["bnext", "eager", "compile"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EPS, MOMENTUM = 1e-5, 0.1


def eager_bn(x, rm, rv, w, b, relu):
    y = F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS)
    return F.relu(y) if relu else y


def bnext_bn(x, rm, rv, w, b, relu):
    return bnext.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS, "relu" if relu else None)


_compiled = {}


def compiled_bn(relu):
    """torch.compile of the eager composition, one per relu flag (recompiled per shape/layout)."""
    if relu not in _compiled:
        _compiled[relu] = torch.compile(lambda x, rm, rv, w, b: eager_bn(x, rm, rv, w, b, relu), dynamic=False)
    return _compiled[relu]


def make_step(impl, op, x, dy, rm, rv, w, b):
    """The function timed: one forward (and backward) of `impl`."""
    relu = op == "fwd_bwd_relu"
    fn = {"bnext": bnext_bn, "eager": eager_bn, "compile": compiled_bn(relu) if impl == "compile" else None}[impl]
    if impl == "compile":
        inner = fn
        fn = lambda x, rm, rv, w, b, relu: inner(x, rm, rv, w, b)  # noqa: E731
    if op == "fwd":
        def step():
            with torch.no_grad():
                return fn(x, rm, rv, w, b, relu)
    else:
        def step():
            y = fn(x, rm, rv, w, b, relu)
            return torch.autograd.grad(y, (x, w, b), dy)
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("device", DEVICES)
def bench_batch_norm(benchmark, copy_gbps, device, op, shape, layout, impl):
    if device == "cuda" and impl == "bnext" and not bnext.build_info()["cuda"]:
        pytest.skip("bnext was built without CUDA kernels")
    torch.manual_seed(0)
    dtype = torch.float32
    C = shape[1]
    grad = op != "fwd"
    x = torch.randn(shape, device=device, dtype=dtype)
    dy = torch.randn(shape, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(grad)
    w = (torch.rand(C, device=device) + 0.5).requires_grad_(grad)
    b = torch.randn(C, device=device).requires_grad_(grad)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)

    step = synced(make_step(impl, op, x, dy, rm, rv, w, b), device)
    for _ in range(3):  # warm-up outside the timed region (torch.compile compiles here)
        step()
    benchmark.group = f"{device} {op} {'x'.join(map(str, shape))} {layout}"
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    nbytes = OPS[op] * x.numel() * x.element_size()
    copy = copy_gbps(x.numel(), dtype, device, fresh=True)  # measured right after this benchmark
    benchmark.extra_info.update(bench="batch_norm", impl=impl, op=op, shape=list(shape), layout=layout, device=device,
                                dtype=str(dtype), bytes=nbytes, passes=OPS[op], copy_gbps=copy)
    if benchmark.stats is not None:
        gbps = nbytes / benchmark.stats.stats.median / 1e9
        benchmark.extra_info.update(gbps=gbps, fraction_of_copy=gbps / copy)
