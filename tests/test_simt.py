"""bnext's CUDA kernels (csrc/cuda) run on the CPU through the SIMT emulation (csrc/simt, tests/simt.py):
every op of the CUDA backend against float64 references computed here and against the CPU op
(torch.ops.bnext), across layouts, dtypes, odd and empty shapes and the reduction plans of GPUs with
1, 7 and 132 SMs; the cases of tests/test_cuda*.py that need no device run through it; kernels with
planted defects show what the emulator reports.

The first run builds the emulator's extension (build/simt, several minutes on two cores); later runs
reuse it."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import simt
import test_cuda as tc
# test_cuda_parity.py's float64 references, tolerances and noise: the same cases, on the emulator
from test_cuda_parity import CL, PAPER, TOL, assert_ref, bn64, cv, dims, exact_noise, lp64, params

S = simt.load()
CTL = simt.ctl()
ops = torch.ops.bnext

EPS = tc.EPS
MOMENTUM = tc.MOMENTUM
DTYPES = tc.DTYPES
SMS = [1, 7, 132]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # The emulator runs on one core; torch's own thread pool (the references, the CPU ops) only
    # spins against it on a loaded machine (5x slower here).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def assert_close(actual, expected, tol, msg):
    tc.assert_close(actual, expected, tol, msg)


# =================================================================================================
# BatchNorm (+ ReLU): tests/test_cuda.py's cases through the raw ops
# =================================================================================================

def bn_step(ns, x, w, b, rm, rv, training, relu, g):
    """One forward + backward of ns.batch_norm_* (raw ops), with the running-stat update the Python
    wrapper does (bnext/ops/batch_norm.py). Returns y and the gradients (input, weight, bias)."""
    y, mean, var = ns.batch_norm_forward(x, w, b, rm, rv, training, EPS, relu)
    if training and rm is not None:
        n = x.numel() // x.shape[1]
        ns.update_running_stats(rm, rv, mean, var, MOMENTUM, n / max(n - 1, 1))
    dx, sum_dy, sum_dy_xhat = ns.batch_norm_backward(g.to(x.dtype), x, w, b, mean, var, training, EPS, relu)
    grads = [dx] + ([sum_dy_xhat, sum_dy] if w is not None else [])
    return y, grads, (mean, var)


def check_bn(shape, layout, dtype, training, affine, running, relu, steps=1, seed=0):
    """tests/test_cuda.py's check_case with the emulated CUDA ops in place of the GPU: outputs,
    gradients and running statistics against the float64 reference and the CPU op."""
    C = shape[1]
    w, b, rm, rv = tc.make_params(C, dtype, affine, running, seed)
    rm_sim, rv_sim = (rm.clone(), rv.clone()) if running else (None, None)
    rm_cpu, rv_cpu = (rm.clone(), rv.clone()) if running else (None, None)
    rm_ref, rv_ref = (rm.double().clone(), rv.double().clone()) if running else (None, None)
    for step in range(steps):
        s = seed + 17 * step
        x = tc.make_input(shape, dtype, layout, "cpu", s)
        y_ref, pre, ref_leaves = tc.reference(x, w, b, rm_ref, rv_ref, training, relu)
        g = tc.upstream_grad(pre, relu, s, dtype)
        y_ref.backward(g)
        y_sim, grads_sim, _ = bn_step(S, x, w, b, rm_sim, rv_sim, training, relu, g)
        y_cpu, grads_cpu, _ = bn_step(ops, x, w, b, rm_cpu, rv_cpu, training, relu, g)
        assert y_sim.dtype == dtype and y_sim.shape == x.shape
        assert y_sim.stride() == y_cpu.stride(), "output layout differs from the CPU op's"
        grads_ref = [t.grad for t in ref_leaves if t is not None]
        assert_close(y_sim, y_cpu, tc.TOL_CPU[dtype], "output vs CPU")
        assert_close(y_sim, y_ref, tc.TOL_REF[dtype], "output vs float64")
        for name, gs, gc, gr in zip(["grad_input", "grad_weight", "grad_bias"], grads_sim, grads_cpu, grads_ref):
            assert gs.dtype == gc.dtype, name
            assert_close(gs, gc, tc.cpu_tol(dtype, name, x.numel() // C), f"{name} vs CPU")
            assert_close(gs, gr, tc.TOL_REF[dtype], f"{name} vs float64")
    if running:
        stat_tol = (1e-12, 1e-12) if rm.dtype == torch.float64 else (1e-5, 1e-5)
        for name, sim, cpu, ref in (("running_mean", rm_sim, rm_cpu, rm_ref), ("running_var", rv_sim, rv_cpu, rv_ref)):
            assert_close(sim, cpu, stat_tol, f"{name} vs CPU")
            assert_close(sim, ref, stat_tol, f"{name} vs float64")


# test_cuda.test_parity's shapes, layouts, dtypes and modes: every mode in fp32, the four dtypes in
# the first three modes (training, training + ReLU, no affine), at the SM count of an H100.
PARITY = [pytest.param(s, l, d, m, id=f"{s}-{l}-{str(d)[6:]}-{m}")
          for (s, l) in tc.CASES for d in DTYPES for m in tc.MODES if d == torch.float32 or m in tc.MODES[:3]]


@pytest.mark.parametrize("shape,layout,dtype,mode", PARITY)
def test_batch_norm_parity(shape, layout, dtype, mode):
    check_bn(shape, layout, dtype, *mode)


# test_cuda.test_multi_block_reductions: channels split over several row groups and channel tiles,
# at each SM count (the plan changes with it). The largest shapes only at 132 SMs.
BIG = [((64, 3, 33, 17), "contiguous"), ((64, 3, 33, 17), "channels_last"), ((32, 96, 14, 14), "contiguous"),
       ((32, 96, 14, 14), "channels_last"), ((4, 5, 6, 40, 40), "channels_last"), ((2, 1, 1 << 18), "contiguous"),
       ((1 << 14, 5), "contiguous")]


MULTI = [pytest.param(shape, layout, dtype, training, relu, sms, id=f"{shape}-{layout}-{str(dtype)[6:]}-{training}-{relu}-{sms}")
         for shape, layout in BIG for sms, dtype in ((132, torch.float32), (132, torch.float16), (1, torch.float32),
                                                    (7, torch.float32))
         for training, relu in ((True, False), (True, True), (False, True))]


@pytest.mark.parametrize("shape,layout,dtype,training,relu,sms", MULTI)
def test_batch_norm_multi_block(shape, layout, dtype, training, relu, sms):
    with simt.sm_count(sms):
        check_bn(shape, layout, dtype, training, affine=True, running=True, relu=relu)


@pytest.mark.parametrize("layout,relu", [("contiguous", False), ("contiguous", True), ("channels_last", False),
                                         ("channels_last", True)])
def test_batch_norm_running_stats_after_several_steps(layout, relu):
    check_bn((8, 6, 5, 7), layout, torch.float32, True, True, True, relu, steps=4)


def large_mean_case(layout, relu, ns):
    """test_cuda.test_large_mean_fp32 through the ops of `ns`: x = 1e4 + randn in fp32, statistics
    and outputs against float64."""
    shape = (32, 16, 24, 24)
    gen = torch.Generator().manual_seed(3)
    x = (1e4 + torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.rand(16, generator=gen) + 0.5
    b = torch.randn(16, generator=gen)
    _, mean, var = ns.batch_norm_forward(x, w, b, None, None, True, EPS, relu)
    xr = x.double()
    var_ref, mean_ref = torch.var_mean(xr, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=0)
    y_ref, pre, (xd, wd, bd) = tc.reference(x, w, b, None, None, True, relu)
    g = tc.upstream_grad(pre, relu, 3, torch.float32)
    y_ref.backward(g)
    y, (gx, gw, gb), _ = bn_step(ns, x, w, b, None, None, True, relu, g)
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gx.double(), xd.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gb.double(), bd.grad, rtol=1e-3, atol=1e-3)
    # grad_weight against the float64 gradient, sum g * (x - mean) * invstd with the exact mean.
    # (test_cuda.py checks it around the saved fp32 mean instead, which rounding moves by up to
    # 5e-4 and grad_weight by that times invstd * sum g: the CPU op, which carries the mean's
    # residual, is 0.16 away from that formula on this data, so that check fails once the CUDA
    # backward is recentred as the CPU's.)
    torch.testing.assert_close(gw.double(), wd.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("relu", [False, True])
def test_large_mean_fp32_cpu_op(relu):
    """The same check on the CPU op: what the CUDA kernels must reach."""
    large_mean_case("contiguous", relu, ops)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("relu", [False, True])
def test_large_mean_fp32(layout, relu):
    large_mean_case(layout, relu, S)


# =================================================================================================
# Noisy BatchNorm, l_p, sync ops and multi-tensor ops (tests/test_cuda_parity.py's cases)
# =================================================================================================

def layout(x, name):
    if name == "channels_last" and x.dim() in CL:
        return x.contiguous(memory_format=CL[x.dim()])
    if name == "slice":  # every other element of the last dim: neither layout (the entry copies it)
        wide = torch.cat([x, x], dim=-1)
        return wide[..., ::2]
    return x


def make(shape, dtype, seed, lay="contiguous", scale=2.0, shift=0.5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift
    return layout(x.to(dtype), lay)


def assert_all_close(got, want, dtype, names):
    for a, r, name in zip(got, want, names):
        assert a.dtype == r.dtype and a.shape == r.shape, name
        assert_ref(a, r, dtype, name)


def reference_grads(ref_fn, x, w, b, dy):
    """float64 y and (dx, dw, db) of ref_fn."""
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = ref_fn(xr, wr, br)
    return (yr.detach(), *torch.autograd.grad(yr, (xr, wr, br), dy.double()))


SHAPES = [(8, 3, 7, 9), (4, 40, 6, 6), (64, 16), (1, 2, 5), (5, 1, 7), (2, 33, 2, 3, 2), (16, 37, 33, 7)]
LAYOUTS = ["contiguous", "channels_last", "slice"]


def noisy_case(shape, dtype, lay, seed_value=9):
    x, dy = make(shape, dtype, 7, lay), make(shape, dtype, 8, lay, scale=1.0, shift=0.0)
    w, b = params(shape[1], dtype, 2)
    seed = torch.tensor(seed_value)
    C = shape[1]
    out = {}
    for name, ns in (("sim", S), ("cpu", ops)):
        y, mean, var = ns.noisy_batch_norm_forward(x, w, b, EPS, seed, PAPER, C)
        dx, sg, sgx = ns.noisy_batch_norm_backward(dy.to(dtype), x, w, b, mean, var, EPS, seed, PAPER, C)
        out[name] = (y, dx, sgx, sg, mean, var)
    return x, w, b, dy, seed, out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_noisy_batch_norm(dtype, lay, shape):
    x, w, b, dy, seed, out = noisy_case(shape, dtype, lay)
    s, m = exact_noise(shape, seed)
    want = reference_grads(lambda xr, wr, br: s.double() * bn64(xr, wr, br) + m.double(), x, w, b, dy)
    names = ("y", "dx", "dw", "db")
    assert_all_close(out["sim"][:4], [t.to(a.dtype) for t, a in zip(want, out["sim"])], dtype, names)
    assert_all_close(out["sim"], out["cpu"], dtype, names + ("mean", "var"))


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
def test_noisy_batch_norm_output_noise_is_bitwise_the_cpu_noise(sms, lay):
    # With zero weight the forward output is b * s + m: the noise alone, drawn by the CUDA kernels'
    # pair_noise against the CPU's vectorized draws; bitwise equal (csrc/common/noise.h).
    shape = (6, 5, 4, 6)
    x = make(shape, torch.float32, 1, lay)
    w, b = torch.zeros(5), torch.ones(5)
    seed = torch.tensor(20240601)
    with simt.sm_count(sms):
        y_sim = S.noisy_batch_norm_forward(x, w, b, EPS, seed, PAPER, 5)[0]
    y_cpu = ops.noisy_batch_norm_forward(x, w, b, EPS, seed, PAPER, 5)[0]
    assert torch.equal(y_sim, y_cpu)
    s, m = exact_noise(shape, seed)
    assert torch.equal(y_sim, layout(s * 1.0 + m, lay))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
def test_noisy_backward_rounds_g_to_the_input_dtype(dtype, lay):
    # test_cuda_parity's defect 3: g = dy * s rounded to the input dtype before the sums.
    shape = (64, 3, 16, 16)
    x, dy = make(shape, dtype, 1, lay), make(shape, dtype, 2, lay, scale=1.0, shift=0.0)
    seed = torch.tensor(987654321)
    w = params(3, dtype, 0)[0]
    y, mean, var = S.noisy_batch_norm_forward(x, w, None, EPS, seed, PAPER, 3)
    dx, sdy, sdyx = S.noisy_batch_norm_backward(dy, x, w, None, mean, var, EPS, seed, PAPER, 3)
    s, _ = exact_noise(shape, seed)
    ref = (dy.float() * s).to(dtype).double().sum(dims(x))
    torch.testing.assert_close(sdy.double(), ref, rtol=0, atol=5e-3)


def lp_case(ns, x, p, w, b, dy, training, rm=None, rn=None):
    y, mean, norm, am = ns.lp_norm_forward(x, p, w, b, rm, rn, training, EPS)
    dx, sdy, sdyx = ns.lp_norm_backward(dy, x, p, w, b, mean, norm, am, training, EPS)
    return y, dx, sdyx, sdy, mean, norm, am


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES[:6])
def test_lp_norm(p, dtype, lay, shape):
    x, dy = make(shape, dtype, 10, lay), make(shape, dtype, 11, lay, scale=1.0, shift=0.0)
    w, b = params(shape[1], dtype, 3)
    sim, cpu = lp_case(S, x, p, w, b, dy, True), lp_case(ops, x, p, w, b, dy, True)
    want = reference_grads(lambda xr, wr, br: lp64(xr, p, wr, br), x, w, b, dy)
    names = ("y", "dx", "dw", "db")
    assert_all_close(sim[:4], [t.to(a.dtype) for t, a in zip(want, sim)], dtype, names)
    assert_all_close(sim[:6], cpu[:6], dtype, names + ("mean", "norm"))
    assert torch.equal(sim[6], cpu[6]), "argmax"


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
def test_lp_norm_eval_is_bitwise_the_cpu(p, dtype, lay):
    # test_cuda_parity's defect 4: in eval nothing is reduced for y and dx, so CUDA and CPU agree
    # bit for bit (same per-channel scale, no FMA on either side); BatchNorm's eval path too.
    shape = (4, 5, 6, 7)
    x, dy = make(shape, dtype, 3, lay), make(shape, dtype, 4, lay)
    w, b = params(5, dtype, 1)
    rm, rn = torch.randn(5, dtype=w.dtype), torch.rand(5, dtype=w.dtype) + 0.5
    am = torch.full((5,), -1, dtype=torch.long)
    res = {}
    for name, ns in (("sim", S), ("cpu", ops)):
        y = ns.lp_norm_forward(x, p, w, b, rm, rn, False, EPS)[0]
        dx = ns.lp_norm_backward(dy, x, p, w, b, rm, rn, am, False, EPS)[0]
        ybn = ns.batch_norm_forward(x, w, b, rm, rn, False, EPS, True)[0]
        dxbn = ns.batch_norm_backward(dy, x, w, b, rm, rn, False, EPS, True)[0]
        res[name] = (y, dx, ybn, dxbn)
    for a, r, name in zip(res["sim"], res["cpu"], ("lp y", "lp dx", "bn y", "bn dx")):
        assert torch.equal(a, r), f"{name}: max diff {(a.double() - r.double()).abs().max()}"
    xr = x.double()
    y_want = (xr - cv(rm.double(), xr)) / (cv(rn.double(), xr) + EPS) * cv(w.double(), xr) + cv(b.double(), xr)
    assert_ref(res["sim"][0], y_want, dtype, "lp eval y vs float64")


def tie_input(shape, lay, positions, value=9.0):
    """Channel 0 of a clamped randn gets |x| = value at `positions` (flat n * S + s), the first one
    negative, so the sign of the arg-max's gradient term tells which one won."""
    N, C = shape[0], shape[1]
    S_ = math.prod(shape[2:])
    x = torch.randn(N, C, S_, generator=torch.Generator().manual_seed(1), dtype=torch.float64).clamp(-3, 3)
    for k, pos in enumerate(positions):
        x[pos // S_, 0, pos % S_] = -value if k == 0 else value
    return layout(x.view(shape).float(), lay)


# Ties of the first max |x| between lanes of one warp, between warps of a block, between the row
# groups of a plan (several blocks per channel: far apart in a large channel), and in the last element.
TIES = {"lanes": [3, 17], "warps": [40, 300, 301], "row groups": [5, 59 * 1024 + 1], "last": [700, 64 * 1024 - 1]}


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
@pytest.mark.parametrize("tie", list(TIES))
def test_linf_ties_take_the_first_position(sms, lay, tie):
    shape = (64, 3, 32, 32)
    x = tie_input(shape, lay, TIES[tie])
    with simt.sm_count(sms):
        CTL.launch_stats(True)
        _, _, norm, argmax = S.lp_norm_forward(x, math.inf, None, None, None, None, True, EPS)
        stats = CTL.launch_stats(True)
    assert argmax[0].item() == min(TIES[tie]) and norm[0].item() == 9.0
    flat = x.double().transpose(0, 1).reshape(3, -1).abs()
    assert argmax.tolist() == flat.argmax(1).tolist()  # torch.argmax: the first maximal value
    if tie == "row groups" and sms == 132:
        assert stats[4] > 1, "the plan did not split the channel into row groups"
    w, b = params(3, torch.float32, 4)
    dy = make(shape, torch.float32, 12, lay, scale=1.0, shift=0.0)
    with simt.sm_count(sms):
        sim = lp_case(S, x, math.inf, w, b, dy, True)
    want = reference_grads(lambda xr, wr, br: lp64(xr, math.inf, wr, br), x, w, b, dy)
    assert_all_close(sim[:4], [t.float() for t in want], torch.float32, ("y", "dx", "dw", "db"))


@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
def test_nan_stays_in_its_channel_as_on_cpu(lay):
    shape = (8, 3, 5, 6)
    x = make(shape, torch.float32, 13, lay)
    x[2, 1, 3, 4] = float("nan")
    for name, f in (("bn", lambda ns: ns.batch_norm_forward(x, None, None, None, None, True, EPS, False)),
                    ("noisy", lambda ns: ns.noisy_batch_norm_forward(x, None, None, EPS, torch.tensor(5), PAPER, 3)),
                    ("l1", lambda ns: ns.lp_norm_forward(x, 1.0, None, None, None, None, True, EPS)),
                    ("linf", lambda ns: ns.lp_norm_forward(x, math.inf, None, None, None, None, True, EPS))):
        cpu, sim = f(ops), f(S)
        assert torch.isnan(sim[0][:, 1]).all() and torch.isfinite(sim[0][:, [0, 2]]).all(), name
        torch.testing.assert_close(sim[0][:, [0, 2]], cpu[0][:, [0, 2]], rtol=1e-5, atol=1e-5)
        for a, r in zip(sim[1:], cpu[1:]):
            assert torch.equal(torch.isnan(a), torch.isnan(r)), name
        if name == "linf":
            assert sim[3].tolist() == cpu[3].tolist() and sim[3][1].item() == 2 * 30 + 3 * 6 + 4


def test_linf_backward_rejects_an_out_of_range_argmax():
    # test_cuda_parity's defect 5: the CUDA kernel's device-side assertion; the emulator reports it.
    x = torch.randn(4, 2, 8)
    _, mean, norm, argmax = S.lp_norm_forward(x, math.inf, None, None, None, None, True, EPS)
    dy = torch.randn_like(x)
    fine = S.lp_norm_backward(dy, x, math.inf, None, None, mean, norm, torch.full_like(argmax, -1), True, EPS)[0]
    assert torch.isfinite(fine).all()
    # The entry checks a host tensor's positions before any kernel runs (csrc/entry.h), and the
    # emulated device's tensors are host tensors; the kernel's device-side assertion backs it up.
    with pytest.raises(RuntimeError, match="argmax"):
        S.lp_norm_backward(dy, x, math.inf, None, None, mean, norm, torch.tensor([3, 32]), True, EPS)


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (2, 0, 5), (0, 0)])
def test_empty_batches(shape):
    # test_cuda_parity's defect 1: empty output and NaN statistics, as the CPU op and torch.
    x = torch.randn(shape)
    C = shape[1]
    y, mean, var = S.batch_norm_forward(x, None, None, None, None, True, EPS, False)
    assert y.shape == x.shape and mean.shape == var.shape == (C,)
    assert torch.isnan(mean).all() and torch.isnan(var).all()
    y2, mean2, var2 = S.noisy_batch_norm_forward(x, None, None, EPS, torch.tensor(3), PAPER, C)
    assert y2.shape == x.shape and torch.isnan(mean2).all() and torch.isnan(var2).all()
    y3, mean3, norm3, am3 = S.lp_norm_forward(x, 2.0, None, None, None, None, True, EPS)
    assert y3.shape == x.shape and torch.isnan(mean3).all() and (am3 == -1).all()
    dx, sdy, sdyx = S.batch_norm_backward(torch.randn_like(x), x, None, None, mean, var, True, EPS, False)
    assert dx.shape == x.shape and sdy.shape == sdyx.shape == (C,)
    m, m2 = S.batch_norm_stats(x)
    assert torch.equal(m, torch.zeros(C, dtype=torch.float64)) and torch.equal(m2, torch.zeros(C, dtype=torch.float64))


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lay", LAYOUTS)
def test_sync_ops(sms, dtype, lay):
    # test_cuda_parity.test_distributed_ops_match_cpu, plus float64 references.
    shape = (6, 40, 9, 8)
    x, ge = make(shape, dtype, 5, lay), make(shape, dtype, 6, lay)
    ref = x.double()
    with simt.sm_count(sms):
        mean, m2 = S.batch_norm_stats(x)
        lp = {p: S.lp_norm_stats(x, p) for p in (1.0, 2.0, math.inf)}
    mean_ref = ref.mean(dims(x))
    # fp32 accumulation (issue 24: the sync statistics are not yet merged in fp64)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(mean, mean_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(m2, ((ref - cv(mean_ref, ref)) ** 2).sum(dims(x)), rtol=tol, atol=tol)
    cm, cm2 = ops.batch_norm_stats(x)
    torch.testing.assert_close(mean, cm, rtol=tol, atol=tol)
    torch.testing.assert_close(m2, cm2, rtol=tol, atol=tol)
    flat = ref.transpose(0, 1).reshape(40, -1)
    want = {1.0: flat.abs().sum(1), 2.0: (flat ** 2).sum(1), math.inf: flat.abs().max(1).values}
    for p, (s, pw, am) in lp.items():
        torch.testing.assert_close(s, flat.sum(1), rtol=tol, atol=tol * 100)
        torch.testing.assert_close(pw, want[p], rtol=tol, atol=tol * 100)
        sc, pc, ac = ops.lp_norm_stats(x, p)
        assert torch.equal(am, ac) and torch.equal(am, flat.abs().argmax(1) if p == math.inf else -torch.ones_like(am))
    C = shape[1]
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    center, a, b = torch.randn(C, dtype=pd), torch.randn(C, dtype=pd), torch.randn(C, dtype=pd)
    for sign in (False, True):
        with simt.sm_count(sms):
            dsim = S.sync_backward_elementwise(ge, x, center, a, b, sign)
        assert torch.equal(dsim, ops.sync_backward_elementwise(ge, x, center, a, b, sign)), f"sign={sign}"
        d = ref - cv(center.double(), ref)
        want = ge.double() - cv(a.double(), ref) - cv(b.double(), ref) * (d.sign() if sign else d)
        assert_ref(dsim, want, dtype, f"sync dx sign={sign}")
    seed = torch.tensor(31337)
    for offset in (0, 5, 1000):
        for forward in (True, False):
            with simt.sm_count(sms):
                ys = S.noise_apply(x, seed, PAPER, C, offset, forward)
            assert torch.equal(ys, ops.noise_apply(x, seed, PAPER, C, offset, forward)), (offset, forward)


