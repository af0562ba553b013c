"""Noisy BatchNorm, training mode: bnext.noisy_batch_norm against the same computation composed from
PyTorch eager ops (conftest.noisy_batch_norm_eager) and torch.compile of that composition.

    pytest benchmarks/bench_noisy_batch_norm.py --benchmark-only [--benchmark-json out.json]

The eager composition has to materialize its noise (torch.randn_like / torch.rand_like); bnext draws it
inside the kernel. GB/s counts the minimal tensor passes (conftest.PASSES: forward 2, forward+backward
5) against the copy bandwidth measured in the same run (conftest.copy_gbps). Shapes: SHAPES below.
"""
import pytest
import torch

import bnext
from conftest import PASSES, time_fused_op, noisy_batch_norm_eager

SHAPES = [(128, 64, 32, 32)]
LAYOUTS = ["contiguous", "channels_last"]
IMPLS = ["bnext", "eager", "compile"]


def make_fn(impl):
    if impl == "bnext":
        return lambda x, w, b: bnext.noisy_batch_norm(x, None, None, w, b, True)
    return torch.compile(noisy_batch_norm_eager) if impl == "compile" else noisy_batch_norm_eager


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", list(PASSES))
def bench_noisy_batch_norm(benchmark, copy_gbps, op, shape, layout, impl):
    time_fused_op(benchmark, copy_gbps, make_fn(impl), op, shape, layout,
                   f"noisy_batch_norm {op} {'x'.join(map(str, shape))} {layout}",
                   bench="noisy_batch_norm", impl=impl)
