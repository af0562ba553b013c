"""bnext.nn as a drop-in for torch.nn's normalization API: constructors (bias=, factory keywords),
weight without bias in the functional ops, convert() over every BatchNorm torch has (bias=False,
SyncBatchNorm with its group, lazy layers, affine=False, track_running_stats=False, momentum=None) in
both directions, and the two loss conventions of bnext.landscape. References: torch's modules and
F.batch_norm in float64."""
import copy
import inspect
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import bnext
from bnext import landscape
from bnext import nn as bnn
from bnext.ops import draw_seed, noisy_batch_norm_noise

BN = [(torch.nn.BatchNorm1d, bnn.BatchNorm1d, (6, 4, 5)), (torch.nn.BatchNorm2d, bnn.BatchNorm2d, (4, 4, 3, 3)),
      (torch.nn.BatchNorm3d, bnn.BatchNorm3d, (3, 4, 2, 2, 2))]
ALL_BNEXT = [bnn.BatchNorm1d, bnn.BatchNorm2d, bnn.BatchNorm3d, bnn.SyncBatchNorm, bnn.NoisyBatchNorm1d,
             bnn.NoisyBatchNorm2d, bnn.NoisyBatchNorm3d, bnn.NoisySyncBatchNorm]


def _group():
    """A torch.distributed ProcessGroup object of world size 1, without initializing torch.distributed
    (the group is only held and handed on here, never used for a collective)."""
    return torch._C._distributed_c10d.ProcessGroup(dist.HashStore(), 0, 1)


def _randomized(m, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if name.endswith("num_batches_tracked"):
                t.fill_(5)
            elif name.endswith(("weight", "running_var", "running_norm")):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64))
    return m


