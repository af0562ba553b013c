"""Hardening: no leaks (resident memory flat over many fwd+bwd calls), thread safety (concurrent
calls from Python threads equal serial ones), bitwise independence of the thread count, and
regression tests for failures found by the fuzzers and the bad-input/numerics tables."""
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import bnext
from helpers import at_thread_counts
from op_registry import CONFIGS, NORM_OPS
from test_lp_norm import lp_norm_oracle

ops = torch.ops.bnext


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _x(shape=(8, 16, 12, 12), channels_last=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _fwd_bwd(op, x, gen_seed=0):
    """One forward + backward of `op` on x (float32 params); returns (output, grads) detached."""
    C = x.shape[1]
    pdt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xr = x.clone().requires_grad_()
    w = torch.linspace(0.5, 1.5, C, dtype=pdt).requires_grad_()
    b = torch.linspace(-1, 1, C, dtype=pdt).requires_grad_()
    rm, r2 = torch.zeros(C, dtype=pdt), torch.ones(C, dtype=pdt)
    if op in CONFIGS:
        name, training, kw = CONFIGS[op]
        if name == "noisy_batch_norm":
            kw = dict(kw, generator=torch.Generator().manual_seed(gen_seed))
        y = NORM_OPS[name](xr, rm, r2, w, b, training, 0.1, 1e-5, **kw)
    elif op == "grad_stats":
        return bnext.grad_stats([x, x[:1]], [x * 0.5 + 1, x[1:2]]), [rm]
    elif op == "multi_axpy":
        return bnext.multi_axpy([x, w.detach()], [x.sin(), b.detach().to(w.dtype)], [0.0, 0.5, -1.0]), [rm]
    else:
        raise AssertionError(op)
    gy = torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view(y.shape).to(y.dtype)
    grads = torch.autograd.grad(y, [xr, w, b], gy)
    return y.detach(), [g.detach() for g in grads] + [rm, r2]


OPS = list(CONFIGS) + ["grad_stats", "multi_axpy"]


@pytest.mark.skipif(os.environ.get("BNEXT_SANITIZE") == "1",
                    reason="AddressSanitizer's quarantine keeps freed memory resident")
@pytest.mark.parametrize("op", OPS)
def test_resident_memory_stays_flat(op):
    """Each call allocates ~4 input-sized tensors (36-73 KiB); a leak of any of them over 250 calls
    is >= 9 MiB. The allowance (6 MiB) covers allocator noise, not a per-call leak."""
    x = _x((8, 16, 12, 12))
    xs = [x, x.contiguous(memory_format=torch.channels_last), x.half()]
    for i in range(40):  # warm-up: allocator pools, lazy initialization, autograd caches
        _fwd_bwd(op, xs[i % 3], i)
    before = _rss_bytes()
    for i in range(250):
        _fwd_bwd(op, xs[i % 3], i)
    grown = _rss_bytes() - before
    assert grown < 6 * 2 ** 20, f"{op}: resident memory grew by {grown / 2 ** 20:.1f} MiB over 250 fwd+bwd calls"


def _equal(a, b):
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("op", OPS)
def test_concurrent_python_threads_match_serial(op):
    inputs = [_x((6, 8, 10, 10), channels_last=bool(i % 2), dtype=[torch.float32, torch.float16, torch.float64][i % 3],
                 seed=i) for i in range(12)]
    serial = [_fwd_bwd(op, x, i) for i, x in enumerate(inputs)]
    barrier = threading.Barrier(4)

    def work(i):
        if i < 4:
            barrier.wait()  # start the first four together
        return _fwd_bwd(op, inputs[i], i)

    for _ in range(2):
        with ThreadPoolExecutor(4) as pool:
            concurrent = list(pool.map(work, range(len(inputs))))
        for i, (s, c) in enumerate(zip(serial, concurrent)):
            assert _equal(s, c), f"{op}: input {i} differs between a concurrent and a serial call"


# -------------------------------------------------------------------------------------------------
# Determinism: bitwise the same result for every thread count (README, "Determinism")
# -------------------------------------------------------------------------------------------------

SHAPES = [(32, 24, 16, 16), (4096, 40), (3, 5, 70000), (2, 3, 7, 9), (256, 64, 4, 4)]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES, ids=["nchw", "nc", "long-rows", "small", "short-runs"])
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
def test_bitwise_independent_of_thread_count(op, shape, lay):
    if lay == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last needs a 4-d input")
    x = _x(shape, channels_last=lay == "channels_last")
    results = at_thread_counts(lambda: _fwd_bwd(op, x, 7), (1, 2, 3, 4))
    for n, r in zip((2, 3, 4), results[1:]):
        assert _equal(results[0], r), f"{op}: results with {n} threads differ from 1 thread"