@pytest.mark.parametrize("shape,nc,offset", [((4, 6, 8, 8), 6, 0), ((3, 4, 5, 7), 4, 0), ((5, 8), 8, 0),
                                             ((3, 6, 5), 3, 0), ((2, 4, 6, 6), 4, 7), ((2, 3, 9), 3, 1 << 29)])
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
def test_noise_is_bitwise_equal_to_cpu(shape, nc, offset, lay):
    # test_cuda_parity's defect 7: pairs when S is even, single elements when odd; period and offsets.
    seed = torch.tensor(424242)
    for forward, inp in ((False, layout(torch.ones(shape), lay)), (True, layout(torch.zeros(shape), lay))):
        cpu = ops.noise_apply(inp, seed, PAPER, nc, offset, forward)
        sim = S.noise_apply(inp, seed, PAPER, nc, offset, forward)
        assert torch.equal(sim, cpu), f"forward={forward}: max diff {(sim - cpu).abs().max()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_axpy_rounds_product_and_difference_separately(dtype):
    # test_cuda_parity's defect 2: x - eta * d with two roundings (__fsub_rn(x, __fmul_rn(eta, d))),
    # bitwise torch's own two-step result.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(11)
    x = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in (70_001, 33, 1)]
    d = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype) for t in x]
    etas = [0.3, -1.7, 1e-3, 3.1]
    outs = S.multi_axpy(x, d, etas)
    for o, xi, di in zip(outs, x, d):
        for k, eta in enumerate(etas):
            two_roundings = (xi.to(acc) - torch.tensor(eta, dtype=acc) * di.to(acc)).to(dtype)
            assert torch.equal(o[k], two_roundings), f"{dtype}, eta={eta}"


