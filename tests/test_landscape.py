"""bnext.landscape against independent naive implementations written here: a per-layer ICS loop
on deep copies, a sequential line-probe loop, closed-form and dense (torch.autograd.functional)
Hessians, and BatchNorm input gradients read with retain_grad."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bnext
from bnext import landscape as L


def xent(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def conv_net(dropout=False, dtype=torch.float64):
    """conv -> bnext BN -> inplace ReLU -> conv -> bnext BN+ReLU -> pool -> conv -> torch BN ->
    ReLU -> linear -> ReLU [-> dropout] -> linear."""
    layers = [nn.Conv2d(3, 4, 3, padding=1), bnext.nn.BatchNorm2d(4), nn.ReLU(inplace=True),
              nn.Conv2d(4, 4, 3, padding=1), bnext.nn.BatchNorm2d(4, activation="relu"), nn.MaxPool2d(2),
              nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
              nn.Linear(6 * 3 * 3, 12), nn.ReLU()]
    layers += [nn.Dropout(0.3)] if dropout else []
    layers += [nn.Linear(12, 5)]
    return nn.Sequential(*layers).to(dtype)


def conv_batch(dtype=torch.float64, n=8):
    return torch.randn(n, 3, 6, 6, dtype=dtype), torch.randint(0, 5, (n,))


def snapshot(model, optimizer=None):
    """Everything a measurement must leave as it was."""
    snap = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "grads": {n: (None if p.grad is None else (p.grad, p.grad.clone())) for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()},
            "rng": torch.get_rng_state(),
            "module_dicts": [sorted(m.__dict__) for m in model.modules()]}
    if optimizer is not None:
        snap["opt"] = copy.deepcopy(optimizer.state_dict())
        snap["opt_called"] = optimizer.__dict__.get("_opt_called", "absent")
    return snap


def assert_same(a, b):
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n]), n
    for n, g in a["grads"].items():
        h = b["grads"][n]
        assert (g is None) == (h is None), n
        if g is not None:
            assert h[0] is g[0] and torch.equal(h[1], g[1]), n
    for n in a["buffers"]:
        assert torch.equal(a["buffers"][n], b["buffers"][n]), n
    assert torch.equal(a["rng"], b["rng"])
    assert a["module_dicts"] == b["module_dicts"]
    if "opt" in a:
        assert a["opt_called"] == b["opt_called"]
        sa, sb = a["opt"], b["opt"]
        assert sa["param_groups"] == sb["param_groups"]
        assert sa["state"].keys() == sb["state"].keys()
        for k in sa["state"]:
            for key, v in sa["state"][k].items():
                w = sb["state"][k][key]
                assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


# -------------------------------------------------------------------------------------------------
# ICS
# -------------------------------------------------------------------------------------------------

def naive_ics(model, loss_fn, batch, seed, lr=None, optimizer=None):
    """Definition 2.1, one deep copy and one full forward/backward per layer. For a Sequential
    model, the layers before layer i are the entries with a smaller index."""
    torch.manual_seed(seed)
    ref = copy.deepcopy(model)
    loss_fn(ref, batch).backward()
    G = {n: p.grad.clone() for n, p in ref.named_parameters()}
    if lr is not None:
        new = {n: p.detach() - lr * G[n] for n, p in model.named_parameters()}
    else:
        m3 = copy.deepcopy(model)
        opt3 = type(optimizer)(m3.parameters(), **optimizer.defaults)
        opt3.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for n, p in m3.named_parameters():
            p.grad = G[n].clone()
        opt3.step()
        new = {n: p.detach().clone() for n, p in m3.named_parameters()}
    out = []
    for idx, layer in enumerate(model):
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        m2 = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in m2.named_parameters():
                if int(n.split(".")[0]) < idx:
                    p.copy_(new[n])
        torch.manual_seed(seed)
        loss_fn(m2, batch).backward()
        g, gp = G[f"{idx}.weight"].flatten(), m2[idx].weight.grad.flatten()
        out.append((str(idx), float((g - gp).norm()), float(F.cosine_similarity(g, gp, dim=0))))
    return out


def check_ics(got, want, rtol=1e-9):
    assert [r.name for r in got] == [w[0] for w in want]
    for r, (_, l2, cos) in zip(got, want):
        assert r.l2 == pytest.approx(l2, rel=rtol, abs=1e-12)
        assert r.cosine == pytest.approx(cos, rel=rtol, abs=1e-12)


@pytest.mark.parametrize("scheme", ["shared_prefix", "naive"])
def test_ics_matches_naive_loop_with_lr(scheme):
    model, batch = conv_net(dropout=True), conv_batch()
    torch.manual_seed(3)
    got = L.ics(model, xent, batch, lr=0.5, scheme=scheme)
    check_ics(got, naive_ics(model, xent, batch, seed=3, lr=0.5))
    assert got[0].l2 == 0.0 and got[0].cosine == 1.0  # nothing precedes the first layer
    assert all(r.l2 > 0 for r in got[1:])


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9, weight_decay=1e-2),
    lambda ps: torch.optim.Adam(ps, lr=0.05),
])
def test_ics_with_optimizer_matches_naive_loop(make_opt):
    model, batch = conv_net(), conv_batch()
    opt = make_opt(model.parameters())
    for _ in range(2):  # give the optimizer some state
        opt.zero_grad()
        xent(model, conv_batch()).backward()
        opt.step()
    got = L.ics(model, xent, batch, optimizer=opt)
    check_ics(got, naive_ics(model, xent, batch, seed=0, optimizer=opt), rtol=1e-8)


class Residual(nn.Module):
    """Not a Sequential: a residual block with an in-place add of a BN output, a ReLU module
    called twice, a parameter of the top module used only at the end, functional ops."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = bnext.nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = bnext.nn.BatchNorm2d(4)
        self.skip = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 5)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        x = self.relu(self.stem(x))
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += self.skip(x)
        out = self.relu(out).mean((2, 3))
        return self.head(out) * self.scale


