"""Numerics of every op: NaN/inf propagate as in torch's reference compositions (forward and backward,
compared as NaN/inf masks), statistics at |mean| = 1e4 * std in fp32, fp16/bf16 inputs whose sum
of squares overflows fp16, and 64-bit indexing (the statistics passes over > 2^31 elements by default; a
> 2^31-element BatchNorm forward and backward behind BNEXT_BIG=1)."""
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

import bnext
from bnext.ops import draw_seed, noisy_batch_norm_noise
from test_lp_norm import channel_norm, lp_norm_oracle
from tolerances import assert_rounding_close

ops = torch.ops.bnext
LAYOUTS = ["contiguous", "channels_last"]


def layout(x, name):
    return x.contiguous(memory_format=torch.channels_last) if name == "channels_last" else x


def poisoned(value, lay, dtype=torch.float32):
    """(6, 4, 3, 3) input with `value` at two positions of channel 1 and one of channel 3 (eval: also
    a -value); channels 0 and 2 stay finite."""
    torch.manual_seed(1)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    x[0, 1, 0, 0] = value
    x[4, 1, 2, 1] = value
    x[2, 3, 1, 1] = -value if not math.isnan(value) else value
    return layout(x.to(dtype), lay)


def assert_same_nonfinite(got, want, what):
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN masks differ"
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), f"{what}: +inf masks differ"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{what}: -inf masks differ"
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-4)


def run_both(fn_bnext, fn_ref, x, w, b):
    """Forward and backward (g = 1 + noise, finite) of both; returns pairs to compare."""
    xs = [x.clone().requires_grad_(), x.double().clone().requires_grad_()]
    ws = [w.clone().requires_grad_(), w.double().clone().requires_grad_()]
    bs = [b.clone().requires_grad_(), b.double().clone().requires_grad_()]
    y = fn_bnext(xs[0], ws[0], bs[0])
    yr = fn_ref(xs[1], ws[1], bs[1])
    g = torch.rand(x.shape, dtype=torch.float64) + 0.5
    got = torch.autograd.grad(y, [xs[0], ws[0], bs[0]], g.to(y.dtype))
    want = torch.autograd.grad(yr, [xs[1], ws[1], bs[1]], g)
    return [("output", y, yr)] + [(n, a, r) for n, a, r in zip(("grad_input", "grad_weight", "grad_bias"), got, want)]