# -------------------------------------------------------------------------------------------------
# Constructors
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", ALL_BNEXT, ids=lambda c: c.__name__)
def test_constructor_takes_torchs_arguments(cls):
    """Every parameter of torch's constructor, same name, kind (positional / keyword-only) and default."""
    base = torch.nn.SyncBatchNorm if "Sync" in cls.__name__ else \
        {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[int(cls.__name__[-2])]
    ours = inspect.signature(cls.__init__).parameters
    # NoisySyncBatchNorm shares the noisy classes' constructor: device/dtype where BatchNorm1d/2d/3d
    # have them, process_group a keyword (as in every bnext class); torch's SyncBatchNorm has it 6th.
    loose = ("process_group", "device", "dtype") if cls is bnn.NoisySyncBatchNorm else ()
    for name, p in inspect.signature(base.__init__).parameters.items():
        assert name in ours, name
        assert ours[name].default == p.default, name
        assert name in loose or ours[name].kind == p.kind, name
    if cls is not bnn.NoisySyncBatchNorm:
        positional = [n for n, p in inspect.signature(base.__init__).parameters.items()
                      if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert [n for n, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD][:len(positional)] == positional


@pytest.mark.parametrize("torch_cls,cls,shape", BN, ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("training", [True, False])
def test_bias_false_matches_torch(torch_cls, cls, shape, training):
    ref = _randomized(torch_cls(4, bias=False, dtype=torch.float64))
    ours = cls(4, bias=False, dtype=torch.float32)
    assert ours.bias is None and [n for n, _ in ours.named_parameters()] == ["weight"]
    assert repr(ours) == repr(ref) and "bias=False" in repr(ours)
    ours.load_state_dict(ref.state_dict())
    ref.train(training), ours.train(training)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xr, xo = x.clone().requires_grad_(True), x.float().requires_grad_(True)
    g = torch.randn(shape, dtype=torch.float64)
    y_ref = ref(xr)
    y_ref.backward(g)
    y = ours(xo)
    y.backward(g.float())
    torch.testing.assert_close(y.double(), y_ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(xo.grad.double(), xr.grad, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ours.weight.grad.double(), ref.weight.grad, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ours.running_var.double(), ref.running_var, atol=1e-6, rtol=1e-6)


def _lp_reference(x, p, w, b=None, eps=1e-5):
    """l_p normalization in float64 from its definition (bnext.lp_norm's docstring), batch statistics:
    w * (x - mean) / (N_p + eps) + b per channel over (N, *), N_p of x before centering; N_inf's
    gradient goes to the first arg-max of |x| (ties do not occur in these random inputs)."""
    dims = [0] + list(range(2, x.dim()))
    view = [1, -1] + [1] * (x.dim() - 2)
    norm = {1: lambda: x.abs().mean(dims), 2: lambda: x.square().mean(dims).sqrt(),
            math.inf: lambda: x.abs().amax(dims)}[p]()
    y = (x - x.mean(dims, keepdim=True)) / (norm.view(view) + eps) * w.view(view)
    return y if b is None else y + b.view(view)


def _noise(x, generator_seed):
    """(s, m): the noise a noisy_batch_norm call with torch.Generator().manual_seed(generator_seed)
    applies to x (its seed drawn as bnext.ops.draw_seed draws it; the noise itself is checked against a
    pure-Python Philox in tests/test_noisy_batch_norm.py)."""
    return noisy_batch_norm_noise(x, draw_seed(torch.Generator().manual_seed(generator_seed)), [0.5, 1.25, 0.1, 0.1])


def _assert_grads(y, y_ref, inputs, ref_inputs, g, names):
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    for name, a, r in zip(names, torch.autograd.grad(y, inputs, g), torch.autograd.grad(y_ref, ref_inputs, g)):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10, msg=lambda m: f"grad {name}: {m}")


def test_noisy_and_lp_take_bias_false():
    """bias=False: the state and repr of torch's bias=False layers, and training outputs and gradients
    equal to float64 references with no bias term (torch's BatchNorm2d(bias=False) times the noise;
    the l_p definition)."""
    noisy = bnn.NoisyBatchNorm2d(3, bias=False, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert noisy.bias is None and list(noisy.state_dict()) == list(torch.nn.BatchNorm2d(3, bias=False).state_dict())
    assert "bias=False" in repr(noisy)
    _randomized(noisy)
    ref = torch.nn.BatchNorm2d(3, bias=False, dtype=torch.float64)
    ref.load_state_dict(noisy.state_dict())
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    s, m = _noise(x, 0)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    _assert_grads(noisy(xo), s * ref(xr) + m, [xo, noisy.weight], [xr, ref.weight], torch.randn_like(x),
                  ("input", "weight"))
    torch.testing.assert_close(noisy.running_var, ref.running_var, atol=1e-12, rtol=1e-12)
    lp = bnn.LpNorm2d(3, 2, bias=False, dtype=torch.float64)
    assert lp.bias is None and "bias=False" in repr(lp)
    assert list(lp.state_dict()) == ["weight", "running_mean", "running_norm", "num_batches_tracked"]
    _randomized(lp)
    w = lp.weight.detach().clone().requires_grad_()
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    _assert_grads(lp(xo), _lp_reference(xr, 2, w), [xo, lp.weight], [xr, w], torch.randn_like(x), ("input", "weight"))


@pytest.mark.parametrize("cls", ALL_BNEXT + [bnn.LpNorm2d, bnn.SyncLpNorm], ids=lambda c: c.__name__)
def test_factory_keywords(cls):
    extra = (2,) if issubclass(cls, bnn._LpNorm) else ()
    m = cls(3, *extra, dtype=torch.float64, device="cpu")
    assert m.weight.dtype == torch.float64 and m.running_mean.dtype == torch.float64
    assert m.num_batches_tracked.dtype == torch.long
    meta = cls(3, *extra, device="meta")
    assert all(t.is_meta for t in list(meta.parameters()) + list(meta.buffers()))


# -------------------------------------------------------------------------------------------------
# Functional ops: a weight without a bias (F.batch_norm takes it)
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
def test_functional_batch_norm_weight_without_bias(training):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=gen)
    w = (torch.rand(3, dtype=torch.float64, generator=gen) + 0.5)
    rm, rv = torch.randn(3, dtype=torch.float64, generator=gen), torch.rand(3, dtype=torch.float64, generator=gen) + 0.5
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    xo, wo = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    rm_r, rv_r, rm_o, rv_o = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    ref = F.batch_norm(xr, rm_r, rv_r, wr, None, training, 0.1, 1e-5)
    y = bnext.batch_norm(xo, rm_o, rv_o, wo, None, training=training, momentum=0.1, eps=1e-5)
    g = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    ref.backward(g), y.backward(g)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(xo.grad, xr.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(wo.grad, wr.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(rv_o, rv_r, atol=1e-12, rtol=1e-12)


def test_functional_noisy_and_lp_weight_without_bias():
    """A weight without a bias: outputs and gradients against float64 references with no bias term."""
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    g = torch.randn_like(x)
    xo, wo, xr, wr = (t.clone().requires_grad_() for t in (x, w, x, w))
    s, m = _noise(x, 3)
    y = bnext.noisy_batch_norm(xo, None, None, wo, None, training=True, generator=torch.Generator().manual_seed(3))
    _assert_grads(y, s * F.batch_norm(xr, None, None, wr, None, True) + m, [xo, wo], [xr, wr], g, ("input", "weight"))
    for p in (1, 2, math.inf):
        y = bnext.lp_norm(xo, p, None, None, wo, None, training=True)
        _assert_grads(y, _lp_reference(xr, p, wr), [xo, wo], [xr, wr], g, ("input", "weight"))


# -------------------------------------------------------------------------------------------------
# convert()
# -------------------------------------------------------------------------------------------------

CONFIGS = [dict(), dict(bias=False), dict(affine=False), dict(track_running_stats=False), dict(momentum=None),
           dict(affine=False, track_running_stats=False)]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("torch_cls,cls,shape", BN, ids=["1d", "2d", "3d"])
def test_convert_keeps_configuration_and_state_both_ways(torch_cls, cls, shape, kw):
    ref = _randomized(torch_cls(4, eps=1e-3, dtype=torch.float64, **kw))
    if ref.weight is not None:
        ref.weight.requires_grad_(False)
    model = torch.nn.Sequential(torch.nn.Identity(), copy.deepcopy(ref)).eval()
    ours = bnn.convert(model, to="bn")[1]
    assert type(ours) is cls and not ours.training
    assert repr(ours) == repr(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    assert ours.weight is None or not ours.weight.requires_grad
    assert ours.bias is None or ours.bias.requires_grad
    x = torch.randn(shape, dtype=torch.float64)
    for training in (True, False):
        ref.train(training), ours.train(training)
        torch.testing.assert_close(ours(x), ref(x), atol=1e-10, rtol=1e-10)
    back = bnn.convert(torch.nn.Sequential(ours), to="torch")[0]
    assert type(back) is torch_cls and repr(back) == repr(ref)
    assert list(back.state_dict()) == list(ref.state_dict())
    for a, b in zip(back.state_dict().values(), ref.state_dict().values()):  # both ran a training step
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    for to in ("noisy_bn", "l2"):
        other = bnn.convert(copy.deepcopy(ref), to=to)
        assert (other.bias is None) == (ref.bias is None) and other.affine == ref.affine
        assert (other.momentum, other.eps, other.track_running_stats) == \
            (ref.momentum, ref.eps, ref.track_running_stats)
        again = bnn.convert(other, to="torch")
        assert type(again) is torch_cls and (again.bias is None) == (ref.bias is None)


def test_sync_batch_norm_converts_with_its_group_and_back():
    group = _group()

    def make():  # torch's SyncBatchNorm holds its group itself: a model with one cannot be deep-copied
        sync = _randomized(torch.nn.SyncBatchNorm(4, momentum=None, bias=False, process_group=group,
                                                  dtype=torch.float64))
        return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1).double(), sync)

    model = make()
    sync = model[1]
    state = copy.deepcopy(sync.state_dict())
    ours = bnn.convert(model)[1]
    assert type(ours) is bnn.SyncBatchNorm and isinstance(ours, torch.nn.SyncBatchNorm)
    assert ours.process_group is group and repr(ours) == repr(sync)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), state.values()))
    # Any input rank >= 2, like torch's SyncBatchNorm; local (world size 1) it is plain BatchNorm.
    for shape in [(5, 4), (5, 4, 3), (3, 4, 2, 2), (2, 4, 2, 2, 2)]:
        ref = torch.nn.BatchNorm1d(4, bias=False, dtype=torch.float64)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x.reshape(shape[0], 4, -1)).reshape(shape),
                                   atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2D"):
        ours(torch.randn(4))
    for to, cls in (("noisy_bn", bnn.NoisySyncBatchNorm), ("l1", bnn.SyncLpNorm)):
        other = bnn.convert(make(), to=to)[1]
        assert type(other) is cls and other.process_group is group and other.bias is None
    back = bnn.convert(model, to="torch")[1]
    assert type(back) is torch.nn.SyncBatchNorm and back.process_group is group
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), state.values()))
    # An explicit group replaces the kept one.
    other_group = _group()
    assert bnn.convert(make(), to="bn", process_group=other_group)[1].process_group is other_group