def test_multi_tensor_ops_span_several_launches():
    # test_cuda_parity's defect 6: lists longer than one launch's 48 tensors, more than 64 step sizes,
    # tensors of several chunks and empty ones, mixed dtypes.
    gen = torch.Generator().manual_seed(5)
    shapes = [(3,), (0,), (70_000,), (5, 7)] * 13
    dts = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    a = [torch.randn(s, generator=gen).to(dts[i % 4]) for i, s in enumerate(shapes)]
    b = [torch.randn(s, generator=gen).to(t.dtype) for s, t in zip(shapes, a)]
    etas = [0.01 * k - 0.3 for k in range(70)]
    stats = S.grad_stats(a, b)
    ref = torch.stack([torch.stack([(x.double() ** 2).sum(), (y.double() ** 2).sum(),
                                    ((x.double() - y.double()) ** 2).sum(), (x.double() * y.double()).sum()])
                       for x, y in zip(a, b)])
    torch.testing.assert_close(stats, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats, ops.grad_stats(a, b), rtol=1e-12, atol=1e-12)
    outs = S.multi_axpy(a[:8], b[:8], etas)
    for o, x, y in zip(outs, a, b):
        assert o.shape == (70, *x.shape) and o.dtype == x.dtype
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        for k in (0, 47, 64, 69):
            assert torch.equal(o[k], (x.to(acc) - torch.tensor(etas[k], dtype=acc) * y.to(acc)).to(x.dtype))