def test_bitwise_run_to_run_half_and_double():
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        x = _x((16, 8, 9, 9), dtype=dtype)
        for op in OPS:
            assert _equal(_fwd_bwd(op, x, 3), _fwd_bwd(op, x, 3)), f"{op} {dtype}"


# -------------------------------------------------------------------------------------------------
# Regression tests (each names the failure it pins down)
# -------------------------------------------------------------------------------------------------

def test_regression_raw_batch_norm_backward_validates_mean_var_weight_bias():
    """Found by test_bad_input.py: the CPU batch_norm_backward read mean/var/weight/bias of the wrong
    length out of bounds (garbage gradients or a crash) instead of raising."""
    x, g = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    w, b, m, v = torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3)
    for args, name in (((w, b, torch.zeros(1), v), "mean"), ((w, b, m, torch.ones(1)), "var"),
                       ((torch.ones(1), b, m, v), "weight"), ((w, torch.zeros(1), m, v), "bias")):
        with pytest.raises((ValueError, RuntimeError), match=rf"\b{name}\b"):
            ops.batch_norm_backward(g, x, *args, True, 1e-5, True)
        with pytest.raises((ValueError, RuntimeError), match=rf"\b{name}\b"):
            ops.noisy_batch_norm_backward(g, x, *args, 1e-5, torch.tensor(1), [0.5, 1.25, 0.1, 0.1], 3)


def test_regression_raw_lp_norm_backward_validates_argmax_positions():
    """Found by test_bad_input.py: an arg-max position outside [0, N*S) made the CPU p = inf backward
    write outside grad_input."""
    x, g = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    w, b, m, n = torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3)
    for bad in (16, 1 << 40, -2):
        with pytest.raises((ValueError, RuntimeError), match=r"\bargmax\b"):
            ops.lp_norm_backward(g, x, math.inf, w, b, m, n, torch.full((3,), bad, dtype=torch.long), True, 1e-5)
    with pytest.raises((ValueError, RuntimeError), match=r"\bnorm\b"):
        ops.lp_norm_backward(g, x, 2.0, w, b, m, torch.ones(1), torch.full((3,), -1, dtype=torch.long), True, 1e-5)
    # The valid extremes give the right gradients: N*S - 1 (the last position, here the true arg-max
    # of every channel) and -1 (no arg-max: the norm passes no gradient, dx = (g - mean g) w / (N + eps)),
    # against the float64 definition (tests/test_lp_norm.py's oracle) on the forward's own statistics.
    x = x.double()
    x[3, :, 1, 1] = torch.tensor([9.0, -9.0, 9.0], dtype=torch.float64)  # position 3 * 4 + 3 = 15
    w, b, g = torch.tensor([1.5, 0.5, -1.0], dtype=torch.float64), torch.randn(3, dtype=torch.float64), g.double()
    _, mean, norm, argmax = ops.lp_norm_forward(x, math.inf, w, b, None, None, True, 1e-5)
    assert argmax.tolist() == [15, 15, 15]
    for ok in (-1, 15):
        dx, sum_dy, sum_dy_xhat = ops.lp_norm_backward(g, x, math.inf, w, b, mean, norm,
                                                       torch.full((3,), ok, dtype=torch.long), True, 1e-5)
        got = (dx, sum_dy_xhat, sum_dy)  # the input, weight and bias gradients
        xd, wd, bd = (t.clone().requires_grad_() for t in (x, w, b))
        if ok == 15:
            y = lp_norm_oracle(xd, math.inf, wd, bd, argmax=torch.full((3,), 15))
        else:
            n_const = xd.detach().abs().amax((0, 2, 3)).view(1, 3, 1, 1)
            y = (xd - xd.mean((0, 2, 3), keepdim=True)) / (n_const + 1e-5) * wd.view(1, 3, 1, 1) + bd.view(1, 3, 1, 1)
        want = torch.autograd.grad(y, (xd, wd, bd), g)
        for name, a, r in zip(("input", "weight", "bias"), got, want):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12, msg=lambda m: f"argmax {ok}, grad {name}: {m}")


