"""PyTorch's own module tests for BatchNorm, run against bnext's drop-ins.

The samples are torch's: torch.testing._internal.common_modules.module_db, the ModuleInfos of
nn.BatchNorm1d/2d/3d (constructor arguments and inputs, in each of info.dtypes, training and eval:
88 samples with torch 2.13). For each one, the checks of torch's test/test_modules.py that apply to a
CPU module, with torch's class swapped for bnext's and torch's own module in float64 as the reference
(the checks of construction alone, repr/state_dict and factory keywords, once per distinct constructor
call, resp. per constructor call and dtype: 21 and 42 cases, not 88 repeats):

    test_forward, test_gradients (backward)   output, input/weight/bias gradients, running stats
    test_factory_kwargs                       device=/dtype= reach every parameter and buffer; meta device
    test_repr                                 repr identical to torch's
    state_dict                                same keys, shapes, dtypes; loads strictly both ways
    test_save_load                            torch.save/torch.load round trip gives the same outputs
    test_if_train_and_eval_modules_differ     .train()/.eval() switch between batch and running statistics
    test_non_contiguous_tensors               strided input and grad_output give the contiguous result
    test_memory_format                        channels_last input: same values, same output layout as torch
    gradcheck / gradgradcheck                 float64 samples (double backward serves Hessian products)

Excluded from torch's ModuleInfo test classes, by name:
    test_cpu_gpu_parity, test_multiple_device_transfer, test_to (device moves): need a GPU (tests/test_cuda.py
        covers bnext's CUDA kernels);
    TestEagerFusionModuleInfo.test_aot_autograd_*: torch itself marks BatchNorm in training an expected
        failure there (module_db's decorators); torch.compile of the ops is tests/test_batch_norm.py's.
No sample is excluded from the forward/backward, state_dict, repr, factory and save/load checks. The
zero_batch samples (batch of 0) are left out of three checks where an empty output has nothing to show:
train/eval difference and gradcheck (no entries), channels_last layout (an empty tensor is contiguous in
every memory format).

Noisy BatchNorm and l_p take the same samples where they make sense (bnext/experiments/PROTOCOL.md: both are BatchNorm with
other statistics): construction with torch's arguments, state_dict (torch's keys; l_p has running_norm
in place of running_var), repr, and eval mode against a float64 reference. Their training forward
draws noise / uses other statistics and is tested in their own files."""
import copy
import io
import math

import pytest
import torch
from torch.testing._internal.common_modules import module_db

from bnext import nn as bnn

BN_CLASSES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
INFOS = [info for info in module_db if info.module_cls in BN_CLASSES]
TWIN = dict(zip(BN_CLASSES, (bnn.BatchNorm1d, bnn.BatchNorm2d, bnn.BatchNorm3d)))
NOISY = dict(zip(BN_CLASSES, (bnn.NoisyBatchNorm1d, bnn.NoisyBatchNorm2d, bnn.NoisyBatchNorm3d)))
LP = dict(zip(BN_CLASSES, (bnn.LpNorm1d, bnn.LpNorm2d, bnn.LpNorm3d)))
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def _sample_params():
    """(every sample as a pytest.param, and per param the repr of its constructor arguments)."""
    out, constructors = [], {}
    for info in INFOS:
        for dtype in info.dtypes:
            for training in (True, False):
                samples = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False,
                                                  training=training)
                for i, s in enumerate(samples):
                    mode = "train" if training else "eval"
                    p = pytest.param(info, dtype, training, i,
                                     id=f"{info.name}-{s.desc or 'default'}-{str(dtype)[6:]}-{mode}")
                    out.append(p)
                    constructors[p.id] = repr((s.constructor_input.args, sorted(s.constructor_input.kwargs.items())))
    return out, constructors


SAMPLES, _CONSTRUCTOR = _sample_params()


def _distinct(params, key):
    """The first param of each distinct key(param): for the checks that use only part of a sample
    (its constructor, its dtype), so that no case is run again under a dtype or mode it ignores."""
    seen = {}
    for p in params:
        seen.setdefault(key(p), p)
    return list(seen.values())


# Construction-only checks: the module class and its constructor arguments (the sample's dtype, mode
# and input play no part).
CONSTRUCTIONS = _distinct(SAMPLES, lambda p: (p.values[0].name, _CONSTRUCTOR[p.id]))
# dtype-dependent construction checks (factory keywords): class, constructor arguments and dtype.
CONSTRUCTIONS_BY_DTYPE = _distinct(SAMPLES, lambda p: (p.values[0].name, _CONSTRUCTOR[p.id], p.values[1]))


def _nonempty(params):
    """The samples with a non-empty batch (zero_batch's output is empty: nothing differs, nothing to perturb)."""
    return [p for p in params if "zero_batch" not in p.id]


def test_every_batch_norm_module_info_is_sampled():
    assert {info.module_cls for info in INFOS} == set(BN_CLASSES)
    assert len(SAMPLES) >= 88  # torch 2.13's count; a newer torch may add samples, never fewer


def _sample(info, dtype, training, i):
    torch.manual_seed(1234 + i)
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)[i]


