"""bnext.noisy_batch_norm and bnext.nn.NoisyBatchNorm*: the noise (a pure-Python Philox reference,
reproducibility, layouts, distribution; the CPU generator's vector lanes against its scalar definition
and every instruction set against the baseline), exact gradients at a fixed seed, torch.library
integration."""
import copy
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnext
from bnext import nn as bnn
from bnext.ops import draw_seed, noisy_batch_norm_noise
from helpers import assert_fwd_bwd_thread_independent
from tolerances import assert_rounding_close

ops = torch.ops.bnext
PAPER = [0.5, 1.25, 0.1, 0.1]
ROOT = Path(__file__).resolve().parent.parent


def philox4x32_10(ctr, key):
    """Random123's philox4x32_10 on numpy uint64 arrays (each word < 2^32)."""
    M0, M1, W0, W1, mask = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF
    c0, c1, c2, c3 = [np.asarray(c, dtype=np.uint64) for c in ctr]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0, p1 = np.uint64(M0) * c0, np.uint64(M1) * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & np.uint64(mask),
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & np.uint64(mask))
        k0, k1 = (k0 + np.uint64(W0)) & np.uint64(mask), (k1 + np.uint64(W1)) & np.uint64(mask)
    return c0, c1, c2, c3


def test_python_philox_matches_random123_known_answers():
    # Known-answer vectors of Random123 (kat_vectors, philox4x32_10).
    out = philox4x32_10([0, 0, 0, 0], [0, 0])
    assert [int(v) for v in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    out = philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0])
    assert [int(v) for v in out] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def reference_noise(seed, shape, noise=PAPER):
    """The documented noise (csrc/common/noise.h) in float64 from the Python Philox."""
    N, C, S = shape[0], shape[1], int(np.prod(shape[2:])) if len(shape) > 2 else 1
    key = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    u = lambda r: (r >> np.uint64(8)).astype(np.float64) * 2.0 ** -24
    c = np.arange(C, dtype=np.uint64)
    r = philox4x32_10([c, np.zeros_like(c), np.ones_like(c), np.zeros_like(c)], key)
    mu = noise[0] * (2 * u(r[0]) - 1)
    sigma = 1 + (noise[1] - 1) * u(r[1])
    # One Philox call per pair of elements (2k, 2k + 1): Box-Muller's cos half for the even element,
    # its sin half for the odd one; words 2 and 3 give their offsets.
    i = np.arange(N * C * S, dtype=np.uint64)
    k = i >> np.uint64(1)
    odd = (i & np.uint64(1)).astype(bool)
    z0 = np.zeros_like(k)
    r = philox4x32_10([k, z0, z0, z0], key)
    u1 = ((r[0] >> np.uint64(8)) + np.uint64(1)).astype(np.float64) * 2.0 ** -24
    angle = 2 * np.pi * u(r[1])
    z = np.sqrt(-2 * np.log(u1)) * np.where(odd, np.sin(angle), np.cos(angle))
    ch = (np.arange(N * C * S) // S) % C
    s = sigma[ch] + noise[3] * z
    m = mu[ch] + noise[2] * (2 * u(np.where(odd, r[3], r[2])) - 1)
    return torch.from_numpy(s.reshape(shape)), torch.from_numpy(m.reshape(shape))


# (40, 5, 4, 6) channels-last: 960 rows in tiles of 2048 // 5 = 409 rows, so a tile starts at an odd
# spatial position (a row drawn alone before the row pairs); S odd: no row pairs at all, and planar
# runs that start at odd indices. (3, 7, 17, 1) and (2, 15, 9, 3) channels-last: fewer than 16 channels
# with S >= 16, drawn per (sample, channel) along s and scattered into rows (NoiseDraw::channel_runs).
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (40, 5, 4, 6), (3, 4, 3, 5), (2, 3, 1, 1), (3, 7, 17, 1), (2, 15, 9, 3)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_kernel_noise_matches_the_documented_formula(layout, shape):
    seed = torch.tensor(0x1234_5678_9ABC_DEF1 & (2 ** 63 - 1))
    # The kernel's own noise in this layout: on a zero input with weight 0 the output is s * bias + m.
    zero = torch.zeros(shape, dtype=torch.float64)
    if layout == "channels_last":
        zero = zero.to(memory_format=torch.channels_last)
    C, w0 = shape[1], torch.zeros(shape[1], dtype=torch.float64)
    m = ops.noisy_batch_norm_forward(zero, w0, w0, 1.0, seed, PAPER, C)[0]
    s = ops.noisy_batch_norm_forward(zero, w0, w0 + 1, 1.0, seed, PAPER, C)[0] - m
    assert m.is_contiguous(memory_format=zero_format(layout))
    s_ref, m_ref = reference_noise(int(seed), shape)
    torch.testing.assert_close(m, m_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=2e-6)


def zero_format(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def test_output_is_bn_times_s_plus_m():
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    y = bnext.noisy_batch_norm(x, None, None, w, b, training=True, generator=gen)
    seed = draw_seed(torch.Generator().manual_seed(7))
    s, m = noisy_batch_norm_noise(x, seed, PAPER)
    a = F.batch_norm(x, None, None, w, b, True)
    torch.testing.assert_close(y, s * a + m, rtol=1e-12, atol=1e-12)


def test_reproducible_new_each_call_and_layout_independent():
    x = torch.randn(6, 4, 5, 5)
    torch.manual_seed(3)
    y1, y2 = bnext.noisy_batch_norm(x, None, None, training=True), bnext.noisy_batch_norm(x, None, None, training=True)
    torch.manual_seed(3)
    y1b = bnext.noisy_batch_norm(x, None, None, training=True)
    y2b = bnext.noisy_batch_norm(x.to(memory_format=torch.channels_last), None, None, training=True)
    assert torch.equal(y1, y1b)
    assert not torch.allclose(y1, y2)
    torch.testing.assert_close(y2, y2b, rtol=1e-6, atol=1e-6)
    # eval: plain BatchNorm, no noise
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    torch.testing.assert_close(bnext.noisy_batch_norm(x, rm, rv, training=False), F.batch_norm(x, rm, rv))


def test_distribution_matches_the_specification():
    """Over many channels and values: channel means/scales uniform on the right intervals, per-element
    spreads with the right widths. Tolerances are a few standard errors; a wrong constant (e.g. a
    variance used as a standard deviation, or a half-width used as a width) fails."""
    N, C, S = 64, 2048, 16
    x = torch.zeros(N, C, S, dtype=torch.float64)
    s, m = noisy_batch_norm_noise(x, torch.tensor(12345), PAPER)
    mu_c, sigma_c = m.mean((0, 2)), s.mean((0, 2))
    # mu_c ~ U(-0.5, 0.5): mean 0, var 1/12, support inside [-0.5, 0.5]
    assert abs(mu_c.mean()) < 4 * math.sqrt(1 / 12 / C) + 0.01
    assert abs(mu_c.var() - 1 / 12) < 0.01
    assert mu_c.min() > -0.5 - 0.01 and mu_c.max() < 0.5 + 0.01 and mu_c.min() < -0.45 and mu_c.max() > 0.45
    # sigma_c ~ U(1, 1.25): mean 1.125, var 0.25^2 / 12
    assert abs(sigma_c.mean() - 1.125) < 0.005
    assert abs(sigma_c.var() / (0.25 ** 2 / 12) - 1) < 0.1
    # within a channel: m - mu_c ~ U(-0.1, 0.1) (var 0.04/12, |.| <= 0.1); s - sigma_c ~ N(0, 0.1^2)
    dm = m - m.mean((0, 2), keepdim=True)
    ds = s - s.mean((0, 2), keepdim=True)
    assert abs(dm.var() / (0.2 ** 2 / 12) - 1) < 0.02
    assert dm.abs().max() < 0.1 + 0.01
    assert abs(ds.std() / 0.1 - 1) < 0.01
    kurt = (ds ** 4).mean() / ds.var() ** 2
    assert abs(kurt - 3) < 0.05  # Gaussian, not uniform (1.8)
    # Neighbours share one Philox call (the cos and sin halves of one Box-Muller transform, words 2
    # and 3 for the offsets): they must still be uncorrelated, also in their magnitudes (a shared
    # radius with the same angle would correlate them; s.e. of a correlation here ~ 1 / sqrt(1e6)).
    for d in (ds, dm):
        even, odd = d.flatten()[0::2], d.flatten()[1::2]
        for a, b in ((even, odd), (even.abs(), odd.abs()), (even ** 2, odd ** 2)):
            assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.005
    # non-default constants are honoured
    s2, m2 = noisy_batch_norm_noise(x[:8], torch.tensor(5), [2.0, 3.0, 0.5, 0.3])
    assert abs(m2.mean((0, 2)).var() / (4.0 ** 2 / 12) - 1) < 0.1
    assert abs(s2.mean((0, 2)).mean() - 2.0) < 0.05
    assert abs((s2 - s2.mean((0, 2), keepdim=True)).std() / 0.3 - 1) < 0.02


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (6, 3), (5, 2, 4)])
def test_gradcheck_at_fixed_seed(shape):
    C = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=torch.float64).requires_grad_()
    seed = torch.tensor(99)
    fn = lambda x, w, b: ops.noisy_batch_norm_forward(x, w, b, 1e-5, seed, PAPER, C)[0]
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    # and through the public API with a generator reset to the same state each call
    g = torch.Generator()
    api = lambda x, w, b: bnext.noisy_batch_norm(x, None, None, w, b, True, generator=g.manual_seed(1))
    assert torch.autograd.gradcheck(api, (x, w, b))