def test_regression_raw_ops_validate_eps():
    """Found by test_bad_input.py: the raw ops accepted a negative or NaN eps (NaN outputs)."""
    x = torch.randn(4, 3)
    for eps in (-1.0, math.nan, math.inf):
        with pytest.raises((ValueError, RuntimeError), match=r"\beps\b"):
            ops.batch_norm_forward(x, None, None, None, None, True, eps, False)
        with pytest.raises((ValueError, RuntimeError), match=r"\beps\b"):
            ops.lp_norm_forward(x, 2.0, None, None, None, None, True, eps)


def test_regression_fused_relu_propagates_nan_like_torch():
    """Found by test_numerics.py: the fused ReLU mapped NaN to 0 (forward: !(y > 0) -> 0) and blocked
    the gradient at NaN outputs, where torch.relu keeps NaN and threshold_backward passes dy."""
    x = torch.tensor([[1.0, 2.0], [math.nan, -1.0], [0.5, 3.0]]).requires_grad_()
    rm, rv = torch.zeros(2), torch.ones(2)
    y = bnext.batch_norm(x, rm, rv, training=False, eps=0.0, activation="relu")
    assert torch.isnan(y[1, 0]) and y[1, 1] == 0 and torch.equal(y[0], x[0].detach())
    (dx,) = torch.autograd.grad(y, x, torch.full_like(x, 2.0))
    assert torch.equal(dx, torch.tensor([[2.0, 2.0], [2.0, 0.0], [2.0, 2.0]]))  # dy passes at the NaN


@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
def test_regression_lp_inf_norm_of_a_channel_with_nan_is_nan(lay):
    """Found by test_numerics.py: max |x| skipped NaN (a > max is false), so N_inf and running_norm
    stayed finite, unlike torch.amax; an all-NaN channel even got N_inf = -1."""
    x = torch.randn(4, 3, 5, 5)
    x[1, 0, 2, 2] = math.nan
    x[:, 2] = math.nan
    if lay == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    _, mean, norm, argmax = ops.lp_norm_forward(x, math.inf, None, None, None, None, True, 1e-5)
    assert torch.isnan(norm[0]) and torch.isfinite(norm[1]) and torch.isnan(norm[2])
    assert argmax[0] == 1 * 25 + 2 * 5 + 2 and argmax[2] == 0  # the first NaN, as torch.argmax
    rm, rn = torch.zeros(3), torch.ones(3)
    bnext.lp_norm(x, math.inf, rm, rn, training=True)
    assert torch.equal(torch.isnan(rn), torch.tensor([True, False, True]))


def test_regression_lp_stats_channels_last_large_mean_fp32():
    """Found by test_numerics.py: the channels-last l_p statistics summed up to 2048 rows in fp32
    before merging in fp64, losing ~3e-3 std of the mean at |mean| = 1e4 std (planar: exact)."""
    x = (torch.randn(16, 3, 32, 32, dtype=torch.float64) + 1e4).float().contiguous(memory_format=torch.channels_last)
    for p in (1.0, 2.0):
        _, mean, norm, _ = ops.lp_norm_forward(x, p, None, None, None, None, True, 1e-5)
        torch.testing.assert_close(mean.double(), x.double().mean([0, 2, 3]), rtol=0, atol=1e-3)


def test_regression_line_probe_rejects_bad_etas_by_name():
    """Found by test_bad_input.py: line_probe(etas=None / ["a"]) raised float()'s message without the
    argument's name, and NaN step sizes were accepted."""
    model = torch.nn.Linear(2, 1)
    loss = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    for etas in (None, ["a"], [0.1, math.nan]):
        with pytest.raises((TypeError, ValueError), match=r"\betas\b"):
            bnext.landscape.line_probe(model, loss, torch.randn(4, 2), etas)