def gradient_after_prefix_step(model, batch, lr, in_prefix):
    """A hand-built G' for ICS: G, the gradients of the loss at the model's parameters (by name), and a
    copy of the model whose parameters named in_prefix(name) took the step -lr * G, with the loss's
    gradients at that point in its .grad."""
    m2 = copy.deepcopy(model)
    xent(m2, batch).backward()
    G = {n: p.grad.clone() for n, p in m2.named_parameters()}
    m3 = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m3.named_parameters():
            if in_prefix(n):
                p.sub_(lr * G[n])
    xent(m3, batch).backward()
    return G, m3


def test_ics_shared_prefix_equals_naive_scheme_on_a_residual_model(monkeypatch):
    model, batch = Residual().double(), conv_batch()
    sweeps = []
    sweep = L._shared_prefix_sweep
    monkeypatch.setattr(L, "_shared_prefix_sweep", lambda *a: sweeps.append(a[1].copy_outputs) or sweep(*a))
    shared = L.ics(model, xent, batch, lr=0.4, scheme="shared_prefix")
    assert sweeps == [False, True]  # `out += skip(x)` modifies a cached output: restarted serving copies
    naive = L.ics(model, xent, batch, lr=0.4, scheme="naive")
    assert [r.name for r in shared] == ["stem", "conv1", "conv2", "skip", "head"]
    for a, b in zip(shared, naive):
        assert a.l2 == pytest.approx(b.l2, rel=1e-10, abs=1e-14)
        assert a.cosine == pytest.approx(b.cosine, rel=1e-10)
    # conv2's prefix holds stem, conv1 and bn1 but not bn2: check against a hand-built G'.
    G, m3 = gradient_after_prefix_step(model, batch, 0.4, lambda n: n.split(".")[0] in ("stem", "conv1", "bn1"))
    assert shared[2].l2 == pytest.approx(float((G["conv2.weight"] - m3.conv2.weight.grad).norm()), rel=1e-9)


