"""bnext.lp_norm and bnext.nn.LpNorm*: parity with a float64 oracle written here from the definition,
exact gradients (including the p=inf subgradient at ties), running stats, torch.library integration,
bad input."""
import math

import pytest
import torch

import bnext
from bnext import nn as bnn
from helpers import assert_compiled_matches, assert_fwd_bwd_thread_independent, channel_inputs, make_input
from tolerances import assert_rounding_close, values_per_channel

ops = torch.ops.bnext
PS = [1, 2, math.inf]


def channel_norm(x, p, argmax=None):
    """N_p(y) per channel c over (N, *), differentiable, shape (C,): (mean |y|^p)^(1/p), and for
    p = inf max |y| read at one position per channel (argmax, a position n * S + s in logical order;
    by default the first maximal |y| as torch.argmax picks it, a NaN counting as the maximum), which is
    where its gradient goes."""
    flat = x.movedim(1, 0).reshape(x.shape[1], -1)
    if p == 1:
        return flat.abs().mean(1)
    if p == 2:
        return flat.square().mean(1).sqrt()
    if argmax is None:
        argmax = flat.detach().abs().argmax(1)
    return flat.abs().gather(1, argmax.view(-1, 1)).view(-1)


def lp_norm_oracle(x, p, weight=None, bias=None, running_mean=None, running_norm=None, training=True, eps=1e-5,
                   argmax=None):
    """The definition, on the tensors given (float64 in the tests), with plain torch ops:
    z = gamma * (y - mean(y)) / (N_p(y) + eps) + beta per channel over (N, *); in eval the mean and
    N_p are running_mean and running_norm."""
    view = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if training:
        mu = x.movedim(1, 0).reshape(x.shape[1], -1).mean(1)
        n = channel_norm(x, p, argmax)
    else:
        mu, n = running_mean, running_norm
    z = (x - mu.view(view)) / (n.view(view) + eps)
    if weight is not None:
        z = z * weight.view(view)
    if bias is not None:
        z = z + bias.view(view)
    return z


def ref_norm(x, p):
    """N_p per channel of x's values in float64 (no gradient)."""
    return channel_norm(x.detach().double(), p)


CASES = [((4, 3), "contiguous"), ((5, 1, 7), "contiguous"), ((3, 4, 5, 6), "contiguous"),
         ((3, 4, 5, 6), "channels_last"), ((3, 4, 5, 6), "slice"), ((2, 3, 3, 4, 5), "channels_last"),
         ((1, 3, 4, 4), "contiguous")]


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_parity_with_float64_oracle(p, shape, layout, dtype, training):
    C = shape[1]
    x = make_input(shape, dtype, layout).requires_grad_()
    pdtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    w = (torch.rand(C, dtype=pdtype) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=pdtype).requires_grad_()
    rm, rn = torch.randn(C, dtype=pdtype), torch.rand(C, dtype=pdtype) + 0.5
    rm0, rn0 = rm.clone(), rn.clone()
    y = bnext.lp_norm(x, p, rm, rn, w, b, training=training, momentum=0.1)
    xd, wd, bd = [t.detach().double().requires_grad_() for t in (x, w, b)]
    yr = lp_norm_oracle(xd, p, wd, bd, rm0.double(), rn0.double(), training)
    n = values_per_channel(x)
    assert y.dtype == dtype
    assert_rounding_close(y, yr, n=n, what="output")
    if training:
        dims = [0] + list(range(2, x.dim()))
        torch.testing.assert_close(rm.double(), 0.9 * rm0.double() + 0.1 * x.detach().double().mean(dims),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rn.double(), 0.9 * rn0.double() + 0.1 * ref_norm(x.detach(), p),
                                   rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(rm, rm0) and torch.equal(rn, rn0)
    g = torch.randn(shape, dtype=torch.float64).to(dtype)  # the reference sees the rounded values
    got = torch.autograd.grad(y, (x, w, b), g)
    want = torch.autograd.grad(yr, (xd, wd, bd), g.double())
    for name, a, r in zip(("input", "weight", "bias"), got, want):
        assert_rounding_close(a, r, input_dtype=dtype, n=n, what=f"grad {name}")


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (5, 2, 4), (6, 3)])
def test_gradcheck_and_gradgradcheck(p, training, shape):
    C = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=torch.float64).requires_grad_()
    rm, rn = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    fn = lambda x, w, b: bnext.lp_norm(x, p, None if training else rm, None if training else rn, w, b, training)
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_linf_subgradient_at_ties_goes_to_first_argmax(layout):
    """p=inf, several elements attain max |x| (with both signs): the gradient of the max goes to the
    first of them in logical NCHW order, for both memory layouts."""
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    x[0, 0, 1, 2], x[1, 0, 0, 0], x[2, 0, 3, 3] = -5.0, 5.0, 5.0   # channel 0: first is (0, 1, 2), negative
    x[1, 1, 2, 1], x[1, 1, 2, 3], x[0, 1, 3, 0] = 7.0, -7.0, 7.0   # channel 1: first is (0, 3, 0)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.tensor([1.5, 0.7], dtype=torch.float64)
    y = bnext.lp_norm(x, math.inf, None, None, w, None, training=True)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    # Reference: the norm read at the first arg-max only (gather at torch.argmax's first index).
    xd = x.detach().clone().requires_grad_()
    flat = xd.movedim(1, 0).reshape(2, -1)
    idx = flat.abs().argmax(1)
    assert idx.tolist() == [1 * 4 + 2, 3 * 4 + 0]
    yr = lp_norm_oracle(xd, math.inf, w, argmax=idx)
    (dxr,) = torch.autograd.grad(yr, xd, g)
    torch.testing.assert_close(dx, dxr, rtol=1e-12, atol=1e-12)
    # The other tied elements get only the mean/affine part, like every non-maximal element.
    dims = (0, 2, 3)
    plain = (g - g.mean(dims, keepdim=True)) * (w / (5.0 + 1e-5)).view(1, 2, 1, 1)
    torch.testing.assert_close(dx[1, 0, 0, 0], plain[1, 0, 0, 0])
    assert not torch.allclose(dx[0, 0, 1, 2], plain[0, 0, 1, 2])


