"""bnext.batch_norm and bnext.nn.BatchNorm*: parity with PyTorch computed in float64, numerics,
torch.library integration (opcheck, compile, vmap), double backward, modules, bad input."""
import pytest
import torch
import torch.nn.functional as F

import bnext
from bnext import nn as bnn
from helpers import assert_compiled_matches, assert_fwd_bwd_thread_independent, channel_inputs, make_input
from tolerances import assert_rounding_close, values_per_channel

ops = torch.ops.bnext


def reference(x, rm, rv, w, b, training, momentum, eps, relu):
    """torch.nn.functional.batch_norm in float64 (+ ReLU), on float64 copies."""
    d = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)
    xd, wd, bd = d(x), d(w), d(b)
    rmd = None if rm is None else rm.double().clone()
    rvd = None if rv is None else rv.double().clone()
    y = F.batch_norm(xd, rmd, rvd, wd, bd, training, momentum, eps)
    return (y.relu() if relu else y), xd, wd, bd, rmd, rvd


def check_affine_case(x, rm, rv, w, b, training, relu, draw_grad, running_tol=None):
    """bnext.batch_norm against the float64 reference from the same rounded inputs: the output and the
    input, weight and bias gradients (upstream gradient draw_grad() in x's dtype) within the rounding
    bound of tests/tolerances.py, the running stats to running_tol (when given)."""
    yr, xd, wd, bd, rmd, rvd = reference(x, rm, rv, w, b, training, 0.1, 1e-5, relu)
    y = bnext.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, "relu" if relu else None)
    n = values_per_channel(x)
    assert_rounding_close(y, yr, n=n, what="output")
    if running_tol is not None:
        torch.testing.assert_close(rm.double(), rmd, rtol=running_tol, atol=running_tol)
        torch.testing.assert_close(rv.double(), rvd, rtol=running_tol, atol=running_tol)
    g = draw_grad()
    got = torch.autograd.grad(y, [x, w, b], g)
    want = torch.autograd.grad(yr, [xd, wd, bd], g.double())
    for name, a, r in zip(("input", "weight", "bias"), got, want):
        assert_rounding_close(a, r, input_dtype=x.dtype, n=n, what=f"grad {name}")


SHAPES = [(4, 3), (1, 2, 5), (5, 1, 7), (3, 4, 5, 6), (1, 3, 4, 4), (2, 3, 3, 4, 5), (7, 5, 3)]


def layouts_for(shape):
    out = ["contiguous", "slice"]
    if len(shape) in (4, 5):
        out.append("channels_last")
    return out


CASES = [(s, l) for s in SHAPES for l in layouts_for(s)]


# (training, affine, running stats, relu); eval without running stats is an error (test_bad_input).
MODES = [(True, True, True, False), (True, True, True, True), (True, False, True, False),
         (True, True, False, True), (True, False, False, False),
         (False, True, True, False), (False, True, True, True), (False, False, True, False)]