class Wobbly(nn.Module):
    """Calls an extra Identity module on every other forward: the module calls change between
    passes (the function does not)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.id = nn.Linear(4, 6), nn.Linear(6, 3), nn.Identity()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = torch.tanh(self.a(x))
        if self.calls % 2:
            h = self.id(h)
        return self.b(h)


def test_ics_falls_back_to_naive_when_module_calls_change():
    model, batch = Wobbly().double(), (torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))
    with pytest.warns(UserWarning, match="naive scheme"):
        got = L.ics(model, xent, batch, lr=0.2)
    want = L.ics(model, xent, batch, lr=0.2, scheme="naive")
    assert [(r.l2, r.cosine) for r in got] == [(r.l2, r.cosine) for r in want]
    with pytest.raises(RuntimeError, match="same module calls"):
        L.ics(model, xent, batch, lr=0.2, scheme="shared_prefix")


def test_ics_layers_argument_and_errors():
    model, batch = conv_net(), conv_batch()
    got = L.ics(model, xent, batch, lr=0.1, layers=["10", model[3]])
    assert [r.name for r in got] == ["3", "10"]  # forward order
    full = {r.name: r for r in L.ics(model, xent, batch, lr=0.1)}
    assert got[0].l2 == pytest.approx(full["3"].l2, rel=1e-12)
    with pytest.raises(ValueError, match="exactly one of lr"):
        L.ics(model, xent, batch)
    with pytest.raises(ValueError, match="exactly one of lr"):
        L.ics(model, xent, batch, lr=0.1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="'nope' is not a submodule"):
        L.ics(model, xent, batch, lr=0.1, layers=["nope"])
    with pytest.raises(ValueError, match="'2' has no trainable parameter 'weight'"):
        L.ics(model, xent, batch, lr=0.1, layers=["2"])
    with pytest.raises(ValueError, match="scheme must be"):
        L.ics(model, xent, batch, lr=0.1, scheme="fast")


# -------------------------------------------------------------------------------------------------
# Leaving no trace
# -------------------------------------------------------------------------------------------------

def test_measurements_leave_no_trace():
    model, batch = conv_net(dropout=True), conv_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5)
    xent(model, batch).backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=False)
    xent(model, conv_batch()).backward()  # leave some .grad behind
    model[1].weight.grad = None  # and a None one
    before = snapshot(model, opt)
    L.ics(model, xent, batch, optimizer=opt)
    L.ics(model, xent, batch, lr=0.1)
    L.line_probe(model, xent, batch, [0.1, 0.2])
    L.line_probe(model, xent, batch, [0.1], mode="sequential", direction="random")
    L.hessian_top_eigenvalue(model, xent, batch, iters=3)
    L.hessian_trace(model, xent, batch, samples=2)
    assert_same(before, snapshot(model, opt))


def train(model, opt, steps, measure):
    for _ in range(steps):
        batch = conv_batch()
        if measure:
            L.ics(model, xent, batch, optimizer=opt)
            L.ics(model, xent, batch, lr=0.05)
            L.line_probe(model, xent, batch, [0.05, 0.1])
            L.hessian_top_eigenvalue(model, xent, batch, iters=2)
        opt.zero_grad()
        xent(model, batch).backward()
        opt.step()


def test_training_trajectory_is_identical_with_measurements_every_step():
    torch.manual_seed(0)
    plain = conv_net(dropout=True)
    measured = copy.deepcopy(plain)
    opt_a = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(measured.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    train(plain, opt_a, 3, measure=False)
    torch.manual_seed(1)
    with L.track_bn_gradients(measured):
        train(measured, opt_b, 3, measure=True)
    a, b = snapshot(plain, opt_a), snapshot(measured, opt_b)
    for key in ("params", "buffers"):
        for n in a[key]:
            assert torch.equal(a[key][n], b[key][n]), (key, n)
    assert torch.equal(a["rng"], b["rng"])
    for k, s in a["opt"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["opt"]["state"][k]["momentum_buffer"])


# -------------------------------------------------------------------------------------------------
# Line probes
# -------------------------------------------------------------------------------------------------

def naive_line_probe(model, loss_fn, batch, etas, direction=None, seed=0):
    """One deep copy and one forward/backward per step size."""
    torch.manual_seed(seed)
    ref = copy.deepcopy(model)
    loss = loss_fn(ref, batch)
    loss.backward()
    g = [p.grad.clone() for p in ref.parameters()]
    d = g if direction is None else direction
    losses, diffs = [], []
    for eta in etas:
        m2 = copy.deepcopy(model)
        with torch.no_grad():
            for p, dk in zip(m2.parameters(), d):
                p.sub_(eta * dk)
        torch.manual_seed(seed)
        lk = loss_fn(m2, batch)
        lk.backward()
        losses.append(float(lk.detach()))
        diffs.append(float(torch.cat([(p.grad - gk).flatten() for p, gk in zip(m2.parameters(), g)]).norm()))
    dn = float(torch.cat([t.flatten() for t in d]).norm())
    beta = max(df / (abs(e) * dn) for df, e in zip(diffs, etas) if e != 0)
    return float(loss.detach()), losses, diffs, beta


def check_probe(p, want, rtol):
    loss, losses, diffs, beta = want
    assert p.loss == pytest.approx(loss, rel=rtol)
    assert p.losses == pytest.approx(losses, rel=rtol)
    assert p.grad_diffs == pytest.approx(diffs, rel=rtol)
    assert p.beta == pytest.approx(beta, rel=rtol)
    assert p.loss_range == pytest.approx(max(losses) - min(losses), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("dropout", [False, True])
def test_line_probe_batched_matches_naive_loop(dropout):
    model, batch = conv_net(dropout=dropout), conv_batch()
    etas = [0.0, 0.05, 0.2, 0.8]
    torch.manual_seed(5)
    p = L.line_probe(model, xent, batch, etas)
    assert p.batched and p.fallback_reason is None
    check_probe(p, naive_line_probe(model, xent, batch, etas, seed=5), rtol=1e-9)
    assert p.grad_diffs[0] == pytest.approx(0.0, abs=1e-12)
    torch.manual_seed(5)
    q = L.line_probe(model, xent, batch, etas, mode="sequential")
    assert not q.batched
    assert q.losses == pytest.approx(p.losses, rel=1e-10) and q.grad_diffs == pytest.approx(p.grad_diffs, rel=1e-9)


class ItemInForward(nn.Module):
    """Reads a value back to Python in forward: vmap cannot batch it."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 6), bnext.nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.a(x)))
        return self.b(h) * (1.0 + 0.0 * float(h.detach().sum()))