def _randomize(module: torch.nn.Module, seed: int):
    """Non-trivial weight, bias and running statistics, so that every term of the output is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("num_batches_tracked"):
                t.fill_(3)
            elif name.endswith(("running_var", "running_norm", "weight")):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64))


def _pair(info, dtype, training, i):
    """(sample, bnext module, torch module in float64 with the same state), both in the sample's mode."""
    s = _sample(info, dtype, training, i)
    args, kwargs = s.constructor_input.args, s.constructor_input.kwargs
    ours = TWIN[info.module_cls](*args, **kwargs, device="cpu", dtype=dtype)
    _randomize(ours, i)
    ref = info.module_cls(*args, **kwargs, device="cpu", dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    return s, ours.train(training), ref.train(training)


def _forward_backward(module, x, grad_out):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(y, [x] + params, grad_out, allow_unused=True) if y.numel() else \
        [torch.zeros_like(t) for t in [x] + params]
    return y.detach(), grads


@pytest.mark.parametrize("info,dtype,training,i", SAMPLES)
def test_forward_backward_and_running_stats_match_torch(info, dtype, training, i):
    s, ours, ref = _pair(info, dtype, training, i)
    x = s.forward_input.args[0]
    grad_out = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(7))
    y, grads = _forward_backward(ours, x, grad_out)
    y_ref, grads_ref = _forward_backward(ref, x.double(), grad_out.double())
    assert y.dtype == dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    assert len(grads) == len(grads_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, **TOL[dtype])
    state, state_ref = ours.state_dict(), ref.state_dict()
    for key in state_ref:
        torch.testing.assert_close(state[key].double() if state[key].is_floating_point() else state[key],
                                   state_ref[key], **TOL[dtype])


@pytest.mark.parametrize("info,dtype,training,i", CONSTRUCTIONS)
def test_state_dict_parameters_buffers_and_repr_match_torch(info, dtype, training, i):
    s = _sample(info, dtype, training, i)
    args, kwargs = s.constructor_input.args, s.constructor_input.kwargs
    ours = TWIN[info.module_cls](*args, **kwargs)
    ref = info.module_cls(*args, **kwargs)
    assert repr(ours) == repr(ref)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    sd, sd_ref = ours.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_ref)
    assert all(sd[k].shape == sd_ref[k].shape and sd[k].dtype == sd_ref[k].dtype for k in sd)
    assert all(torch.equal(sd[k], sd_ref[k]) for k in sd)  # same initial values (reset_parameters)
    _randomize(ref, i)
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = info.module_cls(*args, **kwargs)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ref.state_dict().values()))


@pytest.mark.parametrize("info,dtype,training,i", CONSTRUCTIONS_BY_DTYPE)
def test_factory_kwargs(info, dtype, training, i):
    s = _sample(info, dtype, training, i)
    args, kwargs = s.constructor_input.args, s.constructor_input.kwargs
    m = TWIN[info.module_cls](*args, **kwargs, device="cpu", dtype=dtype)
    for name, t in list(m.named_parameters()) + list(m.named_buffers()):
        assert t.dtype == (torch.long if name == "num_batches_tracked" else dtype), name
        assert t.device.type == "cpu"
    meta = TWIN[info.module_cls](*args, **kwargs, device="meta", dtype=dtype)
    assert all(t.is_meta for t in list(meta.parameters()) + list(meta.buffers()))
    assert [n for n, _ in meta.named_parameters()] == [n for n, _ in m.named_parameters()]


@pytest.mark.parametrize("info,dtype,training,i", SAMPLES)
def test_save_load_round_trip(info, dtype, training, i):
    s, ours, _ = _pair(info, dtype, training, i)
    x = s.forward_input.args[0].detach()
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is type(ours) and loaded.training == training
    y, y_loaded = ours(x), loaded(x)
    torch.testing.assert_close(y_loaded, y, atol=0, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))


@pytest.mark.parametrize("info,dtype,training,i", _nonempty([p for p in SAMPLES if p.values[2]]))
def test_train_and_eval_differ_as_in_torch(info, dtype, training, i):
    s, ours, ref = _pair(info, dtype, training, i)
    x = s.forward_input.args[0].detach()
    assert info.train_and_eval_differ
    for mode in (False, True, False):
        ours.train(mode), ref.train(mode)
        torch.testing.assert_close(ours(x).double(), ref(x.double()), **TOL[dtype])
    uses_running = ours.track_running_stats
    differs = not torch.allclose(ours.train()(x), ours.eval()(x))
    assert differs == uses_running


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as t, non-contiguous: every other element of a twice-as-wide buffer."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t.detach()
    return wide[..., ::2]


@pytest.mark.parametrize("info,dtype,training,i", SAMPLES)
def test_non_contiguous_input_and_grad(info, dtype, training, i):
    s, ours, _ = _pair(info, dtype, training, i)
    x = s.forward_input.args[0].detach()
    grad_out = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    twin = copy.deepcopy(ours)
    y, grads = _forward_backward(ours, x, grad_out)
    xs, gs = _strided(x), _strided(grad_out)
    assert x.numel() == 0 or not xs.is_contiguous()
    y_s, grads_s = _forward_backward(twin, xs, gs)
    torch.testing.assert_close(y_s, y, **TOL[dtype])
    for a, b in zip(grads_s, grads):
        torch.testing.assert_close(a, b, **TOL[dtype])