@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
def test_running_stats_op(lay):
    rm, rv = torch.randn(5), torch.rand(5) + 0.5
    mean, var = torch.randn(5), torch.rand(5)
    want_m = 0.9 * rm.double() + 0.1 * mean.double()
    want_v = 0.9 * rv.double() + 0.1 * var.double() * 1.25
    S.update_running_stats(rm, rv, mean, var, 0.1, 1.25)
    torch.testing.assert_close(rm.double(), want_m, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(rv.double(), want_v, rtol=1e-7, atol=1e-7)


def test_schemas_are_those_of_bnext():
    for name in simt.OPS:
        want = str(getattr(ops, name).default._schema).split("::", 1)[1]
        assert str(getattr(S, name).default._schema).split("::", 1)[1] == want


def test_cuda_kernels_reject_what_the_cpu_entry_rejects():
    # The shared entry (csrc/entry.h) checks arguments before any kernel runs.
    with pytest.raises(RuntimeError, match="weight"):
        S.batch_norm_forward(torch.randn(4, 3, 5), torch.ones(4), None, None, None, True, EPS, False)
    with pytest.raises(RuntimeError):
        S.lp_norm_forward(torch.randn(4, 3), 3.0, None, None, None, None, True, EPS)


# =================================================================================================
# The emulator itself: conversions, intrinsics, launch checks, planted defects, thread modes
# =================================================================================================

def test_half_and_bfloat16_conversions_round_to_nearest_even():
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**32, (200_000,), generator=gen, dtype=torch.int64)
    rand = torch.tensor(bits.tolist(), dtype=torch.int64).to(torch.int32).view(torch.float32)  # every exponent
    halfway = [1 + 2**-11, 1 + 3 * 2**-11, 2**-24 * 1.5, 2**-25, 2**-25 * 1.0000001, 65504.0, 65519.99, 65520.0,
               1 + 2**-8, 1 + 3 * 2**-8, 3.0e38, 3.4028235e38, -0.0, 0.0, 2**-14, 2**-14 * (1 - 2**-11),
               float("inf"), -float("inf"), 1e-45]
    x = torch.cat([rand, torch.tensor(halfway, dtype=torch.float32), torch.randn(10_000, generator=gen) * 1e-6])
    h, bf = CTL.to_16bit(x)
    finite = ~torch.isnan(x)
    assert torch.equal(h[finite], x[finite].half().view(torch.int16).to(torch.int32) & 0xffff)
    assert torch.equal(bf[finite], x[finite].bfloat16().view(torch.int16).to(torch.int32) & 0xffff)
    assert (h[~finite] == 0x7fff).all() and (bf[~finite] == 0x7fff).all()
    every = torch.arange(65536, dtype=torch.int32)
    hf, bff = CTL.from_16bit(every)
    h16 = every.to(torch.int16)
    want_h, want_b = h16.view(torch.float16).float(), h16.view(torch.bfloat16).float()
    nan = torch.isnan(want_h)
    assert torch.equal(hf[~nan], want_h[~nan]) and torch.isnan(hf[nan]).all()
    nan = torch.isnan(want_b)
    assert torch.equal(bff[~nan], want_b[~nan]) and torch.isnan(bff[nan]).all()