def test_p1_subgradient_at_zero_and_p2_zero_channel():
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    x[:, 0, 0] = 0.0
    x[:, 1] = 0.0  # an all-zero channel: N = 0 for every p
    for p in (1, 2):
        xr = x.clone().requires_grad_()
        y = bnext.lp_norm(xr, p, None, None, training=True)
        g = torch.randn_like(y)
        (dx,) = torch.autograd.grad(y, xr, g)
        xd = x.clone().requires_grad_()
        yr = lp_norm_oracle(xd, p)
        (dxr,) = torch.autograd.grad(yr, xd, g)
        torch.testing.assert_close(dx[:, 0], dxr[:, 0])  # torch: d|x|/dx = 0 at 0
        # zero channel: the norm contributes nothing, dx = (g - mean g) / eps
        torch.testing.assert_close(dx[:, 1], (g[:, 1] - g[:, 1].mean()) / 1e-5)


def test_large_mean_numerics():
    x = torch.randn(64, 4, 8, 8, dtype=torch.float64) + 1e4
    for p in PS:
        y = bnext.lp_norm(x.float(), p, None, None, training=True)
        yr = lp_norm_oracle(x, p)
        torch.testing.assert_close(y.double(), yr, rtol=1e-3, atol=2e-7)


def test_results_do_not_depend_on_thread_count():
    for layout in ("contiguous", "channels_last"):
        x = make_input((32, 16, 9, 9), torch.float32, layout).requires_grad_()
        for p in PS:
            assert_fwd_bwd_thread_independent(lambda x: bnext.lp_norm(x, p, None, None, training=True), x)


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("shape,layout", [((4, 3, 5, 5), "contiguous"), ((4, 3, 5, 5), "channels_last"),
                                          ((6, 4), "contiguous")])
@pytest.mark.parametrize("training", [True, False])
def test_opcheck(p, shape, layout, training):
    x, w, b, rm, rn = channel_inputs(shape, layout)
    torch.library.opcheck(ops.lp_norm_forward, (x, float(p), w, b, rm, rn, training, 1e-5))
    _, mean, norm, argmax = ops.lp_norm_forward(x, float(p), w, b, rm, rn, training, 1e-5)
    g = make_input(shape, torch.float32, layout)
    torch.library.opcheck(ops.lp_norm_backward, (g, x.detach(), float(p), w.detach(), b.detach(), mean, norm,
                                                 argmax, training, 1e-5))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), bnn.LpNorm2d(8, 1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 3), bnn.LpNorm2d(4, math.inf))
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), bnn.LpNorm2d(8, 1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 3), bnn.LpNorm2d(4, math.inf))
    ref.load_state_dict(model.state_dict())
    assert_compiled_matches(model, ref, torch.randn(4, 3, 8, 8),
                            lambda: [(model[1].running_norm, ref[1].running_norm, {})])


