"""Numerics of the CUDA kernels at |mean| >> std, run through the SIMT emulation (tests/simt.py): the
CUDA statistics keep the CPU path's guarantees (fp64 merges of per-thread partials taken around a
per-thread shift, the residual of the saved mean carried into the elementwise passes, the training
backward recentred on the batch mean; csrc/cuda/reduce.cuh, passes.cuh) for BatchNorm (+ ReLU), noisy
BatchNorm, l_p and the sync statistics ops, on two data sets:
  - tests/test_cuda.py::test_large_mean_fp32's: x = 1e4 + randn, (32, 16, 24, 24), fp32;
  - tests/test_numerics.py's extreme_case: |mean| / std up to 1.1e5, 81 values per channel, fp32.
Every check is against float64 computed here from the fp32 input, at tolerances that the fp32
rounding of the mean alone (what the kernels did before: 2^-24 |mean|, 6e-4 std at 1e4, 6.6e-3 std
at 1.1e5) exceeds, and under the reduction plans of GPUs with 1, 7 and 132 SMs."""
import math

import pytest
import torch
import torch.nn.functional as F

import simt
import test_cuda as tc
from bnext.ops import draw_seed, noisy_batch_norm_noise
from test_lp_norm import channel_norm
from test_numerics import assert_rel, extreme_case

S = simt.load()
EPS = 1e-5
LAYOUTS = ["contiguous", "channels_last"]
SMS = [1, 7, 132]
PS = [1, 2, math.inf]
P_IDS = ["p1", "p2", "pinf"]


def large_case(layout):
    """tests/test_cuda.py::test_large_mean_fp32's input and affine parameters."""
    gen = torch.Generator().manual_seed(3)
    x = (1e4 + torch.randn((32, 16, 24, 24), generator=gen, dtype=torch.float64)).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.rand(16, generator=gen) + 0.5
    b = torch.randn(16, generator=gen)
    return x, w, b


def channel_stats64(x):
    """float64 per-channel mean and sum of squared deviations of the fp32 input's exact values."""
    xd = x.double()
    mean = xd.mean((0, 2, 3))
    m2 = (xd - mean.view(1, -1, 1, 1)).square().sum((0, 2, 3))
    return mean, m2


def assert_rounded_mean(mean, mean64):
    """The saved fp32 mean is the rounding of the float64 mean: within half an fp32 ulp of it (plus
    1e-7 of the ulp for a mean that falls on a rounding boundary). One ulp off, as an fp32 merge
    leaves it, fails."""
    assert mean.dtype == torch.float32
    half_ulp = torch.finfo(torch.float32).eps * 2.0 ** torch.floor(torch.log2(mean64.abs())) / 2
    err = (mean.double() - mean64).abs()
    assert bool((err <= half_ulp * (1 + 1e-7)).all()), f"saved mean not the rounding of the float64 mean: {err / half_ulp} half-ulps"


def grads64(fn, x, w, b, g):
    """y and (grad_input, grad_weight, grad_bias) of fn in float64 (x, w, b, g cast exactly)."""
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    y = fn(xd, wd, bd)
    return y.detach(), torch.autograd.grad(y, (xd, wd, bd), g.double())