# zero_batch is left out: an empty tensor is contiguous in every memory format, so its output layout
# is a choice without a visible difference (bnext returns NCHW strides, torch keeps the input's).
@pytest.mark.parametrize("info,dtype,training,i", _nonempty([p for p in SAMPLES if p.values[0].module_cls is not
                                                             torch.nn.BatchNorm1d]))
def test_channels_last_input(info, dtype, training, i):
    s, ours, ref = _pair(info, dtype, training, i)
    x = s.forward_input.args[0].detach()
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    twin, ref = copy.deepcopy(ours), ref.to(dtype)
    y = ours(x)
    y_cl, y_ref_cl = twin(x.to(memory_format=fmt)), ref(x.to(memory_format=fmt))
    torch.testing.assert_close(y_cl, y, **TOL[dtype])
    assert y_cl.is_contiguous(memory_format=fmt) == y_ref_cl.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("info,dtype,training,i", _nonempty([p for p in SAMPLES if p.values[1] == torch.float64]))
def test_gradcheck_and_gradgradcheck(info, dtype, training, i):
    s, ours, _ = _pair(info, dtype, training, i)
    x = s.forward_input.args[0].detach().requires_grad_(True)
    names = [n for n, _ in ours.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in ours.parameters()]
    buffers = {n: b for n, b in ours.named_buffers()}

    def f(x, *ps):
        return torch.func.functional_call(ours, ({**dict(zip(names, ps)), **buffers},), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x, *params), fast_mode=True)


# -------------------------------------------------------------------------------------------------
# Noisy BatchNorm and l_p on the same samples: construction, state_dict, repr, eval mode
# -------------------------------------------------------------------------------------------------

def _lp_eval_reference(x, p, m):
    """z = w * (x - mean) / (N_p + eps) + b in float64 (bnext.lp_norm): the running statistics, or without
    them (track_running_stats=False, as torch's BatchNorm) the batch's: mean, and N_1 = mean |x|,
    N_2 = sqrt(mean x^2), N_inf = max |x| of x before centering."""
    view = [1, -1] + [1] * (x.dim() - 2)
    x = x.double()
    if m.running_mean is not None:
        mean, norm = m.running_mean.double(), m.running_norm.double()
    else:
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims)
        norm = {1: x.abs().mean(dims), 2: x.square().mean(dims).sqrt(), math.inf: x.abs().amax(dims)}[p]
    z = (x - mean.view(view)) / (norm.view(view) + m.eps)
    if m.weight is not None:
        z = z * m.weight.double().view(view)
    if m.bias is not None:
        z = z + m.bias.double().view(view)
    return z


@pytest.mark.parametrize("info,dtype,training,i", [p for p in SAMPLES if not p.values[2]])
def test_noisy_batch_norm_takes_torch_samples(info, dtype, training, i):
    s = _sample(info, dtype, training, i)
    args, kwargs = s.constructor_input.args, s.constructor_input.kwargs
    ref = info.module_cls(*args, **kwargs, dtype=torch.float64)
    noisy = NOISY[info.module_cls](*args, **kwargs, dtype=dtype)
    assert repr(noisy).startswith(repr(ref).replace(info.module_cls.__name__, "Noisy" + info.module_cls.__name__)[:-1])
    assert list(noisy.state_dict()) == list(ref.state_dict())
    _randomize(ref, i)
    noisy.load_state_dict(ref.state_dict(), strict=True)
    x = s.forward_input.args[0].detach()
    # Eval mode is plain BatchNorm, no noise (Algorithm 1 injects noise in training only).
    torch.testing.assert_close(noisy.eval()(x).double(), ref.eval()(x.double()), **TOL[dtype])


@pytest.mark.parametrize("p", [1, 2, math.inf])
@pytest.mark.parametrize("info,dtype,training,i", [p for p in SAMPLES if not p.values[2]])
def test_lp_norm_takes_torch_samples(info, dtype, training, i, p):
    s = _sample(info, dtype, training, i)
    args, kwargs = s.constructor_input.args, s.constructor_input.kwargs
    ref = info.module_cls(*args, **kwargs)
    lp = LP[info.module_cls](args[0], p, *args[1:], **kwargs, dtype=dtype)
    assert repr(lp).startswith(f"{type(lp).__name__}({args[0]}, p=")
    assert f"bias={ref.bias is not None}" in repr(lp)
    expected = [k.replace("running_var", "running_norm") for k in ref.state_dict()]
    assert list(lp.state_dict()) == expected
    assert (lp.eps, lp.momentum, lp.affine, lp.track_running_stats) == \
        (ref.eps, ref.momentum, ref.affine, ref.track_running_stats)
    x = s.forward_input.args[0].detach()
    lp.eval()
    _randomize(lp, i)
    torch.testing.assert_close(lp(x).double(), _lp_eval_reference(x, p, lp), **TOL[dtype])