def test_vmap_batching_rule_and_grad():
    B, N, C = 3, 4, 5
    xs = torch.randn(B, N, C, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(C, dtype=torch.float64, requires_grad=True)
    rm, rn = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    for p in PS:
        for training, run in [(True, (None, None)), (False, (rm, rn))]:
            out = torch.func.vmap(lambda x: bnext.lp_norm(x, p, *run, w, None, training))(xs)
            ref = torch.stack([bnext.lp_norm(x, p, *run, w, None, training) for x in xs])
            torch.testing.assert_close(out, ref)
            g = torch.randn_like(out)
            for a, r in zip(torch.autograd.grad(out, (xs, w), g), torch.autograd.grad(ref, (xs, w), g)):
                torch.testing.assert_close(a, r)
    with torch.autograd.profiler.profile() as prof:
        torch.func.vmap(lambda x: bnext.lp_norm(x, 2, None, None, training=True))(xs.detach())
    assert sum(1 for e in prof.function_events if e.name == "bnext::lp_norm_forward") <= 2
    with pytest.raises(RuntimeError, match="running_mean/running_norm inside torch.func.vmap"):
        torch.func.vmap(lambda x: bnext.lp_norm(x, 2, rm, rn, training=True))(xs.detach())


def test_module_state_and_modes():
    m = bnn.LpNorm2d(3, "inf", momentum=None)
    assert set(m.state_dict()) == {"weight", "bias", "running_mean", "running_norm", "num_batches_tracked"}
    # Three different batches: momentum=None is the cumulative average (torch's BatchNorm rule, factor
    # 1 / num_batches_tracked), each batch weighed once; equal batches would hide the weights.
    xs = [torch.randn(4, 3, 5, 5) * (1 + i) + 2 * i for i in range(3)]
    for x in xs:
        m(x)
    assert m.num_batches_tracked.item() == 3
    torch.testing.assert_close(m.running_norm.double(), torch.stack([ref_norm(x, math.inf) for x in xs]).mean(0),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.running_mean.double(), torch.stack([x.double().mean((0, 2, 3)) for x in xs]).mean(0),
                               rtol=1e-6, atol=1e-6)
    m.eval()
    y = m(x)
    torch.testing.assert_close(y, bnext.lp_norm(x, math.inf, m.running_mean, m.running_norm, m.weight, m.bias))
    m2 = bnn.LpNorm1d(3, 1, track_running_stats=False, affine=False)
    assert m2.running_mean is None and m2.weight is None
    m2.eval()
    x6 = torch.randn(6, 3)  # no running stats: batch statistics in eval too, as torch's BatchNorm
    torch.testing.assert_close(m2(x6), lp_norm_oracle(x6.double(), 1).float())
    with pytest.raises(ValueError, match="4D"):
        bnn.LpNorm2d(3, 2)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="p must be"):
        bnn.LpNorm2d(3, 3)


BAD = [
    ("input", dict(input=torch.randn(5)), ValueError, "input must have shape"),
    ("input", dict(input=torch.ones(4, 3, dtype=torch.int64)), TypeError, "input must be float"),
    ("p", dict(p=3), ValueError, "p must be 1, 2 or inf"),
    ("p", dict(p="two"), ValueError, "p must be 1, 2 or inf"),
    ("running_mean", dict(running_mean=torch.zeros(4)), ValueError, "running_mean must have shape"),
    ("running_norm", dict(running_norm=torch.ones(3, 1)), ValueError, "running_norm must have shape"),
    ("weight", dict(weight=torch.ones(2)), ValueError, "weight must have shape"),
    ("bias", dict(bias=torch.ones(3, dtype=torch.float64)), TypeError, "bias must have dtype"),
    ("one value", dict(input=torch.randn(1, 3)), ValueError, "more than 1 value per channel"),
    ("eval", dict(training=False, running_mean=None, running_norm=None), ValueError, "required when training=False"),
    ("pair", dict(running_norm=None), ValueError, "both be given"),
    ("eps", dict(eps=-1.0), ValueError, "eps must be"),
    ("momentum", dict(momentum=1.5), ValueError, "momentum must be"),
]