def test_sync_batch_norm_without_group_keeps_torchs_default_rule():
    """torch's SyncBatchNorm with process_group=None synchronizes over the default group; with
    torch.distributed not initialized that is no group (local statistics)."""
    assert not dist.is_initialized()
    ours = bnn.convert(torch.nn.SyncBatchNorm(3))
    assert type(ours) is bnn.SyncBatchNorm and ours.process_group is None
    x = torch.randn(4, 3, 2)
    torch.testing.assert_close(ours(x), torch.nn.BatchNorm1d(3)(x), atol=1e-6, rtol=1e-6)


def test_lazy_batch_norm_converts_once_materialized():
    def make():
        return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.Sequential(torch.nn.LazyBatchNorm2d(bias=False)))

    model = make()
    with pytest.raises(ValueError, match=r"'1\.0' \(LazyBatchNorm2d\).*not materialized.*forward"):
        bnn.convert(model)
    assert type(bnn.convert(make(), to="none")[1][0]) is torch.nn.Identity
    model(torch.randn(4, 2, 3, 3))  # materializes: the layer becomes a torch.nn.BatchNorm2d
    ours = bnn.convert(model)[1][0]
    assert type(ours) is bnn.BatchNorm2d and ours.num_features == 3 and ours.bias is None
    assert ours.num_batches_tracked.item() == 1


