"""The CUDA kernels against the CPU kernels and against independent float64 references: seven
defects of earlier CUDA kernels pinned (the CPU-side twins run without a GPU), the distributed ops, noisy
BatchNorm and l_p with weight/bias gradients, the noise bitwise, shapes that split into several row
groups and channel tiles, l_inf ties across blocks, NaN, empty inputs, > 2^31 elements
(BNEXT_TEST_HUGE=1), and the short subset compute-sanitizer runs (test_sanitizer_subset).

CUDA tests skip without a GPU or without a CUDA build of bnext."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bnext
from bnext.ops import draw_seed

ops = torch.ops.bnext

HAS_CUDA = torch.cuda.is_available() and bnext.build_info()["cuda"]
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of bnext")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]
HUGE = os.environ.get("BNEXT_TEST_HUGE") == "1"

PAPER = [0.5, 1.25, 0.1, 0.1]  # noise_mean, noise_std, noise_mean_spread, noise_std_spread
EPS = 1e-5
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# |actual - float64 reference| <= TOL * max(1, max |reference|), per input dtype.
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
CL = {4: torch.channels_last, 5: torch.channels_last_3d}


def layout(x, name):
    if name == "channels_last" and x.dim() in CL:
        return x.contiguous(memory_format=CL[x.dim()])
    return x


def make(shape, dtype, device, seed, lay="contiguous", scale=2.0, shift=0.5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift
    return layout(x.to(dtype), lay).to(device)


def params(C, dtype, seed):
    gen = torch.Generator().manual_seed(seed + 100)
    pd = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return torch.rand(C, generator=gen, dtype=pd) + 0.5, torch.randn(C, generator=gen, dtype=pd)


def dims(x):
    return [0] + list(range(2, x.dim()))


def cv(v, x):
    return v.view([1, -1] + [1] * (x.dim() - 2))


def assert_ref(actual, ref, dtype, what):
    a, r = actual.detach().double().cpu(), ref.detach().double().cpu()
    scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
    torch.testing.assert_close(a, r, rtol=0, atol=TOL[dtype] * scale, msg=lambda m: f"{what}: {m}")


def exact_noise(shape, seed, noise=PAPER, nc=None, offset=0, device="cpu"):
    """(s, m) in fp32 exactly as the kernels draw them: noise_apply on ones (y = 1 * s) and on zeros
    (y = s * 0 + m)."""
    nc = shape[1] if nc is None else nc
    ones = torch.ones(shape, device=device)
    s = ops.noise_apply(ones, seed, noise, nc, offset, False)
    m = ops.noise_apply(torch.zeros_like(ones), seed, noise, nc, offset, True)
    return s, m


# =================================================================================================
# The seven defects
# =================================================================================================

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (2, 0, 5), (0, 0)])
def test_empty_training_batch_gives_empty_output_and_nan_statistics(device, shape):
    # defect 1: the CUDA BatchNorm rejected what the CPU op, the noisy and l_p ops and torch accept.
    x = torch.randn(shape, device=device)
    C = shape[1]
    y, mean, var = ops.batch_norm_forward(x, None, None, None, None, True, EPS, False)
    assert y.shape == x.shape and mean.shape == var.shape == (C,)
    assert torch.isnan(mean).all() and torch.isnan(var).all()
    y2, mean2, var2 = ops.noisy_batch_norm_forward(x, None, None, EPS, torch.tensor(3), PAPER, C)
    assert y2.shape == x.shape and torch.isnan(mean2).all() and torch.isnan(var2).all()
    y3, mean3, norm3, am3 = ops.lp_norm_forward(x, 2.0, None, None, None, None, True, EPS)
    assert y3.shape == x.shape and torch.isnan(mean3).all() and (am3 == -1).all()
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    out = bnext.batch_norm(x, rm, rv, training=True)
    assert out.shape == x.shape and torch.equal(rm, torch.zeros_like(rm)) and torch.equal(rv, torch.ones_like(rv))
    dx, sdy, sdyx = ops.batch_norm_backward(torch.randn_like(x), x, None, None, mean, var, True, EPS, False)
    assert dx.shape == x.shape and sdy.shape == sdyx.shape == (C,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_axpy_rounds_product_and_difference_separately(device, dtype):
    # defect 2: nvcc fused x - eta * d into one FMA (one rounding); the CPU rounds twice. Both must
    # equal torch's own two-step x - (eta * d) bit for bit.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(11)
    x = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).to(device) for n in (70_001, 33, 1)]
    d = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype).to(device) for t in x]
    etas = [0.3, -1.7, 1e-3, 3.1]
    outs = bnext.multi_axpy(x, d, etas)
    discriminates = False
    for o, xi, di in zip(outs, x, d):
        for k, eta in enumerate(etas):
            e = torch.tensor(eta, dtype=acc, device=device)
            two_roundings = (xi.to(acc) - e * di.to(acc)).to(dtype)
            assert torch.equal(o[k], two_roundings), f"{dtype} on {device}, eta={eta}"
            if acc == torch.float32:  # in fp64 the fp32 product is exact: one rounding, as an FMA
                one_rounding = (xi.double() - e.double() * di.double()).to(acc).to(dtype)
                discriminates |= not torch.equal(one_rounding, two_roundings)
    assert discriminates or acc == torch.float64, "the data does not tell one rounding from two"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
def test_noisy_backward_rounds_g_to_the_input_dtype(device, dtype, lay):
    # defect 3: g = dy * s is rounded to the input dtype before the sums and dx, on both devices.
    # Per channel sum_dy ~ 240 is accumulated to ~1e-3 (fp32); rounding g or not moves it by 0.09
    # (fp16) / 0.98 (bf16) on this data.
    shape = (64, 3, 32, 32)
    x, dy = make(shape, dtype, device, 1, lay), make(shape, dtype, device, 2, lay, scale=1.0, shift=0.0)
    seed = torch.tensor(987654321)
    w = params(3, dtype, 0)[0].to(device)
    y, mean, var = ops.noisy_batch_norm_forward(x, w, None, EPS, seed, PAPER, 3)
    dx, sdy, sdyx = ops.noisy_batch_norm_backward(dy, x, w, None, mean, var, EPS, seed, PAPER, 3)
    s, _ = exact_noise(shape, seed)
    g_rounded = (dy.cpu().float() * s).to(dtype).double()
    ref = g_rounded.sum(dims(x))
    torch.testing.assert_close(sdy.double().cpu(), ref, rtol=0, atol=5e-3)
    if dtype != torch.float32:  # the data tells the two definitions apart
        g_exact = dy.cpu().double() * s.double()
        assert (g_exact.sum(dims(x)) - ref).abs().max() > 0.05
    if device == "cuda":
        cpu = ops.noisy_batch_norm_backward(dy.cpu(), x.cpu(), w.cpu(), None, mean.cpu(), var.cpu(), EPS, seed,
                                            PAPER, 3)
        for a, r, name in zip((dx, sdy, sdyx), cpu, ("dx", "sum_dy", "sum_dy_xhat")):
            assert_ref(a, r, dtype, name)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_eval_mode_elementwise_results_are_bitwise_equal_to_cpu(dtype, lay, p):
    # defect 4: l_p's per-channel scale is inv * w with inv = 1 / (N + eps) rounded to acc_t, on both
    # devices; in eval mode nothing is reduced for y and dx, so CPU and CUDA agree bit for bit (no FMA
    # on either side). BatchNorm's eval path is held to the same.
    shape = (4, 5, 6, 7)
    x, dy = make(shape, dtype, "cpu", 3, lay), make(shape, dtype, "cpu", 4, lay)
    w, b = params(5, dtype, 1)
    rm, rn = torch.randn(5, dtype=w.dtype), torch.rand(5, dtype=w.dtype) + 0.5
    am = torch.full((5,), -1, dtype=torch.long)
    res = {}
    for dev in ("cpu", "cuda"):
        t = lambda v: v.to(dev)  # noqa: E731
        y = ops.lp_norm_forward(t(x), p, t(w), t(b), t(rm), t(rn), False, EPS)[0]
        dx = ops.lp_norm_backward(t(dy), t(x), p, t(w), t(b), t(rm), t(rn), t(am), False, EPS)[0]
        ybn = ops.batch_norm_forward(t(x), t(w), t(b), t(rm), t(rn), False, EPS, True)[0]
        dxbn = ops.batch_norm_backward(t(dy), t(x), t(w), t(b), t(rm), t(rn), False, EPS, True)[0]
        res[dev] = [v.cpu() for v in (y, dx, ybn, dxbn)]
    for a, r, name in zip(res["cuda"], res["cpu"], ("lp y", "lp dx", "bn y", "bn dx")):
        assert torch.equal(a, r), f"{name}: max diff {(a.double() - r.double()).abs().max()}"


_BAD_ARGMAX = """
import torch, bnext
x = torch.randn(4, 2, 8, device="cuda")
_, mean, norm, argmax = torch.ops.bnext.lp_norm_forward(x, float("inf"), None, None, None, None, True, 1e-5)
bad = torch.tensor([3, 32], device="cuda")  # 32 is past the channel's 32 values
dx = torch.ops.bnext.lp_norm_backward(torch.randn_like(x), x, float("inf"), None, None, mean, norm, bad, True, 1e-5)[0]
torch.cuda.synchronize()
print("NO ERROR", dx.sum().item())
"""


@pytest.mark.parametrize("device", DEVICES)
def test_linf_backward_rejects_an_out_of_range_argmax(device):
    # defect 5: the CPU raises; CUDA fails a device-side assertion (no host sync). The assertion
    # poisons the CUDA context, so the CUDA case runs in a subprocess.
    x = torch.randn(4, 2, 8, device=device)
    _, mean, norm, argmax = ops.lp_norm_forward(x, math.inf, None, None, None, None, True, EPS)
    dy = torch.randn_like(x)
    fine = ops.lp_norm_backward(dy, x, math.inf, None, None, mean, norm, torch.full_like(argmax, -1), True, EPS)[0]
    assert torch.isfinite(fine).all()
    if device == "cpu":
        with pytest.raises(RuntimeError, match="argmax"):
            ops.lp_norm_backward(dy, x, math.inf, None, None, mean, norm, torch.tensor([3, 32]), True, EPS)
        return
    proc = subprocess.run([sys.executable, "-c", _BAD_ARGMAX], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode != 0 and "NO ERROR" not in proc.stdout, proc.stdout + proc.stderr
    assert "device-side assert" in proc.stderr or "argmax" in proc.stderr, proc.stderr[-2000:]


@cuda
def test_multi_tensor_ops_never_synchronize_and_span_several_launches():
    # defect 6: the metadata travels as kernel arguments (no pageable host-to-device copy, which
    # synchronizes); lists longer than one launch's 48 tensors and more than 64 step sizes.
    gen = torch.Generator().manual_seed(5)
    shapes = [(3,), (0,), (70_000,), (5, 7)] * 30  # 120 tensors, some empty, some of several chunks
    a = [torch.randn(s, generator=gen).cuda() for s in shapes]
    b = [torch.randn(s, generator=gen).cuda() for s in shapes]
    etas = [0.01 * k - 0.3 for k in range(70)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = ops.grad_stats(a, b)
        outs = ops.multi_axpy(a, b, etas)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = torch.stack([torch.stack([(x.double() ** 2).sum(), (y.double() ** 2).sum(),
                                    ((x.double() - y.double()) ** 2).sum(), (x.double() * y.double()).sum()])
                       for x, y in zip(a, b)])
    torch.testing.assert_close(stats, ref, rtol=1e-12, atol=1e-12)
    for o, x, y in zip(outs, a, b):
        assert o.shape == (70, *x.shape)
        for k in (0, 47, 64, 69):
            assert torch.equal(o[k], x - torch.tensor(etas[k], device="cuda") * y)


@cuda
def test_multi_tensor_ops_replay_in_a_cuda_graph():
    # defect 6: the call can be captured; a replay reads the tensors' current values.
    a = [torch.randn(100, device="cuda"), torch.randn(3, 70_000, device="cuda")]
    b = [torch.randn_like(t) for t in a]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.grad_stats(a, b), ops.multi_axpy(a, b, [0.5, 2.0])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stats = ops.grad_stats(a, b)
        outs = ops.multi_axpy(a, b, [0.5, 2.0])
    for t in a + b:
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(stats[:, 0], torch.stack([(t.double() ** 2).sum() for t in a]), rtol=1e-12, atol=0)
    assert torch.equal(outs[1][1], a[1] - torch.tensor(2.0, device="cuda") * b[1])


@cuda
@pytest.mark.parametrize("shape,nc,offset", [((4, 6, 8, 8), 6, 0), ((3, 4, 5, 7), 4, 0), ((5, 8), 8, 0),
                                             ((3, 6, 5), 3, 0), ((2, 4, 6, 6), 4, 7), ((2, 3, 9), 3, 1 << 29)])
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
def test_noise_is_bitwise_equal_to_cpu(shape, nc, offset, lay):
    # defect 7 (one thread per pair of elements when S is even, one per element when odd): the same
    # noise as the CPU bit for bit, also under a period (vmap) and at a sample offset whose logical
    # indices pass 2^31.
    seed = torch.tensor(424242)
    ones = layout(torch.ones(shape), lay)
    for forward, inp in ((False, ones), (True, layout(torch.zeros(shape), lay))):
        cpu = ops.noise_apply(inp, seed, PAPER, nc, offset, forward)
        gpu = ops.noise_apply(inp.cuda(), seed, PAPER, nc, offset, forward).cpu()
        assert torch.equal(gpu, cpu), f"forward={forward}: max diff {(gpu - cpu).abs().max()}"


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 4, 5, 5), (6, 4, 4, 6)])
def test_noise_s_and_m_in_every_dtype(dtype, shape):
    seed = torch.tensor(77)
    s32, m32 = exact_noise(shape, seed)
    for dev in ("cpu", "cuda"):
        s = ops.noise_apply(torch.ones(shape, dtype=dtype, device=dev), seed, PAPER, shape[1], 0, False).cpu()
        m = ops.noise_apply(torch.zeros(shape, dtype=dtype, device=dev), seed, PAPER, shape[1], 0, True).cpu()
        assert s.dtype == m.dtype == dtype
        assert torch.equal(s, s32.to(dtype)) and torch.equal(m, m32.to(dtype)), dev
    s_api, m_api = bnext.ops.noisy_batch_norm_noise(torch.empty(shape, dtype=dtype, device="cuda"), seed, PAPER)
    s_cpu, m_cpu = bnext.ops.noisy_batch_norm_noise(torch.empty(shape, dtype=dtype), seed, PAPER)
    assert torch.equal(s_api.cpu(), s_cpu) and torch.equal(m_api.cpu(), m_cpu)


# =================================================================================================
# Distributed ops on CUDA vs CPU
# =================================================================================================

@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
def test_distributed_ops_match_cpu(dtype, lay):
    shape = (6, 40, 9, 8)
    x, ge = make(shape, dtype, "cpu", 5, lay), make(shape, dtype, "cpu", 6, lay)
    gpu = lambda f, *a: f(*[t.cuda() if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in a])  # noqa: E731
    mean_c, m2_c = ops.batch_norm_stats(x)
    mean_g, m2_g = gpu(ops.batch_norm_stats, x)
    ref = x.double()
    torch.testing.assert_close(mean_g.cpu(), ref.mean(dims(x)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m2_g.cpu(), ((ref - cv(ref.mean(dims(x)), ref)) ** 2).sum(dims(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean_g.cpu(), mean_c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m2_g.cpu(), m2_c, rtol=1e-5, atol=1e-5)
    for p in (1.0, 2.0, math.inf):
        sc, pc, ac = ops.lp_norm_stats(x, p)
        sg, pg, ag = gpu(ops.lp_norm_stats, x, p)
        torch.testing.assert_close(sg.cpu(), sc, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(pg.cpu(), pc, rtol=1e-5, atol=1e-4)
        assert torch.equal(ag.cpu(), ac)
    C = shape[1]
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    center, a, b = torch.randn(C, dtype=pd), torch.randn(C, dtype=pd), torch.randn(C, dtype=pd)
    for sign in (False, True):
        dc = ops.sync_backward_elementwise(ge, x, center, a, b, sign)
        dg = gpu(ops.sync_backward_elementwise, ge, x, center, a, b, sign).cpu()
        assert torch.equal(dg, dc), f"sign={sign}"  # elementwise only: same formula, same rounding
    seed = torch.tensor(31337)
    for offset in (0, 5, 1000):
        for forward in (True, False):
            yc = ops.noise_apply(x, seed, PAPER, C, offset, forward)
            yg = gpu(ops.noise_apply, x, seed, PAPER, C, offset, forward).cpu()
            assert torch.equal(yg, yc), f"offset={offset}, forward={forward}"


# =================================================================================================
# Noisy BatchNorm and l_p against float64 references, weight and bias gradients included
# =================================================================================================

def bn64(x, w, b):
    mean = x.mean(dims(x), keepdim=True)
    var = x.var(dims(x), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * cv(w, x) + cv(b, x)


def lp64(x, p, w, b):
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    if p == 1:
        n = flat.abs().mean(1)
    elif p == 2:
        n = flat.pow(2).mean(1).sqrt()
    else:
        n = flat.abs().gather(1, flat.abs().argmax(1, keepdim=True)).view(-1)  # the first arg-max
    mean = x.mean(dims(x), keepdim=True)
    return (x - mean) / (cv(n, x) + EPS) * cv(w, x) + cv(b, x)


def grads_vs_reference(run, ref_fn, x, w, b, dy, dtype, what):
    """run(x, w, b) on CUDA leaves vs ref_fn on float64 CPU leaves: y, dx, dw, db."""
    xs, ws, bs = (t.detach().cuda().requires_grad_() for t in (x, w, b))
    y = run(xs, ws, bs)
    got = (y, *torch.autograd.grad(y, (xs, ws, bs), dy.cuda()))
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = ref_fn(xr, wr, br)
    want = (yr, *torch.autograd.grad(yr, (xr, wr, br), dy.double()))
    for a, r, name in zip(got, want, ("y", "dx", "dw", "db")):
        assert_ref(a, r, dtype, f"{what} {name}")


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(8, 3, 7, 9), (4, 40, 6, 6), (64, 16), (64, 40, 32, 32)])
def test_noisy_batch_norm_matches_float64_reference(dtype, lay, shape):
    # (64, 40, 32, 32): several row groups per channel in both layouts and two channel tiles.
    x, dy = make(shape, dtype, "cpu", 7, lay), make(shape, dtype, "cpu", 8, lay, scale=1.0, shift=0.0)
    w, b = params(shape[1], dtype, 2)
    seed = draw_seed(torch.Generator().manual_seed(9))
    s, m = exact_noise(shape, seed)
    run = lambda xs, ws, bs: bnext.noisy_batch_norm(  # noqa: E731
        xs, None, None, ws, bs, training=True, generator=torch.Generator().manual_seed(9))
    grads_vs_reference(run, lambda xr, wr, br: s.double() * bn64(xr, wr, br) + m.double(), x, w, b, dy, dtype,
                       "noisy_bn")


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(8, 3, 7, 9), (4, 40, 6, 6), (64, 16), (64, 40, 32, 32)])
@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_lp_norm_matches_float64_reference(dtype, lay, shape, p):
    x, dy = make(shape, dtype, "cpu", 10, lay), make(shape, dtype, "cpu", 11, lay, scale=1.0, shift=0.0)
    w, b = params(shape[1], dtype, 3)
    run = lambda xs, ws, bs: bnext.lp_norm(xs, p, None, None, ws, bs, training=True)  # noqa: E731
    grads_vs_reference(run, lambda xr, wr, br: lp64(xr, p, wr, br), x, w, b, dy, dtype, f"lp{p}")


@cuda
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
def test_linf_tie_across_row_groups_takes_the_first_position(lay):
    # Channel 0's max |x| = 9 at positions 5 (n = 0) and 59 * 1024 + 1 (n = 59), far apart enough to
    # land in different row groups; -9 first, so the sign of the gradient term tells which one won.
    # Channel 1's tie is between the last element and one in the middle.
    shape = (64, 2, 32, 32)
    x = torch.randn(shape, dtype=torch.float64).clamp(-3, 3)
    x[0, 0, 0, 5], x[59, 0, 0, 1] = -9.0, 9.0
    x[30, 1, 2, 2], x[63, 1, 31, 31] = 9.0, 9.0
    x = layout(x.float(), lay)
    _, _, norm, argmax = ops.lp_norm_forward(x.cuda(), math.inf, None, None, None, None, True, EPS)
    assert argmax.cpu().tolist() == [5, 30 * 1024 + 2 * 32 + 2]
    assert norm.cpu().tolist() == [9.0, 9.0]
    w, b = params(2, torch.float32, 4)
    dy = make(shape, torch.float32, "cpu", 12, lay, scale=1.0, shift=0.0)
    run = lambda xs, ws, bs: bnext.lp_norm(xs, math.inf, None, None, ws, bs, training=True)  # noqa: E731
    grads_vs_reference(run, lambda xr, wr, br: lp64(xr, math.inf, wr, br), x, w, b, dy, torch.float32, "tie")


@cuda
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
def test_nan_stays_in_its_channel_as_on_cpu(lay):
    shape = (8, 3, 5, 6)
    x = make(shape, torch.float32, "cpu", 13, lay)
    x[2, 1, 3, 4] = float("nan")
    for name, f in (("bn", lambda t: ops.batch_norm_forward(t, None, None, None, None, True, EPS, False)),
                    ("noisy", lambda t: ops.noisy_batch_norm_forward(t, None, None, EPS, torch.tensor(5), PAPER, 3)),
                    ("l1", lambda t: ops.lp_norm_forward(t, 1.0, None, None, None, None, True, EPS)),
                    ("linf", lambda t: ops.lp_norm_forward(t, math.inf, None, None, None, None, True, EPS))):
        cpu, gpu = f(x), [t.cpu() for t in f(x.cuda())]
        y, yg = cpu[0], gpu[0]
        assert torch.isnan(yg[:, 1]).all() and torch.isfinite(yg[:, [0, 2]]).all(), name
        torch.testing.assert_close(yg[:, [0, 2]], y[:, [0, 2]], rtol=1e-5, atol=1e-5)
        for a, r in zip(gpu[1:], cpu[1:]):
            assert torch.equal(torch.isnan(a), torch.isnan(r)), name
        if name == "linf":
            assert gpu[3].tolist() == cpu[3].tolist() and gpu[3][1].item() == 2 * 30 + 3 * 6 + 4


@cuda
@pytest.mark.skipif(not HUGE, reason="set BNEXT_TEST_HUGE=1 (needs ~40 GB of GPU memory, ~1 min)")
def test_more_than_2_to_31_elements_noisy_and_lp():
    # One channel of M > 2^31 values: flat offsets, positions and the arg-max past 2^31.
    M = (1 << 31) + 64
    x = torch.randn(1, 1, M, device="cuda", dtype=torch.bfloat16)
    x[0, 0, -3] = 100.0
    _, mean, norm, argmax = ops.lp_norm_forward(x, math.inf, None, None, None, None, True, EPS)
    assert argmax.item() == M - 3 and norm.item() == 100.0
    xf = x.float()
    mean64, var64 = xf.mean().double(), xf.var(unbiased=False).double()
    del xf
    assert abs(mean.item() - mean64.item()) < 1e-4
    # dy = x: dx_i = (x_i - mean_dy - [i = arg-max] q sign(x_i)) / d, mean_dy = mean, q = M var / d
    dx = ops.lp_norm_backward(x, x, math.inf, None, None, mean, norm, argmax, True, EPS)[0]
    d = 100.0 + EPS
    idx = torch.cat([torch.arange(0, 1000), torch.arange(M - 1000, M)]).cuda()
    xs = x[0, 0, idx].double()
    ref = (xs - mean64) / d
    ref[-3] -= M * var64 / d / d
    torch.testing.assert_close(dx[0, 0, idx].double(), ref, rtol=2e-2, atol=1e-3)
    del dx
    y, nmean, nvar = ops.noisy_batch_norm_forward(x, None, None, EPS, torch.tensor(99), PAPER, 1)
    assert abs(nmean.item() - mean64.item()) < 1e-4 and abs(nvar.item() - var64.item()) < 1e-3 * var64.item()
    assert torch.isfinite(y[0, 0, -64:]).all()


# =================================================================================================
# The subset compute-sanitizer runs (.ci/gpu_check.sh): every kernel once, small shapes
# =================================================================================================

@cuda
def test_sanitizer_subset():
    seed = torch.tensor(123)
    for dtype in (torch.float32, torch.float16):
        for lay in ("contiguous", "channels_last"):
            for shape in ((6, 5, 4, 3), (3, 40, 16, 16), (33, 7)):
                x = make(shape, dtype, "cuda", 1, lay)
                dy = make(shape, dtype, "cuda", 2, lay)
                C = shape[1]
                w, b = (t.cuda() for t in params(C, dtype, 5))
                rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
                for training in (True, False):
                    for relu in (False, True):
                        y, mean, var = ops.batch_norm_forward(x, w, b, rm, rv, training, EPS, relu)
                        ops.batch_norm_backward(dy, x, w, b, mean, var, training, EPS, relu)
                    for p in (1.0, 2.0, math.inf):
                        y, mean, norm, am = ops.lp_norm_forward(x, p, w, b, rm, rv, training, EPS)
                        ops.lp_norm_backward(dy, x, p, w, b, mean, norm, am, training, EPS)
                y, mean, var = ops.noisy_batch_norm_forward(x, w, b, EPS, seed, PAPER, C)
                ops.noisy_batch_norm_backward(dy, x, w, b, mean, var, EPS, seed, PAPER, C)
                ops.batch_norm_stats(x)
                ops.lp_norm_stats(x, math.inf)
                ops.sync_backward_elementwise(dy, x, mean.float(), mean.float(), var.float(), True)
                ops.noise_apply(x, seed, PAPER, C, 3, True)
                ops.grad_stats([x.flatten(), w], [dy.flatten(), b])
                ops.multi_axpy([x.flatten(), w], [dy.flatten(), b], [0.5, 2.0])
    torch.cuda.synchronize()