def bn_grads_from_stored_g(xd, wd, bd, s, g, dtype):
    """float64 gradients (input, weight, bias) of s * BN(x) + m for the upstream gradient g, from the
    rounded values the kernel works from: its backward leaves g * s in dx's memory, in the input's
    dtype, and both the sums and dx read it back (csrc/cpu/noisy_batch_norm.cpp). For fp16/bf16 that
    rounding is a step of its own: it bounds the fp32 weight and bias gradients to the half
    dtype's precision (plain BatchNorm's are fp32-accurate)."""
    a = F.batch_norm(xd, None, None, wd, bd, True, 0.1, 1e-5)
    return torch.autograd.grad(a, (xd, wd, bd), (g.double() * s).to(dtype).double())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice"])
def test_gradients_match_composite_all_dtypes(dtype, layout):
    shape = (4, 3, 6, 5)
    base = torch.randn(shape[0], shape[1], shape[2], shape[3] * 2, dtype=torch.float64) * 2 + 1
    x = base[..., ::2] if layout == "slice" else base[..., :shape[3]].contiguous()
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x = x.to(dtype).requires_grad_()
    pdtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    w = (torch.rand(3, dtype=pdtype) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=pdtype).requires_grad_()
    rm, rv = torch.zeros(3, dtype=pdtype), torch.ones(3, dtype=pdtype)
    gen = torch.Generator().manual_seed(11)
    y = bnext.noisy_batch_norm(x, rm, rv, w, b, True, 0.1, generator=gen)
    # s and m: the noise of this seed, fp32 values in every dtype, as the kernel draws them (checked
    # against the Python Philox by test_kernel_noise_matches_the_documented_formula), so that rounding
    # is the only difference left and the bound of tests/tolerances.py applies.
    s, m = noisy_batch_norm_noise(x.detach().double(), draw_seed(torch.Generator().manual_seed(11)), PAPER)
    xd, wd, bd = [t.detach().double().requires_grad_() for t in (x, w, b)]
    rmd, rvd = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    yr = s * F.batch_norm(xd, rmd, rvd, wd, bd, True, 0.1) + m
    n = shape[0] * shape[2] * shape[3]
    assert_rounding_close(y, yr, n=n, what="output")
    torch.testing.assert_close(rm.double(), rmd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv.double(), rvd, rtol=1e-5, atol=1e-6)
    g = torch.randn(shape, dtype=torch.float64).to(dtype)  # the reference sees the rounded values
    for name, a, r in zip(("input", "weight", "bias"), torch.autograd.grad(y, (x, w, b), g),
                          bn_grads_from_stored_g(xd, wd, bd, s, g, dtype)):
        assert_rounding_close(a, r, input_dtype=dtype, n=n, what=f"grad {name}")