@pytest.mark.parametrize("shape,layout", CASES, ids=[f"{s}-{l}" for s, l in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training,affine,running,relu", MODES)
def test_parity_with_torch(shape, layout, dtype, training, affine, running, relu):
    C = shape[1]
    x = make_input(shape, dtype, layout).requires_grad_()
    pdtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    w = (torch.rand(C, dtype=pdtype) + 0.5).requires_grad_() if affine else None
    b = torch.randn(C, dtype=pdtype).requires_grad_() if affine else None
    rm = torch.randn(C, dtype=pdtype) if running else None
    rv = (torch.rand(C, dtype=pdtype) + 0.5) if running else None
    yr, xd, wd, bd, rmd, rvd = reference(x, rm, rv, w, b, training, 0.1, 1e-5, relu)
    y = bnext.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, "relu" if relu else None)
    n = values_per_channel(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert_rounding_close(y, yr, n=n, what="output")
    if running:
        torch.testing.assert_close(rm.double(), rmd, rtol=1e-6 if pdtype == torch.float32 else 1e-12, atol=1e-6)
        torch.testing.assert_close(rv.double(), rvd, rtol=1e-6 if pdtype == torch.float32 else 1e-12, atol=1e-6)
    g = torch.randn(shape, dtype=torch.float64).to(dtype)  # the reference sees the rounded values
    inputs = [x] + ([w, b] if affine else [])
    ref_inputs = [xd] + ([wd, bd] if affine else [])
    grads = torch.autograd.grad(y, inputs, g)
    ref = torch.autograd.grad(yr, ref_inputs, g.double())
    for name, got, want in zip(["input", "weight", "bias"], grads, ref):
        assert got.dtype == (dtype if name == "input" else pdtype)
        assert_rounding_close(got, want, input_dtype=dtype, n=n, what=f"grad {name}")


# Planar outputs of >= 16 MiB are written through a cached tile with non-temporal stores
# (csrc/cpu/passes.h, kStreamingStoreBytes); odd sizes exercise the tile and vector tails.
@pytest.mark.parametrize("shape,dtype", [((64, 64, 32, 32), torch.float32), ((33, 61, 45, 47), torch.float32),
                                         ((17, 31, 67, 65), torch.float64)])
@pytest.mark.parametrize("training,relu", [(True, True), (True, False), (False, True)])
def test_parity_on_outputs_large_enough_for_streaming_stores(shape, dtype, training, relu):
    assert torch.Size(shape).numel() * dtype.itemsize >= 16 << 20
    torch.manual_seed(0)
    C = shape[1]
    x = (torch.randn(shape, dtype=dtype) * 2 + 3).requires_grad_()
    w = (torch.rand(C, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=dtype).requires_grad_()
    rm, rv = torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5
    check_affine_case(x, rm, rv, w, b, training, relu, lambda: torch.randn(shape, dtype=dtype))


# Planar inputs with runs of S <= 64 values are reduced as rows of C * S columns in chunks of rows
# (csrc/cpu/reduce.h, short_runs): several chunks, an uneven last one, a 3-d volume, the
# S = 32 / 33 boundary, S = 64, odd column counts for the vector tails.
@pytest.mark.parametrize("shape", [(256, 64, 4, 4), (301, 40, 2, 2), (64, 8, 3, 3, 3), (130, 9, 4, 8), (50, 3, 33),
                                   (130, 9, 8, 8), (97, 7, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("training,relu", [(True, True), (True, False), (False, True)])
def test_parity_short_planar_runs(shape, dtype, training, relu):
    torch.manual_seed(1)
    C = shape[1]
    x = make_input(shape, dtype, "contiguous").requires_grad_()
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(C, dtype=pdtype) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=pdtype).requires_grad_()
    rm, rv = torch.randn(C, dtype=pdtype), torch.rand(C, dtype=pdtype) + 0.5
    check_affine_case(x, rm, rv, w, b, training, relu, lambda: torch.randn(shape, dtype=torch.float64).to(dtype),
                      running_tol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_output_keeps_layout(layout):
    x = make_input((4, 8, 5, 5), torch.float32, layout)
    y = bnext.batch_norm(x, None, None, training=True)
    assert y.stride() == x.stride()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_running_stats_over_steps(layout):
    """Several training steps, then eval: running stats and eval outputs match torch's module."""
    torch_bn = torch.nn.BatchNorm2d(6, momentum=0.3).double()
    ours = bnn.BatchNorm2d(6, momentum=0.3).double()
    ours.load_state_dict(torch_bn.state_dict())
    for _ in range(5):
        x = make_input((8, 6, 4, 5), torch.float64, layout, scale=2.0, shift=4.0)
        torch.testing.assert_close(ours(x), torch_bn(x))
    for name, buf in torch_bn.named_buffers():
        torch.testing.assert_close(getattr(ours, name), buf, rtol=1e-12, atol=1e-12)
    assert int(ours.num_batches_tracked) == 5
    ours.eval(), torch_bn.eval()
    x = make_input((3, 6, 4, 5), torch.float64, layout)
    torch.testing.assert_close(ours(x), torch_bn(x))


def test_cumulative_momentum_none():
    torch_bn = torch.nn.BatchNorm1d(4, momentum=None).double()
    ours = bnn.BatchNorm1d(4, momentum=None).double()
    for _ in range(4):
        x = torch.randn(16, 4, dtype=torch.float64) * 3 + 2
        torch.testing.assert_close(ours(x), torch_bn(x))
    torch.testing.assert_close(ours.running_mean, torch_bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, torch_bn.running_var, rtol=1e-12, atol=1e-12)


def test_track_running_stats_false_uses_batch_stats_in_eval():
    torch_bn = torch.nn.BatchNorm2d(3, track_running_stats=False).eval()
    ours = bnn.BatchNorm2d(3, track_running_stats=False).eval()
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    torch.testing.assert_close(ours(x), torch_bn(x))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_numerics(layout):
    """x = 1e4 + randn in fp32: variance to 1e-4 relative, outputs and gradients to 1e-3."""
    x64 = torch.randn(16, 8, 12, 12, dtype=torch.float64) + 1e4
    x = x64.float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.requires_grad_()
    y, mean, var = ops.batch_norm_forward(x, None, None, None, None, True, 1e-5, False)
    xd = x.detach().double()
    want_var = xd.var(dim=(0, 2, 3), unbiased=False)
    assert ((var.double() - want_var).abs() / want_var).max() < 1e-4
    want_mean = xd.mean(dim=(0, 2, 3))
    assert (mean.double() - want_mean).abs().max() < 1e-3  # fp32 cannot hold 1e4 much closer
    xr = xd.clone().requires_grad_()
    yr = F.batch_norm(xr, None, None, None, None, True)
    y = bnext.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y.double(), yr, rtol=1e-3, atol=1e-3)
    g = torch.randn_like(xd)
    (gx,) = torch.autograd.grad(y, x, g.float())
    (gr,) = torch.autograd.grad(yr, xr, g)
    torch.testing.assert_close(gx.double(), gr, rtol=1e-3, atol=1e-3)


def test_results_do_not_depend_on_thread_count():
    x = torch.randn(32, 16, 9, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert_fwd_bwd_thread_independent(lambda x: bnext.batch_norm(x, None, None, training=True, activation="relu"), x)


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (0, 3), (3, 2, 0)])
def test_empty_batch_like_torch(shape):
    x = torch.randn(shape, requires_grad=True)
    C = shape[1]
    w = torch.ones(C, requires_grad=True)
    rm, rv = torch.zeros(C), torch.ones(C)
    y = bnext.batch_norm(x, rm, rv, w, None, training=True)
    assert y.shape == x.shape
    assert torch.equal(rm, torch.zeros(C)) and torch.equal(rv, torch.ones(C))
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(C))


def test_eval_grad_for_size_one_dims_with_channels_last_strides():
    """Regression (fuzzer): shape (1, 2, 1, 2) with strides (1, 1, 1, 2). torch's own CPU backward is
    wrong for this input, so the reference is the closed form g * invstd."""
    x = torch.randn(1, 2, 1, 2, dtype=torch.float64).transpose(0, -1).contiguous().transpose(0, -1)
    x.requires_grad_()
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5
    g = torch.randn(1, 2, 1, 2, dtype=torch.float64)
    y = bnext.batch_norm(x, rm, rv, None, None, False)
    torch.testing.assert_close(y, (x.detach() - rm.view(1, 2, 1, 1)) / (rv.view(1, 2, 1, 1) + 1e-5).sqrt())
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g / (rv.view(1, 2, 1, 1) + 1e-5).sqrt())


def test_nan_propagates_like_torch():
    x = torch.randn(4, 3, 5)
    x[1, 2, 3] = float("nan")
    y = bnext.batch_norm(x, None, None, training=True)
    yr = F.batch_norm(x, None, None, training=True)
    assert torch.equal(y.isnan(), yr.isnan())


# --- torch.library integration -----------------------------------------------------------------

OPCHECK_CASES = [((4, 3, 5, 5), "contiguous"), ((4, 3, 5, 5), "channels_last"), ((6, 4), "contiguous"),
                 ((3, 2, 4, 3), "slice")]


@pytest.mark.parametrize("shape,layout", OPCHECK_CASES)
@pytest.mark.parametrize("training,relu", [(True, False), (True, True), (False, True)])
def test_opcheck_forward_and_backward(shape, layout, training, relu):
    x, w, b, rm, rv = channel_inputs(shape, layout)
    torch.library.opcheck(ops.batch_norm_forward, (x, w, b, rm, rv, training, 1e-5, relu))
    _, mean, var = ops.batch_norm_forward(x, w, b, rm, rv, training, 1e-5, relu)
    g = make_input(shape, torch.float32, layout)
    torch.library.opcheck(ops.batch_norm_backward, (g, x.detach(), w.detach(), b.detach(), mean, var,
                                                    training, 1e-5, relu))


@pytest.mark.parametrize("training,relu,shape", [(True, False, (4, 3, 3, 3)), (True, True, (5, 2, 4)),
                                                 (False, True, (4, 3, 3, 3)), (True, False, (6, 3))])
def test_gradcheck_and_gradgradcheck(training, relu, shape):
    C = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=torch.float64).requires_grad_()
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    fn = lambda x, w, b: bnext.batch_norm(x, None if training else rm, None if training else rv, w, b,
                                          training, 0.1, 1e-5, "relu" if relu else None)
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("relu", [False, True])
def test_double_backward_matches_torch(relu):
    """Hessian-vector product through the op equals torch's own, to float64 precision."""
    x = (torch.randn(6, 3, 4, 4, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).requires_grad_()
    target = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    vs = [torch.randn_like(t) for t in (x, w, b)]

    def hvp(bn):
        y = bn(x, w, b)
        loss = ((y - target) ** 2).sum() * 0.5 + (y ** 3).sum() * 0.1
        grads = torch.autograd.grad(loss, (x, w, b), create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vs))
        return torch.autograd.grad(dot, (x, w, b))

    ours = hvp(lambda x, w, b: bnext.batch_norm(x, None, None, w, b, True, activation="relu" if relu else None))
    ref = hvp(lambda x, w, b: (lambda y: y.relu() if relu else y)(F.batch_norm(x, None, None, w, b, True)))
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_torch_compile_fullgraph_conv_bn_relu():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), bnn.BatchNorm2d(8, activation="relu"),
                                torch.nn.Conv2d(8, 4, 3), bnn.BatchNorm2d(4))
    ref_model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                    torch.nn.Conv2d(8, 4, 3), torch.nn.BatchNorm2d(4))
    ref_model[0].load_state_dict(model[0].state_dict())
    ref_model[1].load_state_dict(model[1].state_dict())
    ref_model[3].load_state_dict(model[2].state_dict())
    ref_model[4].load_state_dict(model[3].state_dict())
    tol = dict(rtol=1e-5, atol=1e-6)
    assert_compiled_matches(model, ref_model, torch.randn(4, 3, 8, 8), lambda: [
        (model[1].running_mean, ref_model[1].running_mean, tol), (model[3].running_var, ref_model[4].running_var, tol)])


