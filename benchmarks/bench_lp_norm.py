"""l_p normalization (p = 1, 2, inf), training mode: bnext.lp_norm against the same computation
composed from PyTorch eager ops (bnext.ops.lp_norm_reference) and torch.compile of that composition.

    pytest benchmarks/bench_lp_norm.py --benchmark-only [--benchmark-json out.json]

GB/s counts the minimal tensor passes (conftest.PASSES: forward 2, forward+backward 5) against the
copy bandwidth measured in the same run (conftest.copy_gbps). Shapes: SHAPES below.
"""
import math

import pytest
import torch

import bnext
from bnext.ops import lp_norm_reference
from conftest import PASSES, time_fused_op

SHAPES = [(128, 64, 32, 32)]
LAYOUTS = ["contiguous", "channels_last"]
NORMS = {"l1": 1, "l2": 2, "linf": math.inf}
IMPLS = ["bnext", "eager", "compile"]


def make_fn(norm, impl):
    p = NORMS[norm]
    if impl == "bnext":
        return lambda x, w, b: bnext.lp_norm(x, p, None, None, w, b, True)
    fn = lambda x, w, b: lp_norm_reference(x, p, w, b, None, None, None, True, 1e-5)  # noqa: E731
    return torch.compile(fn) if impl == "compile" else fn


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", list(PASSES))
@pytest.mark.parametrize("norm", list(NORMS))
def bench_lp_norm(benchmark, copy_gbps, norm, op, shape, layout, impl):
    time_fused_op(benchmark, copy_gbps, make_fn(norm, impl), op, shape, layout,
                   f"{norm} {op} {'x'.join(map(str, shape))} {layout}", bench="lp_norm", variant=norm, impl=impl)