def test_umulhi():
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 2**32, (1000,), generator=gen, dtype=torch.int64)
    b = torch.randint(0, 2**32, (1000,), generator=gen, dtype=torch.int64)
    a[:3] = torch.tensor([2**32 - 1, 0, 0xD2511F53])
    b[:3] = torch.tensor([2**32 - 1, 5, 0xCD9E8D57])
    assert CTL.umulhi(a, b).tolist() == [(x * y) >> 32 for x, y in zip(a.tolist(), b.tolist())]


@pytest.mark.parametrize("grid,block,params,why", [
    ([2**31, 1, 1], [32, 1, 1], 8, "grid.x > 2"),
    ([1, 65536, 1], [32, 1, 1], 8, "grid.y or grid.z"),
    ([1, 1, 65536], [32, 1, 1], 8, "grid.y or grid.z"),
    ([0, 1, 1], [32, 1, 1], 8, "is 0"),
    ([1, 1, 1], [1025, 1, 1], 8, "block dimension"),
    ([1, 1, 1], [64, 32, 1], 8, "more than 1024 threads"),
    ([1, 1, 1], [32, 1, 65], 8, "block dimension"),
    ([1, 1, 1], [32, 1, 1], 4104, "4104 bytes"),
])
def test_launch_limits(grid, block, params, why):
    with pytest.raises(RuntimeError, match=why):
        CTL.probe_launch(grid, block, params, True, True)