def test_line_probe_falls_back_to_sequential_and_reports_it():
    model = ItemInForward().double()
    batch = (torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))
    etas = [0.1, 0.3]
    p = L.line_probe(model, xent, batch, etas)
    # the reason names vmap's own error, which mode="batched" raises instead of falling back
    assert not p.batched and p.fallback_reason.startswith("RuntimeError: vmap: It looks like you're calling .item()")
    check_probe(p, naive_line_probe(model, xent, batch, etas), rtol=1e-10)
    with pytest.raises(RuntimeError, match=r"^vmap: It looks like you're calling \.item\(\) on a Tensor") as e:
        L.line_probe(model, xent, batch, etas, mode="batched")
    assert p.fallback_reason == f"RuntimeError: {str(e.value).strip().splitlines()[0]}"


def test_line_probe_directions():
    model, batch = conv_net(), conv_batch()
    etas = [0.1, 0.4]
    r1 = L.line_probe(model, xent, batch, etas, direction="random", seed=1)
    r2 = L.line_probe(model, xent, batch, etas, direction="random", seed=1)
    r3 = L.line_probe(model, xent, batch, etas, direction="random", seed=2)
    assert r1.losses == r2.losses and r1.losses != r3.losses
    assert r1.direction_norm == pytest.approx(r1.grad_norm, rel=1e-12)
    gen = torch.Generator().manual_seed(7)
    d = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]
    p = L.line_probe(model, xent, batch, etas, direction=d)
    check_probe(p, naive_line_probe(model, xent, batch, etas, direction=d), rtol=1e-9)
    named = dict(zip([n for n, _ in model.named_parameters()], d))
    assert L.line_probe(model, xent, batch, etas, direction=named).losses == p.losses
    with pytest.raises(ValueError, match="one tensor per trainable parameter"):
        L.line_probe(model, xent, batch, etas, direction=d[:-1])
    with pytest.raises(ValueError, match="direction must be"):
        L.line_probe(model, xent, batch, etas, direction="sideways")


