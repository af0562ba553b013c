"""Noisy BatchNorm and l_p normalization (p = 1, 2, inf): bnext's fused ops against the same
computation composed from PyTorch eager ops, and torch.compile of that composition.

GB/s counts the minimal tensor passes (forward: read x, write y = 2; forward+backward: + read dy,
read x, write dx = 5) against the copy bandwidth measured in the same run (conftest.copy_gbps).
The noisy-BN composition draws its noise with torch.randn_like / torch.rand_like (it has to
materialize it); bnext draws it inside the kernel. Shapes: BENCH_VARIANT_SHAPES in this file.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import bnext
from bnext.ops import lp_norm_reference

from conftest import ROUNDS

SHAPES = [(128, 64, 32, 32)]
LAYOUTS = ["contiguous", "channels_last"]
PASSES = {"fwd": 2, "fwd_bwd": 5}
VARIANTS = ["noisy_bn", "l1", "l2", "linf"]
IMPLS = ["bnext", "eager", "compile"]


def noisy_composite(x, w, b):
    y = F.batch_norm(x, None, None, w, b, True)
    view = [1, -1] + [1] * (x.dim() - 2)
    C = x.shape[1]
    mu = (torch.rand(C, device=x.device) * 2 - 1) * 0.5
    sigma = 1 + torch.rand(C, device=x.device) * 0.25
    s = torch.randn_like(y) * 0.1 + sigma.view(view)
    m = (torch.rand_like(y) * 2 - 1) * 0.1 + mu.view(view)
    return s * y + m


def make_fn(variant, impl):
    if variant == "noisy_bn":
        if impl == "bnext":
            return lambda x, w, b: bnext.noisy_batch_norm(x, None, None, w, b, True)
        fn = noisy_composite
    else:
        p = {"l1": 1, "l2": 2, "linf": math.inf}[variant]
        if impl == "bnext":
            return lambda x, w, b: bnext.lp_norm(x, p, None, None, w, b, True)
        fn = lambda x, w, b: lp_norm_reference(x, p, w, b, None, None, None, True, 1e-5)
    return torch.compile(fn) if impl == "compile" else fn


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", list(PASSES))
@pytest.mark.parametrize("variant", VARIANTS)
def bench_variant(benchmark, copy_gbps, variant, op, shape, layout, impl):
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
    fn = make_fn(variant, impl)

    def step():
        if not grad:
            with torch.no_grad():
                return fn(x, w, b)
        return torch.autograd.grad(fn(x, w, b), (x, w, b), dy)

    for _ in range(3):  # warm-up (torch.compile compiles here)
        step()
    benchmark.group = f"{variant} {op} {'x'.join(map(str, shape))} {layout}"
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    nbytes = PASSES[op] * x.numel() * x.element_size()
    copy = copy_gbps(x.numel(), torch.float32, "cpu")
    benchmark.extra_info.update(impl=impl, variant=variant, op=op, shape=list(shape), layout=layout,
                                bytes=nbytes, passes=PASSES[op], copy_gbps=copy)
    if benchmark.stats is not None:
        gbps = nbytes / benchmark.stats.stats.median / 1e9
        benchmark.extra_info.update(gbps=gbps, fraction_of_copy=gbps / copy)