VALUES = [math.nan, math.inf, -math.inf]
IDS = ["nan", "inf", "-inf"]


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("value", VALUES, ids=IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_nonfinite_like_torch(value, lay, training):
    x = poisoned(value, lay)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    for relu in (False, True):
        pairs = run_both(
            lambda x, w, b: bnext.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, "relu" if relu else None),
            lambda x, w, b: (lambda y: y.relu() if relu else y)(
                F.batch_norm(x, rm.double().clone(), rv.double().clone(), w, b, training, 0.1, 1e-5)), x, w, b)
        for name, a, r in pairs:
            assert_same_nonfinite(a, r, f"{name} (relu={relu})")
    # running stats: the poisoned channels become NaN/inf exactly as in torch
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.double().clone(), rv.double().clone()
    bnext.batch_norm(x, rm1, rv1, w, b, True, 0.1, 1e-5)
    F.batch_norm(x.double(), rm2, rv2, w.double(), b.double(), True, 0.1, 1e-5)
    if math.isinf(value):
        # Known difference (README, "Numerics"): the batch mean of a channel holding +-inf is NaN in
        # bnext (Welford: inf - inf) where torch's sum / count gives +-inf; the variance and the
        # output are NaN in both.
        assert torch.equal(torch.isfinite(rm1), torch.isfinite(rm2)), "running_mean: non-finite masks differ"
        torch.testing.assert_close(rm1[torch.isfinite(rm2)].double(), rm2[torch.isfinite(rm2)], rtol=1e-4, atol=1e-4)
    else:
        assert_same_nonfinite(rm1, rm2, "running_mean")
    assert_same_nonfinite(rv1, rv2, "running_var")


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_noisy_batch_norm_nonfinite_like_torch(value, lay):
    x = poisoned(value, lay)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    seed_gen = 11
    s, m = noisy_batch_norm_noise(x.double(), draw_seed(torch.Generator().manual_seed(seed_gen)), [0.5, 1.25, 0.1, 0.1])
    pairs = run_both(
        lambda x, w, b: bnext.noisy_batch_norm(x, None, None, w, b, True, generator=torch.Generator().manual_seed(seed_gen)),
        lambda x, w, b: s * F.batch_norm(x, None, None, w, b, True) + m, x, w, b)
    for name, a, r in pairs:
        assert_same_nonfinite(a, r, name)


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("value", VALUES, ids=IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [1, 2, math.inf], ids=["p1", "p2", "pinf"])
def test_lp_norm_nonfinite_like_torch(value, lay, training, p):
    x = poisoned(value, lay)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    rm, rn = torch.randn(4), torch.rand(4) + 0.5
    pairs = run_both(lambda x, w, b: bnext.lp_norm(x, p, rm.clone(), rn.clone(), w, b, training, 0.1, 1e-5),
                     lambda x, w, b: lp_norm_oracle(x, p, w, b, rm.double(), rn.double(), training), x, w, b)
    for name, a, r in pairs:
        assert_same_nonfinite(a, r, name)
    if training:
        # the statistics themselves: mean and N_p of the poisoned channels as torch computes them
        _, mean, norm, _ = ops.lp_norm_forward(x, float(p), None, None, None, None, True, 1e-5)
        xd = x.double()
        assert_same_nonfinite(mean, xd.mean([0, 2, 3]), "mean")
        want = {1: lambda: xd.abs().mean([0, 2, 3]), 2: lambda: xd.square().mean([0, 2, 3]).sqrt(),
                math.inf: lambda: xd.abs().amax([0, 2, 3])}[p]()
        assert_same_nonfinite(norm, want, "norm")


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_grad_stats_and_multi_axpy_nonfinite_like_torch(value):
    torch.manual_seed(2)
    a = [torch.randn(70000), torch.randn(5, 3), torch.randn(4)]
    b = [t + 0.1 * torch.randn_like(t) for t in a]
    a[0][66000] = value  # in the second chunk
    b[1][2, 1] = value
    a[2][0] = value
    b[2][0] = value
    got = bnext.grad_stats(a, b)
    want = torch.stack([torch.stack([(x.double() ** 2).sum(), (y.double() ** 2).sum(), ((x.double() - y.double()) ** 2).sum(),
                                     (x.double() * y.double()).sum()]) for x, y in zip(a, b)])
    assert_same_nonfinite(got, want, "grad_stats")
    etas = [0.0, 0.5, -2.0]
    out = bnext.multi_axpy(a, b, etas)
    for x, d, o in zip(a, b, out):
        want = torch.stack([x.double() - e * d.double() for e in etas])
        assert_same_nonfinite(o, want, "multi_axpy")


# -------------------------------------------------------------------------------------------------
# |mean| = 1e4 * std in fp32: statistics must not lose the variance to cancellation
# -------------------------------------------------------------------------------------------------