# -------------------------------------------------------------------------------------------------
# Curvature
# -------------------------------------------------------------------------------------------------

class Quadratic(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = a
        self.w = nn.Parameter(torch.randn(a.shape[0], dtype=a.dtype))

    def forward(self, _):
        return 0.5 * (self.a * self.w ** 2).sum()


def test_hessian_closed_forms():
    # Diagonal quadratic: H = diag(a); Hutchinson is exact for every Rademacher vector.
    a = torch.tensor([1.0, -7.0, 3.0, 0.5, 2.0], dtype=torch.float64)
    quad = Quadratic(a)
    loss = lambda m, b: m(b)  # noqa: E731
    assert L.hessian_trace(quad, loss, None, samples=3) == pytest.approx(float(a.sum()), rel=1e-12)
    assert L.hessian_top_eigenvalue(quad, loss, None, iters=500, tol=1e-14) == pytest.approx(-7.0, rel=1e-9)
    # Linear least squares: H = 2 X^T X / n.
    X, y = torch.randn(40, 6, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    net = nn.Linear(6, 1, bias=False).double()
    mse = lambda m, b: (m(b[0]).squeeze(1) - b[1]).pow(2).mean()  # noqa: E731
    eig = torch.linalg.eigvalsh(2 * X.T @ X / 40)
    top = L.hessian_top_eigenvalue(net, mse, (X, y), iters=2000, tol=1e-15)
    assert top == pytest.approx(float(eig[-1]), rel=1e-8)


def tiny_bn_loss(flat, x, y, shapes):
    """Linear(3,4) -> BatchNorm (batch statistics, by formula) -> tanh -> Linear(4,2), MSE,
    as a function of the flat parameter vector."""
    ps, k = [], 0
    for s in shapes:
        n = math.prod(s)
        ps.append(flat[k:k + n].view(s))
        k += n
    w1, b1, gamma, beta, w2, b2 = ps
    h = x @ w1.T + b1
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * gamma + beta
    out = torch.tanh(h) @ w2.T + b2
    return (out - y).pow(2).sum(1).mean()


def test_hessian_matches_dense_hessian_of_tiny_bn_net_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), bnext.nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    mse = lambda m, b: (m(b[0]) - b[1]).pow(2).sum(1).mean()  # noqa: E731
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    with torch.no_grad():
        assert float(tiny_bn_loss(flat, x, y, shapes)) == pytest.approx(float(mse(copy.deepcopy(model), (x, y))), rel=1e-12)
    H = torch.autograd.functional.hessian(lambda f: tiny_bn_loss(f, x, y, shapes), flat)
    eig = torch.linalg.eigvalsh(H)
    want = float(eig[eig.abs().argmax()])
    got = L.hessian_top_eigenvalue(model, mse, (x, y), iters=3000, tol=1e-13)
    assert got == pytest.approx(want, rel=1e-6)
    samples = 1000
    est = L.hessian_trace(model, mse, (x, y), samples=samples)
    off = H - torch.diag(torch.diag(H))
    std = math.sqrt(2 * float((off ** 2).sum()) / samples)
    assert abs(est - float(torch.trace(H))) < 5 * std


# -------------------------------------------------------------------------------------------------
# Theorem 4.1
# -------------------------------------------------------------------------------------------------

def test_bn_gradient_identity_holds_and_lhs_is_the_input_gradient():
    torch.manual_seed(0)
    model = conv_net(dtype=torch.float32)
    batch = conv_batch(torch.float32, n=16)
    # Independent lhs: the gradient w.r.t. each BN input, read with retain_grad on a copy.
    ref, inputs = copy.deepcopy(model), {}

    def keep(name):
        def hook(mod, args):
            args[0].retain_grad()
            inputs[name] = args[0]
        return hook
    for name, mod in ref.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.register_forward_pre_hook(keep(name))
    xent(ref, batch).backward()

    with L.track_bn_gradients(model):
        xent(model, batch).backward()
        res = L.bn_gradient_identity(model)
    assert sorted(res) == ["1", "4", "7"]
    for name, r in res.items():
        C = inputs[name].shape[1]
        assert r.lhs.shape == (C,) and r.lhs.dtype == torch.float64 and r.m == inputs[name].numel() // C
        torch.testing.assert_close(r.lhs, inputs[name].grad.double().pow(2).sum((0, 2, 3)), rtol=1e-5, atol=0)
        assert float(r.rel_error.max()) < 1e-4  # the paper's claim-6 threshold, fp32
        # Paper's form: off by about eps / var only.
        assert float(((r.lhs - r.rhs_paper).abs() / r.lhs).max()) < 1e-3


def test_bn_gradient_identity_float64_and_layer_kinds():
    torch.manual_seed(0)
    model = nn.Sequential(bnext.nn.BatchNorm1d(5), nn.Linear(5, 6), nn.BatchNorm1d(6, affine=False),
                          nn.ReLU(inplace=True), nn.Unflatten(1, (2, 3)), bnext.nn.BatchNorm1d(2, activation="relu"),
                          nn.Flatten(), nn.Linear(6, 3)).double()
    batch = (torch.randn(12, 5, dtype=torch.float64) * 3 + 1, torch.randint(0, 3, (12,)))
    tracker = L.track_bn_gradients(model)
    xent(model, batch).backward()
    res = L.bn_gradient_identity(model)
    assert sorted(res) == ["0", "2", "5"]  # "0": BN on the data, whose input needs no grad
    for r in res.values():
        assert float(r.rel_error.max()) < 1e-10
    tracker.remove()
    with pytest.raises(RuntimeError, match="track_bn_gradients"):
        L.bn_gradient_identity(model)
    assert L.bn_gradient_identity(nn.Linear(2, 2)) == {}
    with L.track_bn_gradients(model):
        model.eval()
        xent(model, batch).backward()
        assert L.bn_gradient_identity(model) == {}  # eval mode: running statistics, not Theorem 4.1


def test_bad_arguments():
    model, batch = conv_net(), conv_batch()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        L.line_probe(lambda x: x, xent, batch, [0.1])
    with pytest.raises(ValueError, match="at least one step size"):
        L.line_probe(model, xent, batch, [])
    with pytest.raises(ValueError, match="scalar"):
        L.line_probe(model, lambda m, b: m(b[0]), batch, [0.1])
    with pytest.raises(ValueError, match="iters must be"):
        L.hessian_top_eigenvalue(model, xent, batch, iters=0)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        L.hessian_trace(frozen, lambda m, b: m(b).sum(), torch.randn(3, 2))


class Tied(nn.Module):
    """The output layer's weight is the input layer's (transposed): used before its layer is called."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid = nn.Linear(5, 3, bias=False), nn.Linear(3, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = nn.Parameter(torch.randn(5, 3))
        self.inp.weight = self.out.weight  # stored as (5, 3): inp uses it transposed

    def forward(self, x):
        h = torch.tanh(x @ self.inp.weight)
        return self.out(torch.tanh(self.mid(h)))


def test_ics_tied_weights_use_the_naive_scheme():
    model, batch = Tied().double(), (torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 5, (7,)))
    with pytest.warns(UserWarning, match="tied weights"):
        got = L.ics(model, xent, batch, lr=0.3, layers=["mid", "out"])
    assert [r.name for r in got] == ["mid", "out"]
    with pytest.raises(ValueError, match="tied weights"):
        L.ics(model, xent, batch, lr=0.3, layers=["mid", "out"], scheme="shared_prefix")
    # "out"'s own (tied) weight is not part of its prefix: only mid's parameters are updated.
    G, m3 = gradient_after_prefix_step(model, batch, 0.3, lambda n: n.startswith("mid."))
    assert got[1].l2 == pytest.approx(float((G["inp.weight"] - m3.out.weight.grad).norm()), rel=1e-9)


def test_measurements_do_not_overwrite_bn_gradient_records():
    model, batch = conv_net(), conv_batch()
    with L.track_bn_gradients(model):
        xent(model, batch).backward()
        before = L.bn_gradient_identity(model)
        L.ics(model, xent, batch, lr=0.1)
        L.line_probe(model, xent, batch, [0.1])
        L.hessian_trace(model, xent, batch, samples=1)
        after = L.bn_gradient_identity(model)
    assert all(after[n] is before[n] for n in before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model, batch = conv_net(), conv_batch()
    gpu = copy.deepcopy(model).cuda()
    gbatch = tuple(t.cuda() for t in batch)
    for a, b in zip(L.ics(model, xent, batch, lr=0.3), L.ics(gpu, xent, gbatch, lr=0.3)):
        assert a.l2 == pytest.approx(b.l2, rel=1e-9) and a.cosine == pytest.approx(b.cosine, rel=1e-9)
    p, q = L.line_probe(model, xent, batch, [0.1, 0.5]), L.line_probe(gpu, xent, gbatch, [0.1, 0.5])
    assert q.batched and p.losses == pytest.approx(q.losses, rel=1e-9)
    assert p.grad_diffs == pytest.approx(q.grad_diffs, rel=1e-8)
    # Different start vectors (CPU and CUDA generators differ): converge both.
    assert L.hessian_top_eigenvalue(model, xent, batch, iters=2000, tol=1e-12) == pytest.approx(
        L.hessian_top_eigenvalue(gpu, xent, gbatch, iters=2000, tol=1e-12), rel=1e-5)
    with L.track_bn_gradients(gpu):
        xent(gpu, gbatch).backward()
        for r in L.bn_gradient_identity(gpu).values():
            assert float(r.rel_error.max()) < 1e-10


# --- bnext.channel_stats: the per-channel statistics the experiments' activation monitor records --------

@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_channel_stats_match_float64_var_mean(layout, dtype):
    base = torch.randn(6, 5, 7, 18, dtype=torch.float64) * 2 + 3
    x = base[..., ::2] if layout == "slice" else base[..., :9].contiguous()
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x = x.to(dtype)
    mean, var = bnext.channel_stats(x)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    assert mean.dtype == var.dtype == torch.float64 and mean.shape == (5,)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6}[dtype]
    torch.testing.assert_close(mean, mean_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(var, var_ref, rtol=tol, atol=tol)


def test_channel_stats_large_mean_2d_and_empty():
    x = torch.randn(4096, 3) + 1e4  # (N, C): no spatial dims; |mean| >> std in fp32
    mean, var = bnext.channel_stats(x)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=0, unbiased=False)
    torch.testing.assert_close(var, var_ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-9, atol=0)
    mean, var = bnext.channel_stats(torch.randn(0, 3, 4))
    assert mean.isnan().all() and var.isnan().all()
    with pytest.raises(ValueError, match="input must have shape"):
        bnext.channel_stats(torch.randn(3))
    with pytest.raises(TypeError, match="input must be float"):
        bnext.channel_stats(torch.ones(3, 4, dtype=torch.int64))
