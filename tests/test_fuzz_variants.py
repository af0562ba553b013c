"""Property-based fuzzing of noisy_batch_norm, lp_norm, grad_stats and multi_axpy against float64
torch references (test_fuzz.py does BatchNorm).

Bounded profile by default (CI); `BNEXT_FUZZ=long pytest tests/test_fuzz_variants.py` runs the
long one. Shapes include size-1 and empty dimensions, views include slices, transposes and
expanded tensors, and both memory layouts. Every failure found here becomes an explicit regression
test (tests/test_hardening.py).
"""
import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import bnext  # noqa: E402
from bnext.ops import _lp_norm_of, draw_seed  # noqa: E402
from test_noisy_batch_norm import reference_noise  # noqa: E402  (pure-Python Philox, float64)

LONG = os.environ.get("BNEXT_FUZZ") == "long"


def profile(n):
    return settings(max_examples=(20 * n) if LONG else n, deadline=None, derandomize=not LONG,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
VIEWS = ["contiguous", "channels_last", "slice", "transpose", "expand"]


@st.composite
def norm_problem(draw, allow_empty=True):
    ndim = draw(st.integers(2, 5))
    lo = 0 if allow_empty and draw(st.integers(0, 9)) == 0 else 1  # empty dims 10% of the time
    shape = [draw(st.integers(lo, 6)), draw(st.integers(1, 5))] + [draw(st.integers(lo, 4)) for _ in range(ndim - 2)]
    training = draw(st.booleans())
    return dict(shape=shape, dtype=draw(st.sampled_from(DTYPES)), view=draw(st.sampled_from(VIEWS)),
                training=training, affine=draw(st.booleans()), running=draw(st.booleans()) or not training,
                shift=draw(st.sampled_from([0.0, 3.0, -50.0])), seed=draw(st.integers(0, 2**31 - 1)))


def make(shape, dtype, view, shift, gen):
    base = torch.randn(shape, dtype=torch.float64, generator=gen) * 2 + shift
    if view == "channels_last" and len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return base.to(dtype).contiguous(memory_format=fmt)
    if view == "slice" and shape[-1] > 0:
        wide = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64, generator=gen) * 2 + shift
        return wide.to(dtype)[..., ::2]
    if view == "transpose" and len(shape) >= 3:
        return base.to(dtype).transpose(0, -1).contiguous().transpose(0, -1)
    if view == "expand" and shape[0] > 0:
        return base[:1].to(dtype).expand(shape)
    return base.to(dtype)


def count_of(shape):
    return math.prod(shape) // shape[1]


def param_dtype(dtype):
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def channel_params(p, gen, C):
    pdt = param_dtype(p["dtype"])
    w = (torch.rand(C, dtype=pdt, generator=gen) + 0.5).requires_grad_() if p["affine"] else None
    b = torch.randn(C, dtype=pdt, generator=gen).requires_grad_() if p["affine"] else None
    return w, b


def ref_leaf(t):
    return None if t is None else t.detach().double().clone().requires_grad_()


def check_grads(got, want, tol, cond_scale, x_shape):
    for a, r in zip(got, want):
        gscale = max(1.0, r.abs().max().item() if r.numel() else 0.0, cond_scale if a.shape == x_shape else 0.0)
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol * gscale)


# -------------------------------------------------------------------------------------------------
# noisy_batch_norm: s * BN(x) + m, the noise regenerated in float64 by the pure-Python Philox
# -------------------------------------------------------------------------------------------------