def test_launch_within_limits_and_launch_checks():
    CTL.probe_launch([3, 2, 2], [8, 4, 2], 4096, True, True)  # 64 threads, 4 KB of parameters
    with pytest.raises(RuntimeError, match="current stream"):
        CTL.probe_launch([1, 1, 1], [32, 1, 1], 8, False, True)
    CTL.probe_launch([1, 1, 1], [32, 1, 1], 8, True, False)  # not followed by a launch check
    with pytest.raises(RuntimeError, match="C10_CUDA_KERNEL_LAUNCH_CHECK"):
        CTL.probe_launch([1, 1, 1], [32, 1, 1], 8, True, True)
    CTL.probe_launch([1, 1, 1], [32, 1, 1], 8, True, True)  # the report cleared the state


@pytest.mark.parametrize("mode", ["fiber", "os"])
def test_planted_kernel_without_defect(mode):
    x = torch.randn(4 * 256, generator=torch.Generator().manual_seed(2))
    with simt.mode(mode):
        got = CTL.planted("none", x)
    torch.testing.assert_close(got.double(), x.double().view(4, 256).sum(1), rtol=1e-5, atol=1e-4)


def test_planted_missing_barrier_gives_wrong_sums():
    # Thread 0 reads the other warps' shared-memory slots before they are written: they hold the
    # 0xff poison (NaN) the emulator fills __shared__ memory with at the start of each block.
    x = torch.randn(4 * 256, generator=torch.Generator().manual_seed(2))
    got = CTL.planted("missing_barrier", x)
    want = x.double().view(4, 256).sum(1)
    assert not torch.allclose(got.double(), want, rtol=1e-3, atol=1e-3, equal_nan=False)


@pytest.mark.parametrize("mode", ["fiber", "os"])
@pytest.mark.parametrize("kernel,report", [
    ("divergent_shuffle", "(?s)deadlock.*__shfl_down_sync"),
    ("shuffle_after_exit", "exited"),
    # OS threads: whichever comes first, the exit or the wait, is reported
    ("exit_before_barrier", "exited while .* waits at __syncthreads|waits at __syncthreads .* has exited"),
    ("divergent_barrier", "divergent __syncthreads"),
])
def test_planted_divergence_is_reported(mode, kernel, report):
    x = torch.randn(2 * 256)
    with simt.mode(mode), pytest.raises(RuntimeError, match=report):
        CTL.planted(kernel, x)


def test_os_thread_mode_matches_fibers():
    x = make((6, 5, 7, 9), torch.float32, 3, "channels_last")
    w, b = params(5, torch.float32, 1)
    fib = S.batch_norm_forward(x, w, b, None, None, True, EPS, True)
    with simt.mode("os"):
        osr = S.batch_norm_forward(x, w, b, None, None, True, EPS, True)
    for a, r in zip(fib, osr):
        assert torch.equal(a, r)