def test_nothing_input_sized_is_saved_for_backward():
    x = torch.randn(16, 8, 32, 32, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = bnext.noisy_batch_norm(x, None, None, training=True)
    big = [t for t in saved if t.numel() >= x.numel() and t.data_ptr() != x.data_ptr()]
    assert big == [], "the noise must be regenerated in backward, not stored"
    y.sum().backward()


def noisy_at_seed_0(x):
    return bnext.noisy_batch_norm(x, None, None, training=True, generator=torch.Generator().manual_seed(0))


def test_results_do_not_depend_on_thread_count():
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(32, 16, 9, 9).contiguous(memory_format=layout).requires_grad_()
        assert_fwd_bwd_thread_independent(noisy_at_seed_0, x)


@pytest.mark.parametrize("shape,layout", [((4, 3, 5, 5), "contiguous"), ((4, 3, 5, 5), "channels_last"),
                                          ((6, 4), "contiguous")])
def test_opcheck(shape, layout):
    C = shape[1]
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b = torch.rand(C).add_(0.5).requires_grad_(), torch.randn(C).requires_grad_()
    seed = torch.tensor(5)
    torch.library.opcheck(ops.noisy_batch_norm_forward, (x, w, b, 1e-5, seed, PAPER, C))
    _, mean, var = ops.noisy_batch_norm_forward(x, w, b, 1e-5, seed, PAPER, C)
    torch.library.opcheck(ops.noisy_batch_norm_backward, (torch.randn_like(x), x.detach(), w.detach(), b.detach(),
                                                          mean, var, 1e-5, seed, PAPER, C))


def test_torch_compile_fullgraph_equals_eager_for_the_same_seed():
    """torch.compile(fullgraph=True) of conv -> NoisyBatchNorm2d -> ReLU in training. The compiled graph
    draws the noise seed with inductor's own generator by default (draw_seed's docstring); with
    torch._inductor.config.fallback_random it draws it as eager does, so the compiled training output
    must equal eager's for the same torch.manual_seed, and its gradients must equal those of the
    float64 formula s * BN(conv(x)) + m with the noise of that seed from the Python Philox."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), bnn.NoisyBatchNorm2d(8), torch.nn.ReLU())
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    eager = copy.deepcopy(model)
    params = {k: v.detach().double().requires_grad_() for k, v in model.named_parameters()}
    x, g = torch.randn(4, 3, 8, 8), torch.randn(4, 8, 8, 8)
    compiled = torch.compile(model, fullgraph=True)
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(5)
        y = compiled(x)
    torch.manual_seed(5)
    y_eager = eager(x)
    torch.manual_seed(5)
    seed = int(draw_seed())
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    h = F.conv2d(x.double(), params["0.weight"], params["0.bias"], padding=1)
    s, m = reference_noise(seed, tuple(h.shape))
    y_ref = (s * F.batch_norm(h, None, None, params["1.weight"], params["1.bias"], True) + m).relu()
    # fp32 model against float64 with the Python Philox's noise (within 2e-6 of the kernel's)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    (y * g).sum().backward()
    want = torch.autograd.grad(y_ref, list(params.values()), g.double())
    for (name, p), r in zip(model.named_parameters(), want):
        torch.testing.assert_close(p.grad.double(), r, rtol=1e-4, atol=1e-4 * max(1.0, r.abs().max().item()),
                                   msg=lambda msg: f"grad {name}: {msg}")
    torch.testing.assert_close(model[1].running_mean, eager[1].running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, eager[1].running_var, rtol=1e-5, atol=1e-6)
    model.eval(), eager.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


def test_torch_compile_default_generator_draws_the_documented_noise():
    """With inductor's own generator (the default) the compiled noise differs from eager's but must
    have the documented distribution. Weight 0: the output is the noise, y = s * bias + m; bias 0 on
    half the channels shows m, bias 1 on the other half s + m. Tolerances are several standard errors
    (256 channels of 512 values each); plain BatchNorm (y = bias) or a wrong constant fails."""
    torch._dynamo.reset()
    N, C, S = 32, 512, 16
    w = torch.zeros(C)
    b = (torch.arange(C) % 2).float()
    f = torch.compile(lambda x, w, b: bnext.noisy_batch_norm(x, None, None, w, b, True), fullgraph=True)
    torch.manual_seed(0)
    x = torch.randn(N, C, S)
    y = f(x, w, b).double()
    m, sm = y[:, 0::2], y[:, 1::2]  # m; s + m
    mu_c, dev = m.mean((0, 2)), m - m.mean((0, 2), keepdim=True)
    assert mu_c.abs().max() < 0.5 + 0.01 and abs(mu_c.var() / (1 / 12) - 1) < 0.25  # mu_c ~ U(-0.5, 0.5)
    assert dev.abs().max() < 0.1 + 0.01 and abs(dev.std() / (0.2 / math.sqrt(12)) - 1) < 0.05  # U(-0.1, 0.1)
    # s + m: channel means sigma_c + mu_c (mean 1.125), within a channel N(0, 0.1^2) + U(-0.1, 0.1)
    assert abs(sm.mean() - 1.125) < 0.08
    assert abs((sm - sm.mean((0, 2), keepdim=True)).std() / math.sqrt(0.1 ** 2 + 0.2 ** 2 / 12) - 1) < 0.05
    assert not torch.equal(f(x, w, b).double(), y)  # new noise at every call


def test_vmap_same_randomness_gives_each_problem_its_own_noise():
    B, N, C = 3, 4, 5
    xs = torch.randn(B, N, C, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(C, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(21)
    f = lambda x: ops.noisy_batch_norm_forward(x, w, None, 1e-5, seed, PAPER, C)[0]
    out = torch.func.vmap(f)(xs)
    ref = torch.stack([f(x) for x in xs])
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (xs, w), g), torch.autograd.grad(ref, (xs, w), g)):
        torch.testing.assert_close(a, r)
    # through the public API (the seed is drawn inside vmap: randomness="same")
    torch.manual_seed(0)
    out = torch.func.vmap(lambda x: bnext.noisy_batch_norm(x, None, None, w, None, True), randomness="same")(xs)
    torch.manual_seed(0)
    ref0 = bnext.noisy_batch_norm(xs[0], None, None, w, None, True)
    torch.testing.assert_close(out[0], ref0)


def test_module():
    m = bnn.NoisyBatchNorm2d(4, noise_std_spread=0.2)
    assert isinstance(m, torch.nn.BatchNorm2d)
    assert set(m.state_dict()) == set(torch.nn.BatchNorm2d(4).state_dict())
    x = torch.randn(8, 4, 5, 5)
    torch.manual_seed(0)
    y = m(x)
    torch.manual_seed(0)
    y2 = bnext.noisy_batch_norm(x, torch.zeros(4), torch.ones(4), m.weight, m.bias, True, noise_std_spread=0.2)
    torch.testing.assert_close(y, y2)
    m.eval()
    torch.testing.assert_close(m(x), F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias))
    with pytest.raises(ValueError, match="noise_std must be >= 1"):
        bnn.NoisyBatchNorm1d(3, noise_std=0.5)


BAD = [
    ("input", dict(input=torch.randn(5)), ValueError, "input must have shape"),
    ("input", dict(input=torch.ones(4, 3, dtype=torch.int64)), TypeError, "input must be float"),
    ("running_var", dict(running_var=torch.ones(4)), ValueError, "running_var must have shape"),
    ("weight", dict(weight=torch.ones(2)), ValueError, "weight must have shape"),
    ("noise_mean", dict(noise_mean=-1.0), ValueError, "noise_mean must be"),
    ("noise_std", dict(noise_std=0.9), ValueError, "noise_std must be >= 1"),
    ("noise_mean_spread", dict(noise_mean_spread=float("nan")), ValueError, "noise_mean_spread must be"),
    ("noise_std_spread", dict(noise_std_spread="x"), ValueError, "noise_std_spread must be"),
    ("generator", dict(generator=3), TypeError, "generator must be"),
    ("one value", dict(input=torch.randn(1, 3)), ValueError, "more than 1 value per channel"),
    ("eval", dict(training=False, running_mean=None, running_var=None), ValueError, "required when training=False"),
    ("eps", dict(eps=-1.0), ValueError, "eps must be"),
]


@pytest.mark.parametrize("what,override,exc,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(what, override, exc, match):
    args = dict(input=torch.randn(4, 3, 5), running_mean=torch.zeros(3), running_var=torch.ones(3),
                weight=torch.ones(3), bias=torch.zeros(3), training=True, momentum=0.1, eps=1e-5)
    args.update(override)
    with pytest.raises(exc, match=match):
        bnext.noisy_batch_norm(**args)


def test_direct_op_call_gives_python_error_not_crash():
    with pytest.raises(RuntimeError, match="seed must be"):
        ops.noisy_batch_norm_forward(torch.randn(4, 3), None, None, 1e-5, torch.tensor(1.0), PAPER, 3)
    with pytest.raises(RuntimeError, match="noise must be"):
        ops.noisy_batch_norm_forward(torch.randn(4, 3), None, None, 1e-5, torch.tensor(1), [0.5], 3)
    with pytest.raises(RuntimeError, match="noise_channels must divide"):
        ops.noisy_batch_norm_forward(torch.randn(4, 3), None, None, 1e-5, torch.tensor(1), PAPER, 2)


# Short planar runs (S <= 32) run as rows of C * S columns (csrc/cpu/reduce.h, short_runs):
# a row's noise comes in blocks of P * S consecutive indices (P = noise_channels). Cases: several
# row chunks, an uneven last one, rows wider than one 2048-value tile (drawn in pieces), a period
# shorter than C (the vmap fold), S = 1, odd S, 3-d.
SHORT_RUNS = [((300, 9, 4, 4), 9), ((70, 200, 4, 4), 200), ((33, 6, 3, 3), 3), ((65, 12, 1, 1), 4),
              ((20, 7, 5), 7), ((9, 4, 2, 3, 5), 2), ((5, 3, 32), 3)]


@pytest.mark.parametrize("shape,period", SHORT_RUNS, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_kernel_noise_short_runs(shape, period):
    seed = torch.tensor(0x0F1E_2D3C_4B5A_6978)
    zero, C = torch.zeros(shape, dtype=torch.float64), shape[1]
    w0 = torch.zeros(C, dtype=torch.float64)
    m = ops.noisy_batch_norm_forward(zero, w0, w0, 1.0, seed, PAPER, period)[0]
    s = ops.noisy_batch_norm_forward(zero, w0, w0 + 1, 1.0, seed, PAPER, period)[0] - m
    # channel c has the noise of channel c % P of an (N, P, *) input
    s_ref, m_ref = reference_noise(int(seed), (shape[0], period, *shape[2:]))
    fold = torch.arange(C) % period
    torch.testing.assert_close(m, m_ref[:, fold], rtol=0, atol=1e-6)
    torch.testing.assert_close(s, s_ref[:, fold], rtol=0, atol=2e-6)


@pytest.mark.parametrize("shape,period", SHORT_RUNS, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_short_runs_match_float64_formula(shape, period, dtype):
    """Forward and gradients on short runs against s * BN(x) + m in float64, within the rounding bound
    of tests/tolerances.py. s and m are the kernel's noise for the seed and period (materialized by
    noisy_batch_norm_noise, fp32 values in every dtype): test_kernel_noise_short_runs checks them
    against the Python Philox on these shapes, here they let rounding be the only difference left."""
    torch.manual_seed(3)
    C = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(dtype).requires_grad_()
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(C, dtype=pdtype) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=pdtype).requires_grad_()
    seed = torch.tensor(0x0123_4567_89AB_CDEF)
    y, mean, var = ops.noisy_batch_norm_forward(x, w, b, 1e-5, seed, PAPER, period)
    s_ref, m_ref = noisy_batch_norm_noise(x.detach().double(), seed, PAPER, period)
    xd, wd, bd = [t.detach().double().requires_grad_() for t in (x, w, b)]
    yr = s_ref * F.batch_norm(xd, None, None, wd, bd, True, 0.1, 1e-5) + m_ref
    n = x.numel() // C
    assert_rounding_close(y, yr, n=n, what="output")
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    dx, _, _ = ops.noisy_batch_norm_backward(g, x.detach(), w.detach(), b.detach(), mean, var, 1e-5, seed,
                                             PAPER, period)
    dxr = bn_grads_from_stored_g(xd, wd, bd, s_ref, g, dtype)[0]
    assert_rounding_close(dx, dxr, n=n, what="grad input")
    gen = torch.Generator().manual_seed(5)
    y2 = bnext.noisy_batch_norm(x, None, None, w, b, True, generator=gen) if period == C else None
    if y2 is not None:  # the public API's weight and bias gradients on the same path
        sd, _ = noisy_batch_norm_noise(x.detach().double(), draw_seed(torch.Generator().manual_seed(5)), PAPER)
        for name, a, r in zip(("weight", "bias"), torch.autograd.grad(y2, (w, b), g),
                              bn_grads_from_stored_g(xd, wd, bd, sd, g, dtype)[1:]):
            assert_rounding_close(a, r, input_dtype=dtype, n=n, what=f"grad {name}")


def test_short_runs_do_not_depend_on_thread_count():
    x = (torch.randn(300, 24, 4, 4) * 3 + 2).requires_grad_()
    assert_fwd_bwd_thread_independent(noisy_at_seed_0, x)


# The CPU noise generator (csrc/cpu/noise_vec.h): its AVX2 / AVX-512 lanes bitwise equal to the scalar
# definition of csrc/common/noise.h, and every instruction set giving bitwise-identical results.

@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on PATH")
def test_vectorized_generator_is_bitwise_equal_to_scalar(tmp_path):
    # Counters the kernels can only reach with > 2^32-element tensors (high word, wrap inside a vector)
    # are covered here by calling the generator directly.
    from torch.utils.cpp_extension import include_paths, library_paths
    exe = tmp_path / "noise_vec_check"
    lib = library_paths()[0]
    cmd = ["c++", "-O2", "-std=c++17", "-ffp-contract=off", "-w", f"-I{ROOT / 'csrc'}",
           *[f"-I{p}" for p in include_paths()], str(ROOT / "tests" / "native" / "noise_vec_check.cpp"),
           f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}", "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "noise_vec: OK" in result.stdout


_ISA_SCRIPT = r"""
import sys, math, torch, bnext
from bnext.ops import noisy_batch_norm_noise
torch.manual_seed(0)
out = {}
shapes = [(4, 6, 33, 17), (3, 5, 7), (64, 19), (2, 3, 9, 5, 4)]
for shape in shapes:
    for layout in ("contiguous", "channels_last"):
        if layout == "channels_last" and len(shape) not in (4, 5):
            continue
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            x = torch.randn(shape, dtype=dtype) * 3 + 1
            dy = torch.randn(shape, dtype=dtype)
            if layout == "channels_last":
                fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
                x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
            C = shape[1]
            w = torch.rand(C, dtype=dtype) + 0.5
            b = torch.randn(C, dtype=dtype)
            key = f"{shape} {layout} {dtype}"
            seed = torch.tensor(0x5EED_1234_ABCD)
            noise = [0.5, 1.25, 0.1, 0.1]
            fwd = torch.ops.bnext.noisy_batch_norm_forward(x, w, b, 1e-5, seed, noise, C)
            bwd = torch.ops.bnext.noisy_batch_norm_backward(dy, x, w, b, fwd[1], fwd[2], 1e-5, seed, noise, C)
            out["noisy " + key] = [t.contiguous() for t in fwd + bwd]
            if C % 2 == 0 or C == 5:  # a period shorter than C (the vmap fold)
                P = 1 if C == 5 else C // 2
                out["noisy period " + key] = [t.contiguous() for t in
                    torch.ops.bnext.noisy_batch_norm_forward(x, w, b, 1e-5, seed, noise, P)]
            for p in (1.0, 2.0, math.inf):
                f = torch.ops.bnext.lp_norm_forward(x, p, w, b, None, None, True, 1e-5)
                g = torch.ops.bnext.lp_norm_backward(dy, x, p, w, b, f[1], f[2], f[3], True, 1e-5)
                out[f"lp{p} " + key] = [t.contiguous() for t in f + g]