@profile(60)
@given(norm_problem(), st.tuples(st.floats(0, 1), st.floats(1, 2), st.floats(0, 0.3), st.floats(0, 0.3)))
def test_fuzz_noisy_batch_norm_matches_reference(p, noise):
    gen = torch.Generator().manual_seed(p["seed"])
    shape, dtype = p["shape"], p["dtype"]
    C, count = shape[1], count_of(shape)
    kw = dict(noise_mean=noise[0], noise_std=noise[1], noise_mean_spread=noise[2], noise_std_spread=noise[3])
    if p["training"] and count == 1:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bnext.noisy_batch_norm(torch.randn(shape).to(dtype), None, None, training=True, **kw)
        return
    x = make(shape, dtype, p["view"], p["shift"], gen).requires_grad_()
    w, b = channel_params(p, gen, C)
    pdt = param_dtype(dtype)
    rm = torch.randn(C, dtype=pdt, generator=gen) + p["shift"] if p["running"] else None
    rv = torch.rand(C, dtype=pdt, generator=gen) * 4 + 0.5 if p["running"] else None
    rm0 = None if rm is None else rm.double().clone()
    rv0 = None if rv is None else rv.double().clone()

    key = p["seed"] * 7 + 1
    y = bnext.noisy_batch_norm(x, rm, rv, w, b, p["training"], 0.2, 1e-5,
                               generator=torch.Generator().manual_seed(key), **kw)
    xd, wd, bd = ref_leaf(x), ref_leaf(w), ref_leaf(b)
    yr = torch.nn.functional.batch_norm(xd, rm0, rv0, wd, bd, p["training"], 0.2, 1e-5)
    if p["training"]:
        seed = int(draw_seed(torch.Generator().manual_seed(key)))
        s, m = reference_noise(seed, tuple(shape), list(noise))
        yr = s * yr + m
    assert y.shape == x.shape and y.dtype == dtype
    # The kernel draws the noise in fp32 (Box-Muller with fp32 log/cos: ~2e-6 absolute, see
    # test_noisy_batch_norm.py), so fp64 inputs are compared at that precision.
    tol = max(TOL[dtype], 1e-5) if p["training"] else TOL[dtype]
    scale = 1.0 if p["training"] else max(1.0, yr.abs().max().item() if yr.numel() else 0.0)
    torch.testing.assert_close(y.double(), yr, rtol=tol, atol=tol * scale * (1 + noise[0] + noise[1]))
    if rm is not None:
        torch.testing.assert_close(rm.double(), rm0, rtol=1e-5, atol=1e-5 * (1 + abs(p["shift"])))
        torch.testing.assert_close(rv.double(), rv0, rtol=2e-4 if dtype != torch.float64 else 1e-9, atol=1e-5)

    g = torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)
    ins = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(y, ins, g)
    want = torch.autograd.grad(yr, [t for t in (xd, wd, bd) if t is not None], g.double())
    dims = [0] + list(range(2, len(shape)))
    var = xd.detach().var(dims, unbiased=False) if (p["training"] and count > 0) else (rv0 if rv0 is not None else torch.ones(1))
    cond = (var + 1e-5).rsqrt().max().item() * (1.0 if w is None else w.abs().max().item()) * noise[1] * 1.5 * \
        (g.abs().max().item() if g.numel() else 0.0)
    check_grads(got, want, tol * (4 if dtype in (torch.float16, torch.bfloat16) else 1), cond, x.shape)


# -------------------------------------------------------------------------------------------------
# lp_norm, p in {1, 2, inf}
# -------------------------------------------------------------------------------------------------

def lp_reference(xd, p, wd, bd, rm, rn, training, momentum, eps):
    """float64 composition; returns (y, new running_mean, new running_norm)."""
    dims = [0] + list(range(2, xd.dim()))
    view = [1, -1] + [1] * (xd.dim() - 2)
    if training and xd.numel() > 0:
        mu = xd.mean(dims, keepdim=True)
        n = _lp_norm_of(xd, p, None)  # p = inf: the first arg-max in logical order gets the gradient
        if rm is not None:
            rm = (1 - momentum) * rm + momentum * mu.detach().view(-1)
            rn = (1 - momentum) * rn + momentum * n.detach().view(-1)
    elif training:
        return xd * 1.0, rm, rn
    else:
        mu, n = rm.view(view), rn.view(view)
    y = (xd - mu) / (n + eps)
    if wd is not None:
        y = y * wd.view(view) + bd.view(view)
    return y, rm, rn


@profile(90)
@given(norm_problem(), st.sampled_from([1, 2, math.inf]))
def test_fuzz_lp_norm_matches_reference(p, pval):
    gen = torch.Generator().manual_seed(p["seed"])
    shape, dtype = p["shape"], p["dtype"]
    C, count = shape[1], count_of(shape)
    if p["training"] and count == 1:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bnext.lp_norm(torch.randn(shape).to(dtype), pval, None, None, training=True)
        return
    x = make(shape, dtype, p["view"], p["shift"], gen).requires_grad_()
    w, b = channel_params(p, gen, C)
    pdt = param_dtype(dtype)
    rm = torch.randn(C, dtype=pdt, generator=gen) + p["shift"] if p["running"] else None
    rn = torch.rand(C, dtype=pdt, generator=gen) * 4 + 0.5 if p["running"] else None
    rm0 = None if rm is None else rm.double().clone()
    rn0 = None if rn is None else rn.double().clone()
    y = bnext.lp_norm(x, pval, rm, rn, w, b, p["training"], 0.2, 1e-5)
    xd, wd, bd = ref_leaf(x), ref_leaf(w), ref_leaf(b)
    yr, rm_ref, rn_ref = lp_reference(xd, pval, wd, bd, rm0, rn0, p["training"], 0.2, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    tol = TOL[dtype]
    scale = max(1.0, yr.abs().max().item() if yr.numel() else 0.0)
    torch.testing.assert_close(y.double(), yr.detach(), rtol=tol, atol=tol * scale)
    if rm is not None:
        rt = 1e-9 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(rm.double(), rm_ref, rtol=rt, atol=rt * (1 + abs(p["shift"])))
        torch.testing.assert_close(rn.double(), rn_ref, rtol=rt, atol=rt * (1 + abs(p["shift"])))
    if count == 0 and p["training"]:
        return
    g = torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)
    ins = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(y, ins, g)
    want = torch.autograd.grad(yr, [t for t in (xd, wd, bd) if t is not None], g.double(), allow_unused=True)
    want = [torch.zeros_like(t) if r is None else r for t, r in zip((xd, wd, bd), want)]
    n = rn0 if not p["training"] else _lp_norm_of(xd.detach(), pval, None).view(-1)
    cond = (1.0 / (n + 1e-5)).max().item() * (1.0 if w is None else w.abs().max().item()) * \
        (g.abs().max().item() if g.numel() else 0.0) * (1 + abs(p["shift"]) / max(n.min().item(), 1e-3))
    check_grads(got, want, tol * (4 if dtype in (torch.float16, torch.bfloat16) else 1), cond, x.shape)