def test_reduction_plans_follow_the_sm_count():
    x = make((64, 3, 33, 17), torch.float32, 0)
    grids = {}
    for sms in SMS:
        with simt.sm_count(sms):
            CTL.launch_stats(True)
            S.batch_norm_forward(x, None, None, None, None, True, EPS, False)
            grids[sms] = CTL.launch_stats(True)[4]  # the largest grid.y: the row groups G
    assert grids[1] < grids[7] <= grids[132], grids


# =================================================================================================
# ThreadSanitizer (.ci/sanitize.sh thread): BatchNorm's kernels and the planted ones built with
# -fsanitize=thread (tests/simt.py SOURCES_TSAN), one OS thread per CUDA thread, in a subprocess with
# libtsan preloaded. Skipped in the normal suite (a second build of the emulator, minutes).
# =================================================================================================

TSAN = pytest.mark.skipif(os.environ.get("BNEXT_SIMT_TSAN") != "1",
                          reason="ThreadSanitizer run only: .ci/sanitize.sh thread")

_TSAN_PRELUDE = """
import sys, math, torch
sys.path.insert(0, {tests!r})
import simt
S = simt.load(sanitize="thread")
ctl = torch.ops.bnext_simt_ctl
assert ctl.mode() == "os"
"""

_TSAN_REAL = """
ops = torch.ops.bnext
for lay in ("contiguous", "channels_last"):
    x = torch.randn(16, 40, 9, 8) * 2 + 1  # several row groups per channel, two channel tiles
    if lay == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(40) + 0.5, torch.randn(40)
    dy = torch.randn_like(x)
    y, m, v = S.batch_norm_forward(x, w, b, None, None, True, 1e-5, True)
    yc, mc, vc = ops.batch_norm_forward(x, w, b, None, None, True, 1e-5, True)
    torch.testing.assert_close(y, yc, rtol=1e-5, atol=1e-5)
    dx = S.batch_norm_backward(dy, x, w, b, m, v, True, 1e-5, True)[0]
    torch.testing.assert_close(dx, ops.batch_norm_backward(dy, x, w, b, mc, vc, True, 1e-5, True)[0], rtol=1e-4, atol=1e-4)
    y = S.batch_norm_forward(x, w, b, m, v, False, 1e-5, False)[0]
    torch.testing.assert_close(y, ops.batch_norm_forward(x, w, b, m, v, False, 1e-5, False)[0], rtol=1e-5, atol=1e-5)
    S.batch_norm_backward(dy, x, w, b, m, v, False, 1e-5, False)
print("DONE")
"""


def _run_tsan(code):
    import subprocess
    import sys

    prelude = _TSAN_PRELUDE.format(tests=str(simt.ROOT / "tests"))
    # Build first without libtsan preloaded (the compilers crash under it); loading the instrumented
    # library then fails in this subprocess, as expected, and succeeds in the next one.
    subprocess.run([sys.executable, "-c", prelude.split("ctl =")[0]], capture_output=True, text=True,
                   env=dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "1")), timeout=3000)
    lib = subprocess.run(["gcc", "-print-file-name=libtsan.so"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, LD_PRELOAD=lib, OMP_NUM_THREADS="1",
               TSAN_OPTIONS="halt_on_error=0 exitcode=0 report_signal_unsafe=0")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env,
                          timeout=3000)


@TSAN
def test_tsan_reports_the_planted_missing_barrier():
    clean = _run_tsan("print(ctl.planted('none', torch.randn(2 * 256)))\nprint('DONE')")
    assert "DONE" in clean.stdout and "ThreadSanitizer" not in clean.stderr, clean.stderr[-3000:]
    racy = _run_tsan("print(ctl.planted('missing_barrier', torch.randn(2 * 256)))\nprint('DONE')")
    assert "DONE" in racy.stdout, racy.stderr[-3000:]
    assert "WARNING: ThreadSanitizer: data race" in racy.stderr and "block_sum_kernel" in racy.stderr, \
        racy.stderr[-3000:]


@TSAN
def test_tsan_finds_no_race_in_the_batch_norm_kernels():
    run = _run_tsan(_TSAN_REAL)
    assert "DONE" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-6000:]


# =================================================================================================
# tests/test_cuda_variants.py's l_p cases (CUDA vs CPU, training and eval) and l_p at each SM count
# =================================================================================================

import test_cuda_variants as tv  # noqa: E402


