"""The CUDA ops in the runtime settings a training job puts them in: double backward, torch.compile
with fullgraph, CUDA-graph capture of forward + backward, streams (a test that fails when an op
launches on the wrong stream), a second device, and bitwise run-to-run determinism of every op.

Skipped without a GPU or without a CUDA build of bnext."""
import math

import pytest
import torch

import bnext

ops = torch.ops.bnext

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and bnext.build_info()["cuda"]),
                                reason="needs a CUDA GPU and a CUDA build of bnext")
PAPER = dict(noise_mean=0.5, noise_std=1.25, noise_mean_spread=0.1, noise_std_spread=0.1)
EPS = 1e-5


def layers(C, seeded=True):
    """name -> f(x, w, b) for every normalization op, training mode; the noisy one, when `seeded`, with
    a fresh generator per call, so that repeated calls draw the same noise (torch.compile cannot trace
    a generator's creation: unseeded there)."""
    gen = (lambda: torch.Generator().manual_seed(3)) if seeded else (lambda: None)
    return {
        "bn": lambda x, w, b: bnext.batch_norm(x, None, None, w, b, training=True),
        "bn_relu": lambda x, w, b: bnext.batch_norm(x, None, None, w, b, training=True, activation="relu"),
        "noisy_bn": lambda x, w, b: bnext.noisy_batch_norm(x, None, None, w, b, training=True, generator=gen(),
                                                           **PAPER),
        "l1": lambda x, w, b: bnext.lp_norm(x, 1, None, None, w, b, training=True),
        "l2": lambda x, w, b: bnext.lp_norm(x, 2, None, None, w, b, training=True),
        "linf": lambda x, w, b: bnext.lp_norm(x, math.inf, None, None, w, b, training=True),
    }


NAMES = list(layers(1))