def test_vmap_over_inputs_in_eval_and_without_running_stats():
    B, N, C = 3, 4, 5
    xs = torch.randn(B, N, C, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(C, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    for training, run in [(True, (None, None)), (False, (rm, rv))]:
        out = torch.func.vmap(lambda x: bnext.batch_norm(x, *run, w, None, training, activation="relu"))(xs)
        ref = torch.stack([F.batch_norm(x, *(r.clone() if r is not None else None for r in run), w, None,
                                        training).relu() for x in xs])
        torch.testing.assert_close(out, ref)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (xs, w), g)
        want = torch.autograd.grad(ref, (xs, w), g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_vmap_over_stacked_weights_with_functional_call():
    """The line-probe pattern: K stacked copies of the parameters, one vmapped call, ordinary backward."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), bnn.BatchNorm2d(4, track_running_stats=False),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3)).double()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    params = dict(model.named_parameters())
    K = 3
    stacked = {k: (v.detach().unsqueeze(0) + 0.1 * torch.randn(K, *v.shape, dtype=v.dtype)).requires_grad_()
               for k, v in params.items()}
    out = torch.func.vmap(lambda p: torch.func.functional_call(model, p, (x,)))(stacked)
    out.square().sum().backward()
    for k in range(K):
        p = {n: v[k].detach().clone().requires_grad_() for n, v in stacked.items()}
        ref = torch.func.functional_call(model, p, (x,))
        torch.testing.assert_close(out[k], ref)
        ref.square().sum().backward()
        for n in p:
            torch.testing.assert_close(stacked[n].grad[k], p[n].grad)


def test_vmap_uses_batching_rule_not_a_loop():
    xs = torch.randn(6, 3, 2, 5)
    with torch.autograd.profiler.profile() as prof:
        torch.func.vmap(lambda x: bnext.batch_norm(x, None, None, training=True))(xs)
    n = sum(1 for e in prof.function_events if e.name == "bnext::batch_norm_forward")
    # The profiler records the vmapped call and the one kernel call it becomes; a per-sample
    # fallback would record one per sample.
    assert n <= 2, f"expected one fused kernel call for the whole vmap, got {n} calls"


def test_vmap_with_running_stat_update_raises_clearly():
    xs = torch.randn(3, 4, 5, 6)
    rm, rv = torch.zeros(5), torch.ones(5)
    with pytest.raises(RuntimeError, match="running_mean/running_var inside torch.func.vmap"):
        torch.func.vmap(lambda x: bnext.batch_norm(x, rm, rv, training=True))(xs)
    assert torch.equal(rm, torch.zeros(5)) and torch.equal(rv, torch.ones(5))


def test_func_grad_limit_is_pinned():
    """torch.func.grad over the ops is not supported in this torch (documented in the README): their
    autograd is a C++ torch::autograd::Function, which functorch's grad transform refuses. Pin the
    behaviour so a change is noticed."""
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    f = lambda x: bnext.batch_norm(x, None, None, training=True).square().sum()
    try:
        g = torch.func.grad(f)(x)
    except RuntimeError as e:
        assert "C++ torch::autograd::Function with functorch transforms" in str(e)
    else:  # if torch starts supporting it, the answer must be right
        xr = x.clone().requires_grad_()
        F.batch_norm(xr, None, None, training=True).square().sum().backward()
        torch.testing.assert_close(g, xr.grad)


# --- modules and conversion ----------------------------------------------------------------------

def test_modules_are_drop_in_and_checkpoints_round_trip():
    for tcls, bcls, shape in [(torch.nn.BatchNorm1d, bnn.BatchNorm1d, (8, 4, 5)),
                              (torch.nn.BatchNorm2d, bnn.BatchNorm2d, (8, 4, 3, 3)),
                              (torch.nn.BatchNorm3d, bnn.BatchNorm3d, (8, 4, 2, 3, 3))]:
        t = tcls(4, eps=1e-3, momentum=0.2)
        t(torch.randn(shape))
        b = bcls(4, eps=1e-3, momentum=0.2)
        assert isinstance(b, tcls)
        assert set(b.state_dict()) == set(t.state_dict())
        b.load_state_dict(t.state_dict())
        t2 = tcls(4, eps=1e-3, momentum=0.2)
        t2.load_state_dict(b.state_dict())
        x = torch.randn(shape)
        torch.testing.assert_close(b(x), t(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.running_var, t.running_var, rtol=1e-6, atol=1e-6)
        assert int(b.num_batches_tracked) == int(t.num_batches_tracked) == 2


def test_convert_round_trip_keeps_state_and_mode():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5),
                                                    torch.nn.BatchNorm1d(5, affine=False)))
    x = torch.randn(6, 3, 6, 6)
    model(x)
    model.eval()
    ref = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = bnn.convert(model)
    assert type(converted[1]) is bnn.BatchNorm2d and type(converted[3][2]) is bnn.BatchNorm1d
    assert not converted[1].training
    for k, v in converted.state_dict().items():
        assert torch.equal(v, state[k])
    torch.testing.assert_close(converted(x), ref)
    back = bnn.convert(converted, to="torch")
    assert type(back[1]) is torch.nn.BatchNorm2d and type(back[3][2]) is torch.nn.BatchNorm1d
    torch.testing.assert_close(back(x), ref)
    plain = bnn.convert(bnn.convert(back, to="bn"), to="none")
    assert type(plain[1]) is torch.nn.Identity and type(plain[3][2]) is torch.nn.Identity
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    single = bnn.convert(torch.nn.BatchNorm3d(2))
    assert type(single) is bnn.BatchNorm3d
    with pytest.raises(ValueError, match="to must be one of"):
        bnn.convert(model, to="groupnorm")


# --- bad input -----------------------------------------------------------------------------------

BAD = [
    ("input", dict(input=torch.randn(5)), ValueError, "input must have shape"),
    ("input", dict(input=torch.randn(2, 3, 4, 5, 6, 7)), ValueError, "input must have shape"),
    ("input", dict(input=torch.ones(4, 3, dtype=torch.int64)), TypeError, "input must be float"),
    ("input", dict(input=[1.0, 2.0]), TypeError, "input must be a Tensor"),
    ("running_mean", dict(running_mean=torch.zeros(4)), ValueError, "running_mean must have shape"),
    ("running_var", dict(running_var=torch.ones(3, 1)), ValueError, "running_var must have shape"),
    ("weight", dict(weight=torch.ones(2)), ValueError, "weight must have shape"),
    ("bias", dict(bias=torch.ones(3, dtype=torch.float64)), TypeError, "bias must have dtype"),
    ("weight", dict(weight=torch.ones(3, device="meta")), ValueError, "weight is on meta"),
    ("one value", dict(input=torch.randn(1, 3)), ValueError, "more than 1 value per channel"),
    ("eval", dict(training=False, running_mean=None, running_var=None), ValueError, "required when training=False"),
    ("pair", dict(running_var=None), ValueError, "both be given"),
    ("eps", dict(eps=-1.0), ValueError, "eps must be"),
    ("eps", dict(eps=float("nan")), ValueError, "eps must be"),
    ("momentum", dict(momentum=float("nan")), ValueError, "momentum must be"),
    ("momentum", dict(momentum=1.5), ValueError, "momentum must be"),
    ("activation", dict(activation="gelu"), ValueError, "activation must be"),
]


@pytest.mark.parametrize("what,override,exc,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(what, override, exc, match):
    args = dict(input=torch.randn(4, 3, 5), running_mean=torch.zeros(3), running_var=torch.ones(3),
                weight=torch.ones(3), bias=torch.zeros(3), training=True, momentum=0.1, eps=1e-5,
                activation=None)
    args.update(override)
    with pytest.raises(exc, match=match):
        bnext.batch_norm(**args)


def test_module_rejects_bad_activation_and_wrong_rank():
    with pytest.raises(ValueError, match="activation"):
        bnn.BatchNorm2d(3, activation="tanh")
    with pytest.raises(ValueError, match="4D"):
        bnn.BatchNorm2d(3)(torch.randn(2, 3, 4))


def test_direct_op_call_gives_python_error_not_crash():
    with pytest.raises(RuntimeError, match="weight must be a 1-D tensor"):
        ops.batch_norm_forward(torch.randn(4, 3, 2), torch.ones(5), None, None, None, True, 1e-5, False)
    with pytest.raises(RuntimeError, match="running_mean and running_var are required"):
        ops.batch_norm_forward(torch.randn(4, 3, 2), None, None, None, None, False, 1e-5, False)
    with pytest.raises(RuntimeError, match="grad_out shape"):
        ops.batch_norm_backward(torch.randn(4, 3, 3), torch.randn(4, 3, 2), None, None, torch.zeros(3),
                                torch.ones(3), True, 1e-5, False)


# --- package ---------------------------------------------------------------------------------------

def test_build_info():
    info = bnext.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["cuda"] in (True, False)
    assert isinstance(info["cuda_archs"], list)
    if not info["cuda"]:
        assert info["cuda_archs"] == []


def test_mismatched_torch_version_is_reported(monkeypatch):
    import importlib
    import bnext._build_config as cfg
    monkeypatch.setattr(cfg, "TORCH_VERSION", "0.0.1-other")
    with pytest.raises(ImportError, match="built against torch 0.0.1-other.*Rebuild"):
        bnext._load_extension()
    del importlib


def test_tune_cpu_allocator_is_explicit():
    import subprocess
    import sys
    code = ("import bnext, bnext.allocator as a; assert not a.cpu_allocator_tuned(); "
            "print(bnext.tune_cpu_allocator(), a.cpu_allocator_tuned())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]
    with pytest.raises(ValueError, match="mmap_threshold"):
        bnext.tune_cpu_allocator(mmap_threshold=-1)


# --- the call path: C++ autograd, one-call running-stat update -----------------------------------

@pytest.mark.parametrize("run_dtype,stat_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                                  (torch.float32, torch.float64), (torch.float16, torch.float32)])
def test_update_running_stats_op_matches_formula(run_dtype, stat_dtype):
    """running = (1 - m) * running + m * batch (variance times the correction), against the formula in
    float64 here; the op mutates both buffers in place and passes opcheck."""
    C, m, corr = 7, 0.3, 10 / 9
    rm, rv = torch.randn(C).to(run_dtype), (torch.rand(C) + 0.5).to(run_dtype)
    mean, var = torch.randn(C).to(stat_dtype), (torch.rand(C) + 0.1).to(stat_dtype)
    want_m = (1 - m) * rm.double() + m * mean.double()
    want_v = (1 - m) * rv.double() + m * var.double() * corr
    rm_ptr = rm.data_ptr()
    ops.update_running_stats(rm, rv, mean, var, m, corr)
    assert rm.data_ptr() == rm_ptr
    tol = 1e-3 if run_dtype == torch.float16 else (1e-12 if run_dtype == torch.float64 else 1e-6)
    torch.testing.assert_close(rm.double(), want_m, rtol=tol, atol=tol)
    torch.testing.assert_close(rv.double(), want_v, rtol=tol, atol=tol)
    torch.library.opcheck(ops.update_running_stats, (rm, rv, mean, var, m, corr))


def test_update_running_stats_op_rejects_mismatched_shapes():
    with pytest.raises(RuntimeError, match="running_mean has shape"):
        ops.update_running_stats(torch.zeros(3), torch.ones(4), torch.zeros(4), torch.ones(4), 0.1, 1.0)


def test_autograd_is_registered_in_cpp_and_records_one_node():
    """The forward ops' autograd is a C++ kernel (no Python autograd.Function per call): one
    CppFunction node per call, none when nothing requires grad."""
    for name in ("batch_norm_forward", "noisy_batch_norm_forward", "lp_norm_forward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bnext::{name}", "Autograd"), name
    x = torch.randn(4, 3, 5, requires_grad=True)
    y = bnext.batch_norm(x, None, None, training=True)
    assert type(y.grad_fn).__name__ == "CppFunction"
    assert y.grad_fn.next_functions[0][0] is not None  # leads back to x's AccumulateGrad
    assert bnext.batch_norm(x.detach(), None, None, training=True).grad_fn is None
    with torch.no_grad():
        assert bnext.batch_norm(x, None, None, training=True).grad_fn is None


@pytest.mark.parametrize("need", [(True, False, False), (False, True, True), (False, False, True)])
def test_gradients_only_for_inputs_that_require_them(need):
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    for t, r in zip((x, w, b), need):
        t.requires_grad_(r)
    wanted = [t for t in (x, w, b) if t.requires_grad]
    y = bnext.batch_norm(x, None, None, w, b, True, activation="relu")
    got = torch.autograd.grad(y.sum(), wanted)
    xr, wr, br = (t.detach().clone().requires_grad_(t.requires_grad) for t in (x, w, b))
    ref = F.relu(F.batch_norm(xr, None, None, wr, br, True)).sum()
    want = torch.autograd.grad(ref, [t for t in (xr, wr, br) if t.requires_grad])
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
