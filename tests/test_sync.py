"""The synchronized-normalization building blocks on one process (bnext.distributed and the ops it
calls between collectives): the Welford merge, per-process statistics (batch_norm_stats,
lp_norm_stats), the elementwise backward (sync_backward_elementwise) and the noise at a sample offset
(noise_apply), against float64 formulas and opcheck; argument checks of the process_group option.
The runs across 2 and 3 processes are in test_distributed.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import bnext
from bnext import nn as bnn
from bnext.distributed import merge_welford

ops = torch.ops.bnext
PAPER = [0.5, 1.25, 0.1, 0.1]


def test_merge_welford_matches_two_pass_and_skips_empty():
    x = torch.randn(20, 4, dtype=torch.float64) * 3 + 1e6
    parts = [x[:7], x[7:7], x[7:20]]
    counts = [p.shape[0] for p in parts]
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(4, dtype=torch.float64) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(4, dtype=torch.float64)
                       for p in parts])
    n, mean, m2 = merge_welford(counts, means, m2s)
    assert n == 20
    torch.testing.assert_close(mean, x.mean(0), rtol=0, atol=1e-8)
    torch.testing.assert_close(m2 / 19, x.var(0), rtol=1e-9, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_batch_norm_stats(channels_last, dtype):
    x = (torch.randn(6, 5, 4, 3, dtype=torch.float64) * 0.5 + 100).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, m2 = ops.batch_norm_stats(x)
    assert mean.dtype == m2.dtype == torch.float64
    x64 = x.double()
    torch.testing.assert_close(mean, x64.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(m2, ((x64 - x64.mean((0, 2, 3), keepdim=True)) ** 2).sum((0, 2, 3)), rtol=1e-4, atol=0)
    torch.library.opcheck(ops.batch_norm_stats, (x,))
    zeros = ops.batch_norm_stats(x[:0])
    assert zeros[0].abs().sum() == 0 and zeros[1].abs().sum() == 0


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lp_norm_stats(p, channels_last):
    x = torch.randint(-4, 5, (5, 3, 4, 2)).to(torch.float64)  # integers: ties of max |x|
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    s, power, arg = ops.lp_norm_stats(x, p)
    assert s.dtype == power.dtype == torch.float64 and arg.dtype == torch.int64
    torch.testing.assert_close(s, x.sum((0, 2, 3)), rtol=0, atol=1e-12)
    a = x.abs().transpose(0, 1).reshape(3, -1)  # per channel, positions n * S + s in order
    if math.isinf(p):
        torch.testing.assert_close(power, a.amax(1), rtol=0, atol=0)
        first = torch.tensor([int(torch.nonzero(a[c] == a[c].max())[0]) for c in range(3)])
        assert torch.equal(arg, first)
    else:
        torch.testing.assert_close(power, (a ** p).sum(1), rtol=0, atol=1e-12)
        assert torch.equal(arg, torch.full((3,), -1))
    torch.library.opcheck(ops.lp_norm_stats, (x, p))
    empty = ops.lp_norm_stats(x[:0], p)
    assert empty[0].abs().sum() == 0 and empty[1].abs().sum() == 0 and (empty[2] == -1).all()


@pytest.mark.parametrize("sign", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sync_backward_elementwise(sign, channels_last):
    g = torch.Generator().manual_seed(0)
    x, ge = (torch.randn(4, 3, 5, 2, generator=g, dtype=torch.float64) for _ in range(2))
    if channels_last:
        x, ge = x.contiguous(memory_format=torch.channels_last), ge.contiguous(memory_format=torch.channels_last)
    center, a, b = (torch.randn(3, generator=g, dtype=torch.float64) for _ in range(3))
    v = lambda t: t.view(1, 3, 1, 1)  # noqa: E731
    d = x - v(center)
    ref = ge - v(a) - v(b) * (torch.sign(d) if sign else d)
    out = ops.sync_backward_elementwise(ge, x, center, a, b, sign)
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-14)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.library.opcheck(ops.sync_backward_elementwise, (ge, x, center, a, b, sign))
    with pytest.raises(RuntimeError, match="center"):
        ops.sync_backward_elementwise(ge, x, center[:2], a, b, sign)


@pytest.mark.parametrize("channels_last", [False, True])
def test_noise_apply_is_the_noisy_batch_norm_noise_at_a_sample_offset(channels_last):
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    seed = torch.tensor(123456789, dtype=torch.int64)
    # The fused noisy forward on the whole batch = BN (eval with the same statistics) + noise_apply.
    y_noisy, mean, var = ops.noisy_batch_norm_forward(x, None, None, 1e-5, seed, PAPER, 4)
    y_bn = ops.batch_norm_forward(x, None, None, mean, var, False, 1e-5, False)[0]
    torch.testing.assert_close(ops.noise_apply(y_bn, seed, PAPER, 4, 0, True), y_noisy, rtol=1e-6, atol=1e-6)
    # Rows k.. of the batch, drawn at sample offset k, get exactly the noise of those rows.
    full = ops.noise_apply(x, seed, PAPER, 4, 0, True)
    torch.testing.assert_close(ops.noise_apply(x[2:], seed, PAPER, 4, 2, True), full[2:], rtol=0, atol=0)
    # Backward mode is the multiplicative part s alone: fwd(x) - fwd(0) = s * x.
    s_x = ops.noise_apply(x, seed, PAPER, 4, 3, False)
    torch.testing.assert_close(s_x, ops.noise_apply(x, seed, PAPER, 4, 3, True)
                               - ops.noise_apply(torch.zeros_like(x), seed, PAPER, 4, 3, True), rtol=1e-6, atol=1e-6)
    # Different sample offsets give different element noise, the same channel noise on average.
    assert not torch.equal(ops.noise_apply(x, seed, PAPER, 4, 1, True), full)
    torch.library.opcheck(ops.noise_apply, (x, seed, PAPER, 4, 5, True))
    with pytest.raises(RuntimeError, match="sample_offset"):
        ops.noise_apply(x, seed, PAPER, 4, -1, True)


@pytest.mark.parametrize("make", [
    lambda pg: bnn.BatchNorm2d(3, process_group=pg),
    lambda pg: bnn.NoisyBatchNorm1d(3, process_group=pg),
    lambda pg: bnn.LpNorm3d(3, 2, process_group=pg),
    lambda pg: bnn.convert(torch.nn.BatchNorm2d(3), to="bn", process_group=pg),
])
def test_bad_process_group_names_the_argument(make):
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup or None, got str"):
        make("world")


def test_without_a_group_layers_stay_local():
    m = bnn.BatchNorm2d(3, process_group=None)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float32)
    torch.testing.assert_close(m(x), F.batch_norm(x, None, None, training=True))
    assert not bnext.distributed.is_synchronized(None, True)