def inputs(shape, dtype=torch.float32, device="cuda", seed=0, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    C = shape[1]
    pd = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(pd)
    b = torch.randn(C, generator=gen, dtype=torch.float64).to(pd)
    x, dy = x.to(dtype), dy.to(dtype)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    return [t.to(device) for t in (x, dy, w, b)]


def fwd_bwd(f, x, dy, w, b):
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = f(xs, ws, bs)
    return (y.detach(), *torch.autograd.grad(y, (xs, ws, bs), dy))


@pytest.mark.parametrize("name", NAMES)
def test_double_backward(name):
    x, _, w, b = inputs((4, 3, 3, 3), torch.float64)
    f = layers(3)[name]
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradgradcheck(f, leaves, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_fullgraph(name):
    # The forward compiled in one graph (fake kernels), the backward through AOT autograd.
    x, dy, w, b = inputs((8, 5, 6, 6))
    f = layers(5, seeded=False)[name]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = compiled(*leaves)
    got = (y, *torch.autograd.grad(y, leaves, dy))
    if name == "noisy_bn":
        # The compiled graph draws its seed with its own generator: the noise differs from eager. What
        # holds for any noise: BatchNorm's dx sums to zero over each channel, and y is finite.
        assert torch.isfinite(got[0]).all()
        torch.testing.assert_close(got[1].sum((0, 2, 3)), torch.zeros(5, device="cuda"), rtol=0, atol=1e-3)
        return
    want = fwd_bwd(f, x, dy, w, b)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_graph_capture_of_forward_and_backward(name, channels_last):
    x, dy, w, b = inputs((8, 5, 6, 6), channels_last=channels_last)
    f = layers(5)[name]
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (autograd, allocator)
        for _ in range(2):
            torch.autograd.grad(f(xs, ws, bs), (xs, ws, bs), dy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = f(xs, ws, bs)
        grads = torch.autograd.grad(y, (xs, ws, bs), dy)
    x2, dy2, _, _ = inputs((8, 5, 6, 6), seed=1, channels_last=channels_last)
    with torch.no_grad():
        xs.copy_(x2)
        dy.copy_(dy2)
    graph.replay()
    torch.cuda.synchronize()
    want = fwd_bwd(f, x2, dy2, w, b)  # the noisy op replays the noise baked in at capture: the same seed
    for a, r in zip((y, *grads), want):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def _stream_case(name, x, dy, w, b):
    if name == "grad_stats":
        return (ops.grad_stats([x, w], [dy, b]), *ops.multi_axpy([x, w], [dy, b], [0.5]))
    if name == "stats":
        return (*ops.batch_norm_stats(x), *ops.lp_norm_stats(x, math.inf),
                ops.noise_apply(x, torch.tensor(5), [0.5, 1.25, 0.1, 0.1], x.shape[1], 2, True))
    return fwd_bwd(layers(x.shape[1])[name], x, dy, w, b)


@pytest.mark.parametrize("name", NAMES + ["grad_stats", "stats"])
def test_ops_run_on_the_current_stream(name):
    # The default stream is held busy by a spin kernel (about a second) while the op runs on a side
    # stream, and its results are copied to the host from that side stream. Work the op sent to any
    # other stream would not be finished when the side stream is: the copies would not hold the
    # results (compared with a run on the default stream afterwards). The spin must still be running
    # when the side stream is done, else the test proved nothing.
    x, dy, w, b = inputs((16, 8, 16, 16))
    ref = _stream_case(name, x, dy, w, b)  # also loads every kernel before the timed part
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in ref]
    torch.cuda.synchronize()
    default, side = torch.cuda.current_stream(), torch.cuda.Stream()
    done_default, done_side = torch.cuda.Event(), torch.cuda.Event()
    torch.cuda._sleep(int(2e9))  # clock cycles: about 1 s at 2 GHz
    done_default.record(default)
    with torch.cuda.stream(side):
        out = _stream_case(name, x, dy, w, b)
        for h, t in zip(host, out):
            h.copy_(t.contiguous(), non_blocking=True)
        done_side.record(side)
    done_side.synchronize()
    still_busy = not done_default.query()
    torch.cuda.synchronize()
    assert still_busy, "the default stream's spin ended before the side stream's work: the test shows nothing"
    for h, r in zip(host, ref):
        assert torch.equal(h, r.cpu()), "the op's results were not ready when its stream was"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
@pytest.mark.parametrize("name", NAMES)
def test_tensors_on_a_second_device(name):
    x, dy, w, b = inputs((8, 5, 6, 6), device="cpu")
    f = layers(5)[name]
    assert torch.cuda.current_device() == 0
    got = fwd_bwd(f, *(t.to("cuda:1") for t in (x, dy, w, b)))
    assert all(t.device == torch.device("cuda:1") for t in got)
    want = fwd_bwd(f, *(t.to("cuda:0") for t in (x, dy, w, b)))
    for a, r in zip(got, want):
        torch.testing.assert_close(a.cpu(), r.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,channels_last", [((8, 5, 6, 6), False), ((64, 40, 32, 32), False),
                                                 ((64, 40, 32, 32), True), ((300, 24), False)])
def test_every_op_is_bitwise_deterministic(name, dtype, shape, channels_last):
    x, dy, w, b = inputs(shape, dtype, channels_last=channels_last)
    f = layers(shape[1])[name]
    first, second = fwd_bwd(f, x, dy, w, b), fwd_bwd(f, x, dy, w, b)
    for a, r in zip(first, second):
        assert torch.equal(a, r)


def test_distributed_and_multi_tensor_ops_are_bitwise_deterministic():
    x, dy, w, b = inputs((64, 40, 32, 32), channels_last=True)
    seed = torch.tensor(8)
    runs = []
    for _ in range(2):
        runs.append((*ops.batch_norm_stats(x), *ops.lp_norm_stats(x, 2.0), *ops.lp_norm_stats(x, math.inf),
                     ops.sync_backward_elementwise(dy, x, w, w, b, True),
                     ops.noise_apply(x, seed, [0.5, 1.25, 0.1, 0.1], 40, 3, True),
                     ops.grad_stats([x, w], [dy, b]), *ops.multi_axpy([x, w], [dy, b], [0.5, -1.0])))
    for a, r in zip(*runs):
        assert torch.equal(a, r)