# -------------------------------------------------------------------------------------------------
# grad_stats / multi_axpy
# -------------------------------------------------------------------------------------------------

@st.composite
def tensor_pairs(draw):
    n = draw(st.integers(0, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    a, b = [], []
    for _ in range(n):
        shape = [draw(st.integers(0 if draw(st.integers(0, 7)) == 0 else 1, 7)) for _ in range(draw(st.integers(0, 4)))]
        dtype = draw(st.sampled_from(DTYPES))
        pair = []
        for _ in range(2):
            view = draw(st.sampled_from(["contiguous", "transpose", "slice", "expand", "big"]))
            if view == "big":  # several chunks (kMultiTensorChunk = 65536 elements)
                shape_i = [draw(st.integers(65536, 200000))]
                shape = shape_i if not pair else shape
            t = torch.randn(shape, dtype=torch.float64, generator=gen) * draw(st.sampled_from([1.0, 1e-3, 100.0]))
            t = t.to(dtype)
            if view == "transpose" and len(shape) >= 2:
                t = t.transpose(0, -1).contiguous().transpose(0, -1)
            elif view == "slice" and len(shape) >= 1:
                t = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64, generator=gen).to(dtype)[..., ::2]
            elif view == "expand" and len(shape) >= 1 and shape[0] > 0:
                t = t[:1].expand(shape)
            pair.append(t)
        if pair[0].shape != pair[1].shape:  # "big" drawn for the second only: redo the first
            pair[0] = torch.randn(pair[1].shape, dtype=torch.float64, generator=gen).to(dtype)
        if draw(st.booleans()):  # b close to a: ||a - b||^2 must stay accurate
            pair[1] = (pair[0].double() + 1e-3 * torch.randn(pair[0].shape, dtype=torch.float64, generator=gen)).to(dtype)
        a.append(pair[0])
        b.append(pair[1])
    return a, b


@profile(60)
@given(tensor_pairs())
def test_fuzz_grad_stats_matches_float64(pairs):
    a, b = pairs
    got = bnext.grad_stats(a, b)
    assert got.shape == (len(a), 4) and got.dtype == torch.float64
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = x.double(), y.double()
        want = torch.stack([(x * x).sum(), (y * y).sum(), ((x - y) ** 2).sum(), (x * y).sum()])
        torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-300)


@profile(60)
@given(tensor_pairs(), st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), max_size=5))
def test_fuzz_multi_axpy_matches_float64(pairs, etas):
    x, d = pairs
    out = bnext.multi_axpy(x, d, etas)
    assert len(out) == len(x)
    for xi, di, oi in zip(x, d, out):
        assert oi.shape == (len(etas), *xi.shape) and oi.dtype == xi.dtype and oi.is_contiguous()
        assert not oi.requires_grad
        if not etas:
            continue
        e = torch.tensor(etas, dtype=torch.float64).view(-1, *[1] * xi.dim())
        want = xi.double() - e * di.double()
        # computed in float32 (float64 for float64) and rounded once: a few ulps of the operands
        eps = torch.finfo(xi.dtype).eps
        mag = xi.double().abs() + (e * di.double()).abs()
        rounded = want.to(xi.dtype).double()  # beyond the dtype's range the result is +-inf
        fin = torch.isfinite(rounded)
        assert torch.equal(oi.double()[~fin], rounded[~fin])
        assert ((oi.double() - want).abs()[fin] <= 2 * eps * mag[fin] + torch.finfo(xi.dtype).tiny).all()