def upstream(x, seed=5):
    """An fp32 upstream gradient, 0.5 + uniform (no sign cancellation in the sums)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(x.shape, generator=gen, dtype=torch.float64) + 0.5).float().contiguous(
        memory_format=torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)


# -------------------------------------------------------------------------------------------------
# Raw ops of the emulated CUDA backend: (y, saved statistics, (grad_input, grad_weight, grad_bias))
# -------------------------------------------------------------------------------------------------

def bn_run(x, w, b, relu, g):
    y, mean, var = S.batch_norm_forward(x, w, b, None, None, True, EPS, relu)
    dx, sum_dy, sum_dy_xhat = S.batch_norm_backward(g, x, w, b, mean, var, True, EPS, relu)
    return y, (mean, var), (dx, sum_dy_xhat, sum_dy)


def noisy_run(x, w, b, noise, seed, g):
    C = x.shape[1]
    y, mean, var = S.noisy_batch_norm_forward(x, w, b, EPS, seed, noise, C)
    dx, sum_dy, sum_dy_xhat = S.noisy_batch_norm_backward(g, x, w, b, mean, var, EPS, seed, noise, C)
    return y, (mean, var), (dx, sum_dy_xhat, sum_dy)


def lp_run(x, p, w, b, g):
    y, mean, norm, argmax = S.lp_norm_forward(x, float(p), w, b, None, None, True, EPS)
    dx, sum_dy, sum_dy_xhat = S.lp_norm_backward(g, x, float(p), w, b, mean, norm, argmax, True, EPS)
    return y, (mean, norm, argmax), (dx, sum_dy_xhat, sum_dy)


def bn64(relu):
    return lambda x, w, b: (F.relu if relu else (lambda t: t))(F.batch_norm(x, None, None, w, b, training=True, eps=EPS))


def lp64(p):
    def fn(x, w, b):
        xc = x - x.mean((0, 2, 3), keepdim=True)
        return xc / (channel_norm(x, p).view(1, -1, 1, 1) + EPS) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    return fn


# -------------------------------------------------------------------------------------------------
# tests/test_cuda.py::test_large_mean_fp32's data: |mean| = 1e4 std, 18432 values per channel
# -------------------------------------------------------------------------------------------------

def check_large_outputs(y, grads, y64, grads64_):
    # Outputs and the input gradient to 1e-4 (fp32 rounding of the mean alone: ~1e-3); the weight
    # and bias gradients (sums of 18432 terms of ~1) to 1e-5 relative (without recentring the
    # weight gradient is off by (mean error) * sum g * invstd ~ 0.15 of ~250).
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[0].double(), grads64_[0], rtol=1e-4, atol=1e-4)
    for name, got, want in zip(("grad_weight", "grad_bias"), grads[1:], grads64_[1:]):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=name)


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_mean_batch_norm(layout, relu, sms):
    x, w, b = large_case(layout)
    g = upstream(x)
    mean64, m2 = channel_stats64(x)
    with simt.sm_count(sms):
        y, (mean, var), grads = bn_run(x, w, b, relu, g)
    assert_rounded_mean(mean, mean64)
    torch.testing.assert_close(var.double(), m2 / x[:, 0].numel(), rtol=1e-5, atol=0)
    check_large_outputs(y, grads, *grads64(bn64(relu), x, w, b, g))


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_mean_noisy_batch_norm(layout, sms):
    # noise (0, 1, 0, 0): s = 1 and m = 0 exactly, so the float64 reference is plain BatchNorm.
    x, w, b = large_case(layout)
    g = upstream(x)
    mean64, _ = channel_stats64(x)
    with simt.sm_count(sms):
        y, (mean, _), grads = noisy_run(x, w, b, [0.0, 1.0, 0.0, 0.0], torch.tensor(3), g)
    assert_rounded_mean(mean, mean64)
    check_large_outputs(y, grads, *grads64(bn64(False), x, w, b, g))


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("p", PS, ids=P_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_mean_lp_norm(layout, p, sms):
    # b = 0: y = (x - mean) * w / N is ~1e-4, and its own relative accuracy is what is checked.
    x, w, b = large_case(layout)
    b = b * 0
    g = upstream(x)
    mean64, _ = channel_stats64(x)
    with simt.sm_count(sms):
        y, (mean, norm, _), grads = lp_run(x, p, w, b, g)
    assert_rounded_mean(mean, mean64)
    torch.testing.assert_close(norm.double(), channel_norm(x.double(), p), rtol=1e-6, atol=0)
    y64, g64 = grads64(lp64(p), x, w, b, g)
    assert_rel(y, y64, "output", tol=1e-4)
    assert_rel(grads[0], g64[0], "grad_input", tol=1e-4)
    # grad_weight = sum g (x - mean) / (N + eps) nearly cancels in some channels: to 1e-4 of its
    # largest (without recentring it is off by (mean error) * sum g / N ~ 0.1 of that).
    for name, got, want in zip(("grad_weight", "grad_bias"), grads[1:], g64[1:]):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4 * want.abs().max().item(), msg=name)


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_mean_sync_stats(layout, sms):
    # fp64 outputs: the mean to 1e-5 std (an fp32 mean of 1e4 is up to 5e-4 off), m2 to 1e-5.
    x, _, _ = large_case(layout)
    mean64, m2_64 = channel_stats64(x)
    with simt.sm_count(sms):
        mean, m2 = S.batch_norm_stats(x)
        lp = {p: S.lp_norm_stats(x, float(p)) for p in PS}
    assert mean.dtype == torch.float64 and m2.dtype == torch.float64
    torch.testing.assert_close(mean, mean64, rtol=0, atol=1e-5)
    torch.testing.assert_close(m2, m2_64, rtol=1e-5, atol=0)
    M = x[:, 0].numel()
    xd = x.double()
    for p, (s, power, argmax) in lp.items():
        torch.testing.assert_close(s / M, mean64, rtol=0, atol=1e-5, msg=f"p={p}: sum x / M")
        want = {1: lambda: xd.abs().sum((0, 2, 3)), 2: lambda: xd.square().sum((0, 2, 3)),
                math.inf: lambda: xd.abs().amax((0, 2, 3))}[p]()
        torch.testing.assert_close(power, want, rtol=1e-6 if p != math.inf else 0, atol=0, msg=f"p={p}: power")


# -------------------------------------------------------------------------------------------------
# tests/test_numerics.py's extreme_case: |mean| / std up to 1.1e5, 81 values per channel
# -------------------------------------------------------------------------------------------------

def check_extreme(run, ref, layout, sms, zero_bias=False, tol=1e-3):
    x, w, b = extreme_case(layout)
    if zero_bias:
        b = torch.zeros_like(b)
    g = upstream(x)
    with simt.sm_count(sms):
        y, stats, grads = run(x, w, b, g)
    assert_rounded_mean(stats[0], channel_stats64(x)[0])
    y64, g64 = grads64(ref, x, w, b, g)
    for name, got, want in zip(("output", "grad_input", "grad_weight", "grad_bias"), (y,) + grads, (y64,) + g64):
        assert_rel(got, want, name, tol)


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_extreme_mean_batch_norm(layout, relu, sms):
    check_extreme(lambda x, w, b, g: bn_run(x, w, b, relu, g), bn64(relu), layout, sms)


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_extreme_mean_noisy_batch_norm(layout, sms):
    # The paper's noise; s and m for the reference are drawn by bnext's noise helper (the noise is
    # not what is tested here: it does not depend on x).
    x, _, _ = extreme_case(layout)
    seed = draw_seed(torch.Generator().manual_seed(7))
    noise = [0.5, 1.25, 0.1, 0.1]
    s, m = (t.double() for t in noisy_batch_norm_noise(x, seed, noise))
    check_extreme(lambda x, w, b, g: noisy_run(x, w, b, noise, seed, g),
                  lambda x, w, b: s * F.batch_norm(x, None, None, w, b, training=True, eps=EPS) + m, layout, sms)


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("p", PS, ids=P_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_extreme_mean_lp_norm(layout, p, sms):
    # b = 0: y = (x - mean) / N is ~1e-5, so its own relative accuracy is what is tested.
    check_extreme(lambda x, w, b, g: lp_run(x, p, w, b, g), lp64(p), layout, sms, zero_bias=True)


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_extreme_mean_sync_stats(layout, sms):
    # 81 values per channel at up to 1.1e5: the fp64 mean to 1e-6 std, m2 to 1e-6 (an fp32 merge is
    # off by up to 4e-3 in the mean and ~1% in m2).
    x, _, _ = extreme_case(layout)
    mean64, m2_64 = channel_stats64(x)
    M = x[:, 0].numel()
    with simt.sm_count(sms):
        mean, m2 = S.batch_norm_stats(x)
        s, _, _ = S.lp_norm_stats(x, 2.0)
    torch.testing.assert_close(mean, mean64, rtol=0, atol=1e-6)
    torch.testing.assert_close(m2, m2_64, rtol=1e-6, atol=0)
    torch.testing.assert_close(s / M, mean64, rtol=0, atol=1e-6)
