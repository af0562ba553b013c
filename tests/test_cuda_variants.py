"""CUDA noisy BatchNorm and l_p normalization against the CPU kernels (skipped without a GPU)."""
import math

import pytest
import torch

import bnext
from bnext.ops import noisy_batch_norm_noise

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and bnext.build_info()["cuda"]),
                                reason="needs a CUDA GPU and a CUDA build of bnext")
PAPER = [0.5, 1.25, 0.1, 0.1]
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
SHAPES = [(8, 3, 7, 9), (2, 5, 33, 17), (64, 16), (3, 4, 5, 6, 7)]


def _layout(x, layout):
    if layout == "channels_last" and x.dim() in (4, 5):
        return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_noise_and_noisy_bn_match_cpu(shape, layout, dtype):
    x = _layout(torch.randn(shape, dtype=torch.float64) * 2 + 1, layout).to(dtype)
    seed = torch.tensor(1234567)
    s_cpu, m_cpu = noisy_batch_norm_noise(x.double(), seed, PAPER)
    s_gpu, m_gpu = noisy_batch_norm_noise(x.double().cuda(), seed, PAPER)
    # No FMA contraction and IEEE sqrt on both sides (setup.py): the same noise bit for bit.
    assert torch.equal(s_gpu.cpu(), s_cpu) and torch.equal(m_gpu.cpu(), m_cpu)
    C = shape[1]
    pd = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    w, b = torch.rand(C, dtype=pd) + 0.5, torch.randn(C, dtype=pd)
    outs = []
    for dev in ("cpu", "cuda"):
        xd = x.to(dev).requires_grad_()
        torch.manual_seed(5)  # the seed comes from the CPU generator for CUDA inputs too
        y = bnext.noisy_batch_norm(xd, None, None, w.to(dev), b.to(dev), training=True)
        g = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(dev)
        outs.append([t.double().cpu() for t in (y, *torch.autograd.grad(y, xd, g))])
    for a, r in zip(*outs):
        torch.testing.assert_close(a, r, rtol=TOL[dtype], atol=TOL[dtype] * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("p", [1, 2, math.inf])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_lp_norm_matches_cpu(p, shape, layout, dtype, training):
    x = _layout(torch.randn(shape, dtype=torch.float64) * 2 + 1, layout).to(dtype)
    C = shape[1]
    pd = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    w, b = torch.rand(C, dtype=pd) + 0.5, torch.randn(C, dtype=pd)
    rm, rn = torch.randn(C, dtype=pd), torch.rand(C, dtype=pd) + 0.5
    outs = []
    for dev in ("cpu", "cuda"):
        xd = x.to(dev).requires_grad_()
        rmd, rnd = rm.clone().to(dev), rn.clone().to(dev)
        y = bnext.lp_norm(xd, p, rmd, rnd, w.to(dev), b.to(dev), training=training)
        g = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(dev)
        outs.append([t.double().cpu() for t in (y, *torch.autograd.grad(y, xd, g), rmd, rnd)])
    for a, r in zip(*outs):
        torch.testing.assert_close(a, r, rtol=TOL[dtype], atol=TOL[dtype] * max(1.0, r.abs().max().item()))


def test_linf_ties_pick_the_same_element_as_cpu():
    x = torch.randn(4, 2, 8, 8)
    x[0, 0, 3, 3], x[2, 0, 0, 0], x[3, 1, 1, 1], x[0, 1, 7, 7] = 9.0, -9.0, 9.0, -9.0
    for layout in ("contiguous", "channels_last"):
        xs = _layout(x, layout)
        a = torch.ops.bnext.lp_norm_forward(xs, math.inf, None, None, None, None, True, 1e-5)[3]
        b = torch.ops.bnext.lp_norm_forward(xs.cuda(), math.inf, None, None, None, None, True, 1e-5)[3]
        assert a.tolist() == b.cpu().tolist() == [3 * 8 + 3, 7 * 8 + 7]