@pytest.mark.parametrize("what,override,exc,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(what, override, exc, match):
    args = dict(input=torch.randn(4, 3, 5), p=2, running_mean=torch.zeros(3), running_norm=torch.ones(3),
                weight=torch.ones(3), bias=torch.zeros(3), training=True, momentum=0.1, eps=1e-5)
    args.update(override)
    with pytest.raises(exc, match=match):
        bnext.lp_norm(**args)


def test_direct_op_call_gives_python_error_not_crash():
    with pytest.raises(RuntimeError, match="p must be 1, 2 or inf"):
        ops.lp_norm_forward(torch.randn(4, 3, 2), 3.0, None, None, None, None, True, 1e-5)
    with pytest.raises(RuntimeError, match="running_mean and running_norm are required"):
        ops.lp_norm_forward(torch.randn(4, 3, 2), 2.0, None, None, None, None, False, 1e-5)
    with pytest.raises(RuntimeError, match="argmax must be"):
        ops.lp_norm_backward(torch.randn(4, 3, 2), torch.randn(4, 3, 2), 2.0, None, None, torch.zeros(3),
                             torch.ones(3), torch.zeros(2, dtype=torch.long), True, 1e-5)


@pytest.mark.parametrize("to", ["bn", "noisy_bn", "l1", "l2", "linf", "none", "torch"])
def test_convert_targets_keep_state(to):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(36, 5), torch.nn.BatchNorm1d(5))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2)
        model[1].bias.normal_()
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    model.eval()
    out = bnext.nn.convert(model, to=to)
    assert out is model
    layer = model[1]
    if to == "none":
        assert isinstance(layer, torch.nn.Identity) and isinstance(model[5], torch.nn.Identity)
    else:
        assert not layer.training
        for k in ("weight", "bias", "running_mean", "num_batches_tracked"):
            assert torch.equal(layer.state_dict()[k], before[k])
        if to in ("bn", "noisy_bn", "torch"):
            assert torch.equal(layer.running_var, before["running_var"])
        else:
            assert torch.equal(layer.running_norm, torch.ones(4)) and layer.p == {"l1": 1, "l2": 2, "linf": math.inf}[to]
    model.train()
    y = model(torch.randn(6, 3, 5, 5))
    y.sum().backward()
    # and back to torch's BatchNorm, keeping the affine parameters
    if to != "none":
        back = bnext.nn.convert(model, to="torch")
        assert type(back[1]) is torch.nn.BatchNorm2d and type(back[5]) is torch.nn.BatchNorm1d
        assert torch.equal(back[1].weight.detach(), before["weight"])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_linf_argmax_is_the_first_over_segments_and_samples(layout):
    """The kernel's arg-max (position n * S + s within the channel) equals torch.argmax of |x| (its
    first index) when ties sit in several 2048-value segments of one run, in later samples at
    earlier positions, and in the last segment only; a NaN is the maximum."""
    N, C, H, W = 3, 4, 50, 100          # S = 5000: segments start at s = 0, 2048, 4096
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    flat = x.view(N, C, H * W)
    flat[1, 0, 10] = flat[0, 0, 4500] = flat[0, 0, 2100] = -9.0   # first: n 0, s 2100 (segment 1)
    flat[2, 1, 5] = flat[1, 1, 4999] = 8.0                         # first: n 1, s 4999 (last segment)
    flat[0, 2, 2047] = flat[0, 2, 2048] = 7.0                      # segment boundary: s 2047
    flat[2, 3, 3000] = float("nan")
    flat[1, 3, 0] = 1e6
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    one = torch.ones(C, dtype=torch.float64)
    _, _, norm, argmax = ops.lp_norm_forward(x, math.inf, one, one * 0, None, None, True, 1e-5)
    ref = x.abs().movedim(1, 0).reshape(C, -1)
    ref_idx = torch.where(ref.isnan().any(1), ref.isnan().to(torch.int64).argmax(1), ref.argmax(1))
    assert argmax.tolist() == ref_idx.tolist() == [0 * 5000 + 2100, 1 * 5000 + 4999, 2047, 2 * 5000 + 3000]
    assert norm[:3].tolist() == [9.0, 8.0, 7.0] and math.isnan(norm[3].item())