def test_convert_names_what_it_cannot_convert():
    class OddNorm(torch.nn.modules.batchnorm._BatchNorm):
        pass

    with pytest.raises(ValueError, match=r"'0' \(OddNorm\).*rank"):
        bnn.convert(torch.nn.Sequential(OddNorm(3)))
    fused = torch.nn.Sequential(torch.nn.Linear(2, 3), bnn.BatchNorm1d(3, activation="relu"))
    for to in ("torch", "noisy_bn", "l2"):
        with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\).*activation='relu'"):
            bnn.convert(copy.deepcopy(fused), to=to)
    assert type(bnn.convert(copy.deepcopy(fused), to="none")[1]) is torch.nn.ReLU
    assert bnn.convert(copy.deepcopy(fused), to="bn")[1].activation == "relu"
    # Normalizations that are not BatchNorm stay as they are.
    other = torch.nn.Sequential(torch.nn.LayerNorm(3), torch.nn.GroupNorm(1, 3), torch.nn.InstanceNorm1d(3))
    assert [type(m) for m in bnn.convert(copy.deepcopy(other))] == [type(m) for m in other]


# -------------------------------------------------------------------------------------------------
# bnext.landscape: loss_fn(model, batch) and criterion(outputs, targets)
# -------------------------------------------------------------------------------------------------

def _task():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), bnn.BatchNorm1d(6), torch.nn.ReLU(),
                                torch.nn.Linear(6, 3)).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    return model, (x, y)


CALLS = {
    "ics": lambda m, b, **kw: [(r.l2, r.cosine) for r in landscape.ics(m, batch=b, lr=0.1, **kw)],
    "line_probe": lambda m, b, **kw: landscape.line_probe(m, batch=b, etas=[0.05, 0.2], **kw).losses,
    "hessian_top_eigenvalue": lambda m, b, **kw: landscape.hessian_top_eigenvalue(m, batch=b, iters=4, **kw),
    "hessian_trace": lambda m, b, **kw: landscape.hessian_trace(m, batch=b, samples=2, **kw),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_landscape_criterion_equals_loss_fn(name):
    model, batch = _task()
    via_loss_fn = CALLS[name](model, batch, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    for criterion in (F.cross_entropy, torch.nn.CrossEntropyLoss()):
        assert CALLS[name](model, batch, criterion=criterion) == via_loss_fn


@pytest.mark.parametrize("name", list(CALLS))
def test_landscape_criterion_as_loss_fn_shows_both_forms(name):
    model, batch = _task()
    short = name
    for crit in (F.cross_entropy, torch.nn.CrossEntropyLoss(), lambda out, t: F.cross_entropy(out, t)):
        with pytest.raises(TypeError) as e:
            CALLS[name](model, batch, loss_fn=crit)
        msg = str(e.value)
        assert f"bnext.landscape.{name}" in msg and "loss_fn(model, batch)" in msg
        assert f"{short}(model, batch=(inputs, targets), criterion=" in msg
        assert f"{short}(model, lambda model, batch: " in msg


def test_landscape_loss_argument_errors():
    model, batch = _task()
    lf = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    with pytest.raises(TypeError, match="not both"):
        landscape.ics(model, lf, batch, lr=0.1, criterion=F.cross_entropy)
    with pytest.raises(TypeError, match="give loss_fn"):
        landscape.ics(model, batch=batch, lr=0.1)
    with pytest.raises(ValueError, match=r"pair \(inputs, targets\)"):
        landscape.ics(model, batch=batch[0], lr=0.1, criterion=F.cross_entropy)
    with pytest.raises(TypeError, match="criterion must be callable"):
        landscape.ics(model, batch=batch, lr=0.1, criterion="cross_entropy")
    with pytest.raises(TypeError, match="etas"):
        landscape.line_probe(model, lf, batch)
    # A loss_fn whose own TypeError has nothing to do with the model is left as it is.
    def broken(m, b):
        raise TypeError("unrelated")
    with pytest.raises(TypeError, match="^unrelated$"):
        landscape.ics(model, broken, batch, lr=0.1)