@pytest.mark.parametrize("p", [1, 2, math.inf])
@pytest.mark.parametrize("shape", tv.SHAPES)
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_lp_norm_matches_cpu(p, shape, lay, dtype, training):
    x = tv._layout(torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2 + 1,
                   lay).to(dtype)
    C = shape[1]
    pd = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    w, b = torch.rand(C, dtype=pd) + 0.5, torch.randn(C, dtype=pd)
    rm, rn = torch.randn(C, dtype=pd), torch.rand(C, dtype=pd) + 0.5
    g = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    sim, cpu = lp_case(S, x, p, w, b, g, training, rm, rn), lp_case(ops, x, p, w, b, g, training, rm, rn)
    tol = tv.TOL[dtype]
    for a, r, name in zip(sim, cpu, ("y", "dx", "sum_dy_xhat", "sum_dy", "mean", "norm", "argmax")):
        assert a.dtype == r.dtype and a.shape == r.shape and a.stride() == r.stride(), name
        torch.testing.assert_close(a.double(), r.double(), rtol=tol, atol=tol * max(1.0, r.double().abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")


def test_linf_ties_pick_the_same_element_as_cpu():
    x = torch.randn(4, 2, 8, 8)
    x[0, 0, 3, 3], x[2, 0, 0, 0], x[3, 1, 1, 1], x[0, 1, 7, 7] = 9.0, -9.0, 9.0, -9.0
    for lay in ("contiguous", "channels_last"):
        xs = tv._layout(x, lay)
        a = ops.lp_norm_forward(xs, math.inf, None, None, None, None, True, EPS)[3]
        b = S.lp_norm_forward(xs, math.inf, None, None, None, None, True, EPS)[3]
        assert a.tolist() == b.tolist() == [3 * 8 + 3, 7 * 8 + 7]


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_lp_norm_multi_block(sms, lay, p):
    shape = (64, 16, 16, 16)  # 16384 values per channel: several row groups on the larger GPUs
    x, dy = make(shape, torch.float32, 14, lay), make(shape, torch.float32, 15, lay, scale=1.0, shift=0.0)
    w, b = params(16, torch.float32, 5)
    with simt.sm_count(sms):
        sim = lp_case(S, x, p, w, b, dy, True)
    want = reference_grads(lambda xr, wr, br: lp64(xr, p, wr, br), x, w, b, dy)
    assert_all_close(sim[:4], [t.float() for t in want], torch.float32, ("y", "dx", "dw", "db"))
    assert_all_close(sim[:6], lp_case(ops, x, p, w, b, dy, True)[:6], torch.float32,
                     ("y", "dx", "dw", "db", "mean", "norm"))


# =================================================================================================
# tests/test_numerics.py's |mean| >> std cases through the raw ops: the CPU op passes them (checked
# here too, so the tolerances are attainable); the CUDA kernels pass them since the numerics of issue 24
# were fixed (tests/test_simt_numerics.py has more of them).
# =================================================================================================

import test_numerics as tn  # noqa: E402


def raw_bn(ns, x, w, b, g, relu=False):
    y, mean, var = ns.batch_norm_forward(x, w, b, None, None, True, EPS, relu)
    dx, sdy, sdyx = ns.batch_norm_backward(g.to(x.dtype), x, w, b, mean, var, True, EPS, relu)
    return y, dx, sdyx, sdy


def raw_noisy(ns, x, w, b, g, seed):
    y, mean, var = ns.noisy_batch_norm_forward(x, w, b, EPS, seed, PAPER, x.shape[1])
    dx, sdy, sdyx = ns.noisy_batch_norm_backward(g.to(x.dtype), x, w, b, mean, var, EPS, seed, PAPER, x.shape[1])
    return y, dx, sdyx, sdy


def raw_lp(ns, x, p, w, b, g):
    y, mean, norm, am = ns.lp_norm_forward(x, p, w, b, None, None, True, EPS)
    dx, sdy, sdyx = ns.lp_norm_backward(g.to(x.dtype), x, p, w, b, mean, norm, am, True, EPS)
    return y, dx, sdyx, sdy


def check_extreme(run, ref_fn, lay, zero_bias=False):
    """test_numerics.check_extreme with the raw ops of run(x, w, b, g): y, dx, dw, db per channel
    within 1e-3 of the float64 reference's max |ref|."""
    x, w, b = tn.extreme_case(lay)
    if zero_bias:
        b = torch.zeros_like(b)
    g = torch.rand(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    got = run(x, w, b, g)
    want = reference_grads(ref_fn, x, w, b, g)
    for name, a, r in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, want):
        tn.assert_rel(a, r, name)


def bn_ref(relu):
    return lambda x, w, b: (F.relu if relu else (lambda t: t))(F.batch_norm(x, None, None, w, b, training=True))


def lp_ref(p):
    def ref(x, w, b):
        xc = x - x.mean([0, 2, 3], keepdim=True)
        n = tn.channel_norm(x, p).view(1, -1, 1, 1)
        return xc / (n + EPS) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    return ref


BACKENDS = ["simt", "cpu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_extreme_mean_batch_norm_fp32(backend, lay, relu):
    ns = S if backend == "simt" else ops
    check_extreme(lambda x, w, b, g: raw_bn(ns, x, w, b, g, relu), bn_ref(relu), lay)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
def test_extreme_mean_noisy_batch_norm_fp32(backend, lay):
    ns = S if backend == "simt" else ops
    x, _, _ = tn.extreme_case(lay)
    seed = torch.tensor(7)
    s, m = (t.double() for t in exact_noise(x.shape, seed))
    check_extreme(lambda x, w, b, g: raw_noisy(ns, x, w, b, g, seed),
                  lambda x, w, b: s * F.batch_norm(x, None, None, w, b, training=True) + m, lay)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
@pytest.mark.parametrize("p", [1.0, 2.0, math.inf], ids=["p1", "p2", "pinf"])
def test_extreme_mean_lp_norm_fp32(backend, lay, p):
    ns = S if backend == "simt" else ops
    # b = 0: y = (x - mean) / N is ~1e-5, so its own relative accuracy is what is tested
    check_extreme(lambda x, w, b, g: raw_lp(ns, x, p, w, b, g), lp_ref(p), lay, zero_bias=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
def test_large_mean_sync_statistics_have_fp64_precision(backend, lay):
    # The sync ops' fp64 outputs feed a cross-rank merge in fp64 (bnext/distributed.py): |mean| = 1e4,
    # std = 1, fp32 input. The mean to 1e-6 std and m2 to 1e-5 relative: the CPU's fp64 merges give
    # 9e-8 and 6e-6 (channels-last), the CUDA kernels (fp64 merges of per-thread partials around a
    # shift) 1.9e-9 and 9.1e-9, where their former fp32 merges gave 9e-4 and 2.1e-5.
    ns = S if backend == "simt" else ops
    x = tn.shifted(lay)
    xd = x.double()
    mean, m2 = ns.batch_norm_stats(x)
    mean_ref = xd.mean([0, 2, 3])
    torch.testing.assert_close(mean, mean_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(m2, ((xd - mean_ref.view(1, 3, 1, 1)) ** 2).sum([0, 2, 3]), rtol=1e-5, atol=0)
    s, pw, _ = ns.lp_norm_stats(x, 2.0)
    torch.testing.assert_close(s, xd.sum([0, 2, 3]), rtol=1e-7, atol=0)
    torch.testing.assert_close(pw, (xd ** 2).sum([0, 2, 3]), rtol=1e-7, atol=0)