def oracle_lp_norm(x, p, w, b, eps=1e-5):
    """l_p normalization in float64 written from its definition (independent of bnext.ops): per
    channel mean and N_p over (N, *spatial); N_inf read at the first arg-max of |x| in logical order."""
    C = x.shape[1]
    flat = x.movedim(1, 0).reshape(C, -1)
    mu = flat.mean(1, keepdim=True)
    if p == 1:
        n = flat.abs().mean(1, keepdim=True)
    elif p == 2:
        n = flat.square().mean(1, keepdim=True).sqrt()
    else:
        n = flat.abs().gather(1, flat.detach().abs().argmax(1, keepdim=True))
    y = (flat - mu) / (n + eps) * w.view(C, 1) + b.view(C, 1)
    return y.reshape(C, x.shape[0], *x.shape[2:]).movedim(0, 1)


# Short planar runs (S <= 32) run as rows of C * S columns (short_runs in csrc/cpu/reduce.h):
# the per-column statistics are folded per channel, and the p = inf arg-max must still be the first
# in logical order across columns, rows and row chunks. Several chunks, an uneven last one, S = 1,
# odd S, 3-d, and the S = 32 / 33 boundary.
SHORT_RUN_SHAPES = [(300, 9, 4, 4), (130, 40, 2, 2), (65, 12, 1, 1), (20, 7, 5), (9, 4, 2, 3, 5), (40, 3, 32),
                    (40, 3, 33)]


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("shape", SHORT_RUN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_short_runs_match_float64_oracle(p, shape, dtype, training):
    torch.manual_seed(4)
    C = shape[1]
    x = make_input(shape, dtype, "contiguous").requires_grad_()
    w = (torch.rand(C, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=dtype).requires_grad_()
    rm, rn = torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 2.0
    xd, wd, bd = [t.detach().double().requires_grad_() for t in (x, w, b)]
    if training:
        y = bnext.lp_norm(x, p, None, None, w, b, training=True)
        yr = lp_norm_oracle(xd, p, wd, bd)
    else:
        y = bnext.lp_norm(x, p, rm, rn, w, b, training=False)
        yr = lp_norm_oracle(xd, p, wd, bd, rm.double(), rn.double(), training=False)
    n = values_per_channel(x)
    assert_rounding_close(y, yr, n=n, what="output")
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    for name, a, r in zip(["input", "weight", "bias"], torch.autograd.grad(y, (x, w, b), g),
                          torch.autograd.grad(yr, (xd, wd, bd), g.double())):
        assert_rounding_close(a, r, n=n, what=f"grad {name}")


@pytest.mark.parametrize("where", ["same-row", "same-column", "across-chunks"])
def test_linf_short_runs_first_argmax_at_ties(where):
    """Ties of max |x| (both signs) placed so that the column-wise reduction sees them in a different
    order than the logical one: the gradient of the norm goes to the first in logical order."""
    torch.manual_seed(0)
    x = torch.randn(4000, 2, 3, 3, dtype=torch.float64)  # 18 columns: rows in chunks of 1820
    spots = {"same-row": [(7, 0, 2, 2), (7, 0, 0, 1)],          # later column, earlier spatial position
             "same-column": [(9, 0, 1, 1), (4, 0, 1, 1)],       # same (h, w), earlier sample second
             "across-chunks": [(3900, 0, 0, 0), (3, 0, 2, 2)]}[where]
    for i, pos in enumerate(spots):
        x[pos] = 9.0 if i % 2 == 0 else -9.0
    x.requires_grad_()
    w = torch.tensor([1.3, 0.8], dtype=torch.float64)
    b = torch.zeros(2, dtype=torch.float64)
    y = bnext.lp_norm(x, math.inf, None, None, w, b, training=True)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    xd = x.detach().clone().requires_grad_()
    (dxr,) = torch.autograd.grad(lp_norm_oracle(xd, math.inf, w, b), xd, g)
    torch.testing.assert_close(dx, dxr, rtol=1e-12, atol=1e-12)
    # the norm's gradient reaches the first tied element only; the other gets the mean/affine part
    first, other = min(spots), max(spots)  # logical order of (n, c, h, w)
    flat_g = g[:, 0]
    plain = (flat_g - flat_g.mean()) * (w[0] / (9.0 + 1e-5))
    assert torch.isclose(dx[other], plain[other[0], other[2], other[3]])
    assert not torch.isclose(dx[first], plain[first[0], first[2], first[3]])


def test_short_runs_do_not_depend_on_thread_count_lp():
    x = (torch.randn(300, 24, 4, 4) * 3 + 2).requires_grad_()
    for p in PS:
        assert_fwd_bwd_thread_independent(lambda x: bnext.lp_norm(x, p, None, None, None, None, training=True), x)