def shifted(lay, shift=1e4, shape=(16, 3, 32, 32)):
    torch.manual_seed(3)
    x = torch.randn(shape, dtype=torch.float64) + shift * torch.tensor([1.0, -1.0, 0.5]).view(1, 3, 1, 1)
    return layout(x.float(), lay)


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("op", ["batch_norm", "noisy_batch_norm"])
def test_large_mean_statistics_fp32(lay, op):
    x = shifted(lay)
    xd = x.double()
    if op == "batch_norm":
        y, mean, var = ops.batch_norm_forward(x, None, None, None, None, True, 1e-5, False)
    else:
        y, mean, var = ops.noisy_batch_norm_forward(x, None, None, 1e-5, torch.tensor(3), [0.0, 1.0, 0.0, 0.0], 3)
    # std = 1: the mean to 1e-3 std (fp32 rounding of 1e4 alone is 6e-4), the variance to 1e-4
    torch.testing.assert_close(mean.double(), xd.mean([0, 2, 3]), rtol=0, atol=1e-3)
    torch.testing.assert_close(var.double(), xd.var([0, 2, 3], unbiased=False), rtol=1e-4, atol=0)
    # noise (0, 1, 0, 0): s = 1, m = 0, the output is plain BatchNorm
    torch.testing.assert_close(y.double(), F.batch_norm(xd, None, None, training=True), rtol=1e-3, atol=1e-3)
    # backward: grad of sum(y * g) keeps the 1e-4-relative structure
    xr = x.clone().requires_grad_()
    g = torch.randn(x.shape)
    fn = bnext.batch_norm if op == "batch_norm" else (
        lambda x, *a, **k: bnext.noisy_batch_norm(x, *a, noise_mean=0, noise_std=1, noise_mean_spread=0, noise_std_spread=0, **k))
    (dx,) = torch.autograd.grad(fn(xr, None, None, training=True), xr, g)
    xdr = xd.clone().requires_grad_()
    (dxr,) = torch.autograd.grad(F.batch_norm(xdr, None, None, training=True), xdr, g.double())
    torch.testing.assert_close(dx.double(), dxr, rtol=1e-3, atol=1e-3 * dxr.abs().max().item())


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("p", [1, 2, math.inf], ids=["p1", "p2", "pinf"])
def test_large_mean_statistics_lp_norm_fp32(lay, p):
    x = shifted(lay)
    xd = x.double()
    y, mean, norm, _ = ops.lp_norm_forward(x, float(p), None, None, None, None, True, 1e-5)
    torch.testing.assert_close(mean.double(), xd.mean([0, 2, 3]), rtol=0, atol=1e-3)  # std = 1
    want = {1: lambda: xd.abs().mean([0, 2, 3]), 2: lambda: xd.square().mean([0, 2, 3]).sqrt(),
            math.inf: lambda: xd.abs().amax([0, 2, 3])}[p]()
    torch.testing.assert_close(norm.double(), want, rtol=1e-7, atol=0)
    # y = (x - mean) / N is ~1e-4: relative accuracy of the centered values
    yr = (xd - xd.mean([0, 2, 3], keepdim=True)) / (want.view(1, 3, 1, 1) + 1e-5)
    torch.testing.assert_close(y.double(), yr, rtol=0, atol=1e-3 * yr.abs().max().item())


def test_large_mean_grad_stats_and_multi_axpy_fp32():
    torch.manual_seed(4)
    a = [(torch.randn(200000, dtype=torch.float64) + 1e4).float(), (torch.randn(3, 7, dtype=torch.float64) - 1e4).float()]
    b = [(t.double() + torch.randn(t.shape, dtype=torch.float64)).float() for t in a]
    got = bnext.grad_stats(a, b)
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = x.double(), y.double()
        want = torch.stack([(x * x).sum(), (y * y).sum(), ((x - y) ** 2).sum(), (x * y).sum()])
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=0)  # ||a - b||^2 ~ 1e-8 of ||a||^2: no cancellation
    out = bnext.multi_axpy(a, b, [1.0])
    for x, y, o in zip(a, b, out):
        torch.testing.assert_close(o[0].double(), x.double() - y.double(), rtol=0, atol=1e-3)