big = torch.zeros(3, 8, 129, 257)  # ~800k counters
out["noise"] = list(noisy_batch_norm_noise(big, torch.tensor(987654321), [0.5, 1.25, 0.1, 0.1]))
torch.save(out, sys.argv[1])
"""


def test_results_identical_across_instruction_sets(tmp_path):
    results = {}
    for isa in ("baseline", "avx2", "avx512"):  # each is capped to what the CPU has
        path = tmp_path / f"{isa}.pt"
        env = dict(os.environ, BNEXT_CPU_ISA=isa)
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], check=True, env=env, timeout=600)
        results[isa] = torch.load(path)
    for isa in ("avx2", "avx512"):
        for key, ref in results["baseline"].items():
            got = results[isa][key]
            for i, (a, b) in enumerate(zip(ref, got)):
                assert torch.equal(a, b), f"{isa} differs from baseline: {key}, output {i}"


@pytest.mark.parametrize("shape,channels_last", [((4, 3000), False), ((2, 2500, 2, 3), True), ((3, 5, 4100), False)])
def test_noise_and_gradients_past_one_tile(shape, channels_last):
    # More channels (interleaved) or spatial values (planar) than one kernel tile of 2048 values: the
    # noise is drawn in several pieces per row / run and must still be the documented stream.
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    seed = torch.tensor(77)
    s, m = noisy_batch_norm_noise(x, seed, PAPER)
    s_ref, m_ref = reference_noise(77, shape)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(m, m_ref, rtol=0, atol=1e-6)
    C = shape[1]
    w, b = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)
    y, mean, var = torch.ops.bnext.noisy_batch_norm_forward(x, w, b, 1e-5, seed, list(PAPER), C)
    xr = x.clone().requires_grad_()
    ref = s * F.batch_norm(xr, None, None, w, b, True) + m
    torch.testing.assert_close(y, ref.detach(), rtol=1e-12, atol=1e-12)
    dy = torch.randn(shape, dtype=torch.float64)
    dx = torch.ops.bnext.noisy_batch_norm_backward(dy, x, w, b, mean, var, 1e-5, seed, list(PAPER), C)[0]
    (dx_ref,) = torch.autograd.grad(ref, xr, dy)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-10)