# -------------------------------------------------------------------------------------------------
# fp16/bf16 inputs whose sum of squares overflows fp16 (max 65504): values ~300, 2^16 per channel
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lay", LAYOUTS)
def test_half_inputs_with_fp16_overflowing_sums(dtype, lay):
    torch.manual_seed(5)
    x = layout((300 + 20 * torch.randn(64, 4, 32, 32, dtype=torch.float64)).to(dtype), lay)  # sum x^2 ~ 6e9 per channel
    xd = x.double()
    n = x.numel() // 4
    mean_ref, var_ref = xd.mean([0, 2, 3]), xd.var([0, 2, 3], unbiased=False)
    y, mean, var = ops.batch_norm_forward(x, None, None, None, None, True, 1e-5, False)
    assert_rounding_close(y, F.batch_norm(xd, None, None, training=True), n=n, what="batch_norm output")
    std = var_ref.sqrt()
    assert ((mean.double() - mean_ref).abs() <= 1e-4 * std).all()
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-5, atol=0)
    _, mean, var = ops.noisy_batch_norm_forward(x, None, None, 1e-5, torch.tensor(1), [0.5, 1.25, 0.1, 0.1], 4)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-5, atol=0)
    for p, want in ((1, xd.abs().mean([0, 2, 3])), (2, xd.square().mean([0, 2, 3]).sqrt()),
                    (math.inf, xd.abs().amax([0, 2, 3]))):
        y, _, norm, _ = ops.lp_norm_forward(x, float(p), None, None, None, None, True, 1e-5)
        assert_rounding_close(y, lp_norm_oracle(xd, p), n=n, what=f"lp_norm p={p} output")
        torch.testing.assert_close(norm.double(), want, rtol=1e-6, atol=0)
    # running statistics (module path), and the gradients for an upstream gradient of random sign
    # (with dy = 1 the exact input gradient of BatchNorm is 0, which a backward returning zeros passes)
    xr = x.clone().requires_grad_()
    rm, rv = torch.zeros(4), torch.ones(4)
    y = bnext.batch_norm(xr, rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(rv.double(), xd.var([0, 2, 3], unbiased=True), rtol=1e-5, atol=0)
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    (dx,) = torch.autograd.grad(y, xr, g)
    xdr = xd.clone().requires_grad_()
    (dxr,) = torch.autograd.grad(F.batch_norm(xdr, None, None, training=True), xdr, g.double())
    assert_rounding_close(dx, dxr, n=n, what="batch_norm grad input")
    for p in (1, 2, math.inf):
        (dx,) = torch.autograd.grad(bnext.lp_norm(xr, p, None, None, training=True), xr, g)
        (dxr,) = torch.autograd.grad(lp_norm_oracle(xdr, p), xdr, g.double())
        assert_rounding_close(dx, dxr, n=n, what=f"lp_norm p={p} grad input")
    flat = x.reshape(-1)
    stats = bnext.grad_stats([flat], [flat * 0.5])
    torch.testing.assert_close(stats[0, 0], (flat.double() ** 2).sum(), rtol=1e-12, atol=0)


# -------------------------------------------------------------------------------------------------
# 64-bit indexing: more than 2^31 elements
# -------------------------------------------------------------------------------------------------

BIG = os.environ.get("BNEXT_BIG") == "1"


def test_statistics_passes_past_2_31_elements():
    """The affordable form of the test below, run by default: the statistics passes alone (the
    training forward's channel_stats through bnext::batch_norm_stats, and l_p's through
    bnext::lp_norm_stats, csrc/cpu/sync.cpp), which allocate no input-sized output, over one planar fp16
    tensor of 2^31 + 2^21 elements (4 GiB; filled by copies of one row, no random draws). Every sample
    n < 1024 holds the same row; sample 1024 (all of it past element 2^31) holds other values, and the
    largest |x| of channel 1, so a wrapped 32-bit offset changes the mean, m2, and the arg-max."""
    C, S = 2, 2 ** 20
    N = 2 ** 31 // (C * S) + 1  # 1025
    s = torch.arange(S, dtype=torch.float64)
    row = torch.stack([(s % 64 - 31.5) / 8, (s % 48) / 4 - 3])  # (C, S), exact in fp16
    last = row + torch.tensor([[5.0], [0.0]], dtype=torch.float64)
    last[1, 12345] = -60.0  # max |x| of channel 1 (elsewhere <= 8.75), at n * S + s = 1024 * S + 12345
    x = torch.empty(N, C, S, dtype=torch.float16)
    x[:N - 1].copy_(row.half().expand(N - 1, C, S))
    x[N - 1].copy_(last.half())
    assert x.numel() > 2 ** 31 and x.is_contiguous()
    count = N * S
    sum_x = (N - 1) * row.sum(1) + last.sum(1)
    sum_x2 = (N - 1) * row.square().sum(1) + last.square().sum(1)
    mean_ref = sum_x / count
    mean, m2 = ops.batch_norm_stats(x)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(m2.double(), sum_x2 - count * mean_ref ** 2, rtol=1e-7, atol=0)
    total, norm, argmax = ops.lp_norm_stats(x, math.inf)
    torch.testing.assert_close(total.double(), sum_x, rtol=1e-9, atol=1e-6)
    assert norm.tolist() == [last[0].abs().max().item(), 60.0]
    assert argmax[1].item() == (N - 1) * S + 12345  # an int64 position past 2^31
    assert argmax[0].item() == (N - 1) * S + int(last[0].abs().argmax())


@pytest.mark.skipif(not BIG, reason="needs ~10 GiB of RAM and minutes on 2 cores: run with BNEXT_BIG=1")
def test_batch_norm_more_than_2_31_elements():
    """BatchNorm forward and backward on 2^31 + 2^21 fp16 elements (4 GiB per tensor; peak ~10 GiB):
    the positions past 2^31 must be read and written (int32 offsets would wrap). Too big and slow for
    the 2-core CI runner (see the README's Testing section); run with BNEXT_BIG=1."""
    t0 = time.time()
    C, S = 2, 2 ** 20
    N = 2 ** 31 // (C * S) + 1  # 1025: 2^31 + 2^21 elements
    x = torch.empty(N, C, S, dtype=torch.float16)
    gen = torch.Generator().manual_seed(0)
    for n0 in range(0, N, 64):  # chunked fill, no fp32 temporary of the whole tensor
        x[n0:n0 + 64] = (torch.randn(min(64, N - n0), C, S, generator=gen) + torch.tensor([2.0, -3.0]).view(1, 2, 1)).half()
    assert x.numel() > 2 ** 31
    # reference statistics, chunked, fp64
    s1 = torch.zeros(C, dtype=torch.float64)
    s2 = torch.zeros(C, dtype=torch.float64)
    for n0 in range(0, N, 64):
        ch = x[n0:n0 + 64].double()
        s1 += ch.sum((0, 2))
        s2 += (ch * ch).sum((0, 2))
    cnt = N * S
    mean_ref = s1 / cnt
    var_ref = s2 / cnt - mean_ref ** 2
    y, mean, var = ops.batch_norm_forward(x, None, None, None, None, True, 1e-5, False)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-5, atol=1e-6)
    invstd = (var.double() + 1e-5).rsqrt()
    for n in (0, N // 2, N - 1):  # the last rows lie past element 2^31
        want = (x[n].double() - mean.double().view(C, 1)) * invstd.view(C, 1)
        torch.testing.assert_close(y[n].double(), want, rtol=2e-3, atol=2e-3)
    del y
    g = x  # grad_out = x (no third 4 GiB tensor): dx = invstd * (x - mean(x) - xhat * mean(x * xhat))
    dx, sum_dy, sum_dy_xhat = ops.batch_norm_backward(g, x, None, None, mean, var, True, 1e-5, False)
    torch.testing.assert_close(sum_dy.double(), s1, rtol=1e-6, atol=1e-3)
    # sum g * xhat with g = x: sum (x - mean) * x * invstd = cnt * var * invstd
    torch.testing.assert_close(sum_dy_xhat.double(), cnt * var.double() * invstd, rtol=1e-5, atol=1e-3)
    for n in (0, N - 1):
        xh = (x[n].double() - mean.double().view(C, 1)) * invstd.view(C, 1)
        want = invstd.view(C, 1) * (x[n].double() - (s1 / cnt).view(C, 1) - xh * (sum_dy_xhat.double() / cnt).view(C, 1))
        torch.testing.assert_close(dx[n].double(), want, rtol=2e-3, atol=2e-3)
    print(f"64-bit indexing test: {time.time() - t0:.1f} s")


# -------------------------------------------------------------------------------------------------
# |mean| / std up to 1.1e5 in fp32, 81 values per channel: the centring x - mean must be exact (the
# mean kept as an fp32 value plus a residual), so outputs and gradients are limited only by the
# input's own rounding. Rounding the mean to fp32 alone moves x - mean by up to 2^-24 |mean| =
# 6.6e-3 std at 1.1e5, which is what these tolerances catch.
# -------------------------------------------------------------------------------------------------

EXTREME_SHIFTS = [1.1e5, -1e5, 3.3e4, 0.7e5, 0.0]


def extreme_case(lay, seed=11):
    torch.manual_seed(seed)
    x = torch.randn(9, len(EXTREME_SHIFTS), 3, 3, dtype=torch.float64)
    x = x + torch.tensor(EXTREME_SHIFTS, dtype=torch.float64).view(1, -1, 1, 1)
    x = layout(x.float(), lay)  # the fp32 input; the reference sees exactly these values in fp64
    w = torch.rand(len(EXTREME_SHIFTS), dtype=torch.float64) + 0.5
    b = torch.randn(len(EXTREME_SHIFTS), dtype=torch.float64) * 0.5
    return x, w.float(), b.float()


def assert_rel(got, want, what, tol=1e-3):
    """Max error within tol of max |ref|, per channel (channels differ in scale: l_p's output is
    ~std / |mean| in the shifted ones)."""
    err = (got.double() - want).abs()
    ref = want.abs()
    if want.dim() > 1:
        err, ref = err.transpose(0, 1).flatten(1).amax(1), ref.transpose(0, 1).flatten(1).amax(1)
    worst = torch.where(ref > 0, err / ref, err).max().item()  # a zero reference (l_p's bias * 0) must be hit exactly
    assert worst <= tol, f"{what}: max error {worst:.3g} of max |ref| (per channel), tolerance {tol}"


def check_extreme(fn, ref, lay, tol=1e-3):
    x, w, b = extreme_case(lay)
    for name, got, want in run_both(fn, ref, x, w, b):
        assert_rel(got, want, name, tol)


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_extreme_mean_batch_norm_fp32(lay, relu):
    act = "relu" if relu else None
    check_extreme(lambda x, w, b: bnext.batch_norm(x, None, None, w, b, training=True, activation=act),
                  lambda x, w, b: (F.relu if relu else (lambda t: t))(F.batch_norm(x, None, None, w, b, training=True)),
                  lay)


@pytest.mark.parametrize("lay", LAYOUTS)
def test_extreme_mean_noisy_batch_norm_fp32(lay):
    x, _, _ = extreme_case(lay)
    # the seed noisy_batch_norm draws from a generator in this state, and the noise it gives
    s, m = (t.double() for t in noisy_batch_norm_noise(x, draw_seed(torch.Generator().manual_seed(7)),
                                                         [0.5, 1.25, 0.1, 0.1]))
    check_extreme(lambda x, w, b: bnext.noisy_batch_norm(x, None, None, w, b, training=True,
                                                         generator=torch.Generator().manual_seed(7)),
                  lambda x, w, b: s * F.batch_norm(x, None, None, w, b, training=True) + m, lay)


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("p", [1, 2, math.inf], ids=["p1", "p2", "pinf"])
def test_extreme_mean_lp_norm_fp32(lay, p):
    def ref(x, w, b):
        xc = x - x.mean([0, 2, 3], keepdim=True)
        n = channel_norm(x, p).view(1, -1, 1, 1)
        return xc / (n + 1e-5) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)

    # b = 0: y = (x - mean) / N is ~1e-5, so its own relative accuracy is what is tested
    check_extreme(lambda x, w, b: bnext.lp_norm(x, p, None, None, w, b * 0, training=True),
                  lambda x, w, b: ref(x, w, b * 0), lay)
