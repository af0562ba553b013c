"""Optimization-landscape measurements of Santurkar et al., "How Does Batch Normalization Help
Optimization?" (NeurIPS 2018), for any torch.nn.Module.

    ics                     internal covariate shift, Definition 2.1 (per layer: ||G - G'||, cos(G, G'))
    line_probe              loss and gradient along -eta * g (Sec. 3.2): loss range, gradient
                            predictiveness, effective beta-smoothness
    hessian_top_eigenvalue  largest-magnitude Hessian eigenvalue (power iteration on HVPs)
    hessian_trace           Hutchinson estimate of tr(H)
    track_bn_gradients,     Theorem 4.1 per BatchNorm channel:
    bn_gradient_identity    ||grad_y L||^2 = (gamma^2/sigma^2)(||g||^2 - <1,g>^2/m - <g,yhat>^2/m)

Conventions shared by every function:
- ``loss_fn(model, batch) -> scalar Tensor`` computes the training loss exactly as the training
  step does (e.g. ``lambda m, b: F.cross_entropy(m(b[0]), b[1])``); ``batch`` is passed through.
  Or, as in PyHessian and loss-landscape: ``criterion=`` (keyword) with ``batch = (inputs, targets)``,
  the loss being ``criterion(model(inputs), targets)``, e.g. ``ics(model, batch=(x, y),
  criterion=F.cross_entropy, lr=0.1)``. Give exactly one; a criterion passed as ``loss_fn`` (a
  torch.nn loss module or a torch.nn.functional function, or one that fails on the model as its
  first argument) raises a TypeError that shows both forms.
- "The parameters" are the model's trainable parameters (``requires_grad``), in
  ``named_parameters()`` order.
- The model is evaluated in its current mode (train mode: BatchNorm uses batch statistics), through
  ``torch.func.functional_call`` with copies of its buffers, so running statistics and
  ``num_batches_tracked`` never change.
- Nothing is left behind: parameters, their ``.grad``, buffers, optimizer state and the random
  number generators (CPU, CUDA, and any ``torch.Generator`` held by a module) are bit-identical
  afterwards, so a training run that measures at every step follows exactly the trajectory of
  one that does not. Random draws inside the forward (dropout, noisy BN) are replayed: every pass
  a measurement makes sees the same draws as the first, i.e. G and G' are gradients of the same
  stochastic function.
"""
import copy
import functools
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from .ops import cosine, grad_stats, multi_axpy

__all__ = ["LayerICS", "LineProbe", "BNGradientIdentity", "BNGradientTracker", "ics", "line_probe",
           "hessian_top_eigenvalue", "hessian_trace", "track_bn_gradients", "bn_gradient_identity"]

LossFn = Callable[[nn.Module, Any], Tensor]

#: Modules that count as "layers" for ics() by default.
LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)

# > 0 while a measurement runs: BNGradientTracker then ignores the measurement's own passes.
_measuring = [0]


def _measurement(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _measuring[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _measuring[0] -= 1
    return wrapper


# =================================================================================================
# Shared machinery: functional evaluation, generators, tensors lists
# =================================================================================================

def _both_forms(op: str, name: str) -> str:
    short = op.rsplit(".", 1)[-1]
    return (f"either {short}(model, batch=(inputs, targets), criterion={name}, ...) or "
            f"{short}(model, lambda model, batch: {name}(model(batch[0]), batch[1]), batch, ...)")


def _name_of(fn) -> str:
    """How the error messages spell the user's callable: F.cross_entropy, CrossEntropyLoss(), criterion."""
    name = getattr(fn, "__qualname__", None)
    if name is None:
        return type(fn).__name__ + "()"
    if "<" in name:  # a lambda or a local function
        return "criterion"
    return ("F." + name) if getattr(fn, "__module__", None) == "torch.nn.functional" else name


def _looks_like_criterion(fn) -> bool:
    """A torch loss module or a torch.nn.functional function: these take (outputs, targets), never a model."""
    if isinstance(fn, nn.modules.loss._Loss):
        return True
    return getattr(fn, "__module__", None) in ("torch.nn.functional", "torch._C._nn")


def _loss_from(op: str, loss_fn, criterion, batch):
    """The loss as loss_fn(model, batch), from either convention (see the module docstring)."""
    if loss_fn is not None and criterion is not None:
        raise TypeError(f"{op}: give loss_fn(model, batch) or criterion(outputs, targets), not both")
    if criterion is not None:
        if not callable(criterion):
            raise TypeError(f"{op}: criterion must be callable as criterion(model(inputs), targets), got "
                            f"{type(criterion).__name__}")
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            got = f"a {type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) \
                else type(batch).__name__
            raise ValueError(f"{op}: with criterion=, batch must be a pair (inputs, targets), got {got}")
        return lambda model, b: criterion(model(b[0]), b[1])
    if loss_fn is None:
        raise TypeError(f"{op}: give loss_fn (called as loss_fn(model, batch)) or criterion= (called as "
                        "criterion(model(inputs), targets) with batch = (inputs, targets))")
    if not callable(loss_fn):
        raise TypeError(f"{op}: loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    if _looks_like_criterion(loss_fn):
        name = _name_of(loss_fn)
        raise TypeError(f"{op}: loss_fn is called as loss_fn(model, batch), but {name} is a criterion "
                        f"(called as criterion(outputs, targets)); use {_both_forms(op, name)}")
    return loss_fn


class _LossModule(nn.Module):
    """forward(batch) = loss_fn(model, batch): lets functional_call swap the model's parameters
    while the user's loss function runs."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, op: str = "bnext.landscape"):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_loss_fn", loss_fn)  # never registered as a submodule
        object.__setattr__(self, "context", None)
        object.__setattr__(self, "_op", op)

    def forward(self, batch):
        try:
            if self.context is None:
                return self._loss_fn(self.model, batch)
            with self.context():
                return self._loss_fn(self.model, batch)
        except (TypeError, AttributeError) as e:
            # A criterion given as loss_fn fails inside torch with the model where a tensor belongs
            # ("must be Tensor, not Sequential", "'Sequential' object has no attribute 'size'").
            if f"{type(self.model).__name__}'" not in str(e) and f"not {type(self.model).__name__}" not in str(e):
                raise
            name = _name_of(self._loss_fn)
            raise TypeError(f"{self._op}: loss_fn {name} failed with the model as an argument ({e}); it is called "
                            f"as loss_fn(model, batch). If it is a criterion(outputs, targets), use "
                            f"{_both_forms(self._op, name)}") from e


class _Model:
    """A model's parameters and buffers by name, and one functional loss evaluation."""

    def __init__(self, op: str, model: nn.Module, loss_fn: Optional[LossFn], batch, criterion=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
        loss_fn = _loss_from(op, loss_fn, criterion, batch)  # batch is passed through: None is a batch too
        self.op, self.model, self.batch = op, model, batch
        self.wrapper = _LossModule(model, loss_fn, op)
        named = list(model.named_parameters())
        self.names = ["model." + n for n, _ in named]
        self.params = [p for _, p in named]
        self.trainable = [i for i, p in enumerate(self.params) if p.requires_grad]
        if not self.trainable:
            raise ValueError(f"{op}: the model has no trainable parameters")
        self.buffers = {"model." + n: b for n, b in model.named_buffers()}

    def loss(self, values: Sequence[Tensor]) -> Tensor:
        """The loss with parameter i replaced by values[i] and buffers by fresh copies."""
        params = dict(zip(self.names, values))
        buffers = {n: b.clone() for n, b in self.buffers.items()}
        loss = functional_call(self.wrapper, (params, buffers), (self.batch,))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"{self.op}: loss_fn must return a scalar Tensor, got "
                             f"{type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)}")
        return loss.reshape(())

    def detached(self) -> List[Tensor]:
        return [p.detach() for p in self.params]

    def leaves(self, values: Sequence[Tensor], which: Sequence[int]) -> List[Tensor]:
        """Fresh leaves requiring grad for the entries `which` of `values` (replaced in place)."""
        out = []
        for i in which:
            values[i] = values[i].detach().requires_grad_(True)
            out.append(values[i])
        return out


def _grads(loss: Tensor, leaves: Sequence[Tensor], **kw) -> List[Tensor]:
    """d loss / d leaves, zeros for leaves the loss does not depend on."""
    gs = torch.autograd.grad(loss, leaves, allow_unused=True, **kw)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, leaves)]


class _Generators:
    """States of every random generator a forward pass may draw from: the default CPU and CUDA
    generators and any torch.Generator stored on a module."""

    def __init__(self, model: nn.Module):
        gens = [torch.default_generator]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            gens += list(torch.cuda.default_generators)
        seen = {id(g) for g in gens}
        for m in model.modules():
            for v in vars(m).values():
                if isinstance(v, torch.Generator) and id(v) not in seen:
                    gens.append(v)
                    seen.add(id(v))
        self.gens = gens

    def get(self) -> List[Tensor]:
        return [g.get_state() for g in self.gens]

    def set(self, states: List[Tensor]):
        for g, s in zip(self.gens, states):
            g.set_state(s)

    @staticmethod
    def equal(a: List[Tensor], b: List[Tensor]) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b))


class _BatchStatisticsOnly:
    """Within the block, BatchNorm modules in training mode do not track running statistics
    (track_running_stats=False), so they use batch statistics exactly as before but neither read
    nor write their buffers: the form torch.func.vmap can batch. Restored on exit."""

    def __init__(self, model: nn.Module):
        self.mods = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                     and m.training and m.track_running_stats]

    def __enter__(self):
        for m in self.mods:
            m.track_running_stats = False

    def __exit__(self, *exc):
        for m in self.mods:
            m.track_running_stats = True


# =================================================================================================
# Internal covariate shift (Definition 2.1)
# =================================================================================================

@dataclass
class LayerICS:
    """ICS of one layer (Definition 2.1): G = dL/dW_i at the current parameters, G' = dL/dW_i
    after the parameters of layers 1..i-1 took the update, same batch."""
    name: str            # qualified module name
    l2: float            # ||G - G'||_2  (ideal 0)
    cosine: float        # cos(G, G')    (ideal 1; 1 when G = G' = 0, 0 when exactly one is 0)
    grad_norm: float     # ||G||_2
    grad_norm_after: float  # ||G'||_2


class _StopForward(BaseException):
    """Raised by the call tracer to end a forward pass early (a BaseException, so that a model's
    own ``except Exception`` cannot swallow it)."""


class _CallSequenceChanged(Exception):
    """The model's module calls differ from pass to pass: the shared-prefix scheme cannot apply."""


class _CacheModified(Exception):
    """A cached output was modified in place after it was cached (e.g. ``out += identity`` on a
    cached BatchNorm output): the sweep restarts serving copies."""


def _tensors(tree) -> List[Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, Tensor)]


class _CallTracer:
    """Numbers every module call of a forward pass (in the order calls start) and lets later
    passes serve cached outputs of calls, end at a given call, and record outputs.

    A call with index j served from the cache skips its descendants: the counter jumps to the value
    it had when call j completed in the reference pass. Cached outputs are served as they are
    (copying them would cost O(layers^2) activation copies); each entry keeps the version counters
    of its tensors, and serving an entry whose tensors were modified in place since raises
    _CacheModified (the caller then restarts with copy_outputs=True). When the forward draws random numbers, the
    generators are set, at every call start (and after every cached call), to the state they had
    at that point of the reference pass, so every pass sees the reference pass's draws."""

    def __init__(self, model: nn.Module, gens: _Generators):
        self.mods = list(dict.fromkeys(model.modules()))
        self.gens = gens
        self.reference = True
        self.seq: List[nn.Module] = []   # module of call j
        self.end: List[int] = []         # counter value when call j completed
        self.rng_start: List[Any] = []
        self.rng_end: List[Any] = []
        self.replay_rng = False
        self.passive = False
        self.copy_outputs = False
        self.counter = 0
        self.cache: Dict[int, Any] = {}
        self.stop_at: Optional[int] = None
        self.recorded: Optional[Dict[int, Any]] = None
        self._saved: List[Any] = []

    def __enter__(self):
        for m in self.mods:
            self._saved.append(m.__dict__.get("forward"))
            m.forward = self._wrap(m, m.forward)
        return self

    def __exit__(self, *exc):
        for m, f in zip(self.mods, self._saved):
            if f is None:
                del m.forward
            else:
                m.forward = f

    def start(self, cache=None, stop_at=None, record=False, passive=False):
        """Begins a pass after the reference pass. passive=True: calls run untouched."""
        if self.reference and self.seq:
            self.reference = False
            self.replay_rng = not _Generators.equal(self.rng_start[0], self.rng_end[0])
        self.passive = passive
        self.counter = 0
        self.cache = cache if cache is not None else {}
        self.stop_at = stop_at
        self.recorded = {} if record else None

    def first_call(self, module: nn.Module) -> Optional[int]:
        for j, m in enumerate(self.seq):
            if m is module:
                return j
        return None

    def _wrap(self, module: nn.Module, orig: Callable) -> Callable:
        def forward(*args, **kwargs):
            if self.passive:
                return orig(*args, **kwargs)
            j = self.counter
            self.counter += 1
            if self.reference:
                self.seq.append(module)
                self.end.append(-1)
                self.rng_start.append(self.gens.get())
                self.rng_end.append(None)
                out = orig(*args, **kwargs)
                self.end[j] = self.counter
                self.rng_end[j] = self.gens.get()
                return out
            if j >= len(self.seq) or self.seq[j] is not module:
                raise _CallSequenceChanged(f"call {j} is not {type(module).__name__} as in the first pass")
            if j in self.cache:
                self.counter = self.end[j]
                if self.replay_rng:
                    self.gens.set(self.rng_end[j])
                out, versions = self.cache[j]
                if self.copy_outputs:
                    return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, out)
                if [t._version for t in _tensors(out)] != versions:
                    raise _CacheModified(f"the cached output of call {j} ({type(module).__name__}) was modified in place")
                return out
            if j == self.stop_at:
                raise _StopForward()
            if self.replay_rng:
                self.gens.set(self.rng_start[j])
            out = orig(*args, **kwargs)
            if self.end[j] != self.counter:
                raise _CallSequenceChanged(f"call {j} ({type(module).__name__}) made other calls than in the first pass")
            if self.recorded is not None:
                self.recorded[j] = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out)
            return out
        return forward

    def recorded_entries(self) -> Dict[int, Any]:
        """The outputs recorded in the pass that just ended, with their tensors' current version
        counters (taken after the pass: in-place ops later in the same pass, like a ReLU(inplace)
        on a BatchNorm output, are part of what the cache holds, as in a plain forward)."""
        return {j: (out, [t._version for t in _tensors(out)]) for j, out in self.recorded.items()}


class _FirstUse(TorchFunctionMode):
    """Records, for each watched tensor, the tracer's call counter at the first torch function
    that receives it: a parameter whose first use has counter value <= c is used before call c."""

    def __init__(self, tracer: _CallTracer, watched: Dict[int, int]):
        super().__init__()
        self.tracer, self.pending, self.first = tracer, dict(watched), {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.pending:
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, Tensor):
                    i = self.pending.pop(id(t), None)
                    if i is not None:
                        self.first[i] = self.tracer.counter
        return func(*args, **kwargs)


def _first_uses(model: nn.Module, st: _Model, tracer: _CallTracer, seen: Dict[int, int]) -> Dict[int, int]:
    """First use of every parameter (see _FirstUse). A parameter no torch function received (used
    by an extension outside torch's dispatch, say) counts as used when its module is first called."""
    out = dict(seen)
    owner = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owner.setdefault(id(p), m)
    for i, p in enumerate(st.params):
        if i not in out and id(p) in owner:
            c = tracer.first_call(owner[id(p)])
            if c is not None:
                out[i] = c + 1
    return out


def _sgd_update(values: Sequence[Tensor], grads: Sequence[Tensor], lr: float) -> List[Tensor]:
    # The same op torch.optim.SGD (no momentum) applies: p.add_(grad, alpha=-lr).
    return [v.add(g, alpha=-lr) for v, g in zip(values, grads)]


def _optimizer_update(op: str, optimizer: torch.optim.Optimizer, params: Sequence[Tensor],
                      grads: Sequence[Tensor]) -> List[Tensor]:
    """The values `params` would have after ``optimizer.step()`` with these gradients.

    The step runs on clones: every parameter of the optimizer's groups is swapped for a clone
    (ours get `grads` as .grad, others none), the state for a deep copy, and everything (groups,
    state object, the LR scheduler's step flag) is put back, so the optimizer, the parameters and
    their .grad are untouched."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{op}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    ours = {id(p): g for p, g in zip(params, grads)}
    clones: Dict[int, Tensor] = {}
    saved_groups = [dict(g) for g in optimizer.param_groups]
    saved_state = optimizer.state
    had_flag, flag = "_opt_called" in optimizer.__dict__, optimizer.__dict__.get("_opt_called")
    new_state = defaultdict(dict)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in clones:
                continue
            c = p.detach().clone().requires_grad_(p.requires_grad)
            c.grad = ours[id(p)].detach().clone() if id(p) in ours else None
            clones[id(p)] = c
            if p in saved_state:
                new_state[c] = {k: (v.clone() if isinstance(v, Tensor) else copy.deepcopy(v))
                                for k, v in saved_state[p].items()}
    missing = [i for i, p in enumerate(params) if id(p) not in clones]
    if missing:
        raise ValueError(f"{op}: {len(missing)} trainable parameter(s) of the model are not in the optimizer")
    try:
        optimizer.state = new_state
        for group in optimizer.param_groups:
            group["params"] = [clones[id(p)] for p in group["params"]]
        with torch.no_grad():
            optimizer.step()
        return [clones[id(p)].detach() for p in params]
    finally:
        for group, saved in zip(optimizer.param_groups, saved_groups):
            group.clear()
            group.update(saved)
        optimizer.state = saved_state
        if had_flag:
            optimizer._opt_called = flag
        elif "_opt_called" in optimizer.__dict__:
            del optimizer._opt_called


def _resolve_layers(op: str, model: nn.Module, layers, tracer: _CallTracer, st: _Model) -> List[tuple]:
    """[(name, module, first call index, index of its weight in st.params)] in forward order."""
    names = {id(m): n for n, m in model.named_modules()}
    by_name = dict(model.named_modules())
    param_index = {id(p): i for i, p in enumerate(st.params)}
    if layers is None:
        chosen = [m for m in dict.fromkeys(tracer.seq) if isinstance(m, LAYER_TYPES)
                  and isinstance(getattr(m, "weight", None), Tensor) and m.weight.requires_grad]
    else:
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        chosen = []
        for l in layers:
            if isinstance(l, str):
                if l not in by_name:
                    raise ValueError(f"{op}: layer {l!r} is not a submodule of the model")
                l = by_name[l]
            elif not isinstance(l, nn.Module) or id(l) not in names:
                raise ValueError(f"{op}: layers must be names or submodules of the model, got {l!r}")
            w = getattr(l, "weight", None)
            if not isinstance(w, Tensor) or id(w) not in param_index or not w.requires_grad:
                raise ValueError(f"{op}: layer {names[id(l)]!r} has no trainable parameter 'weight'")
            if tracer.first_call(l) is None:
                raise ValueError(f"{op}: layer {names[id(l)]!r} is not called by loss_fn(model, batch)")
            chosen.append(l)
        chosen = list(dict.fromkeys(chosen))
    out = [(names[id(m)], m, tracer.first_call(m), param_index[id(m.weight)]) for m in chosen]
    return sorted(out, key=lambda t: t[2])


@_measurement
def ics(model: nn.Module, loss_fn: Optional[LossFn] = None, batch=None, lr: Optional[float] = None,
        optimizer: Optional[torch.optim.Optimizer] = None, layers=None,
        scheme: str = "auto", *, criterion=None) -> List[LayerICS]:
    """Internal covariate shift of every layer, Definition 2.1 of the paper.

    For layer i with weight W_i, on one batch:
        G  = dL/dW_i  at the current parameters,
        G' = dL/dW_i  after the parameters of layers 1..i-1 (and only those) took the update;
    returns ||G - G'||_2 and cos(G, G') per layer (ideal: 0 and 1).

    The update is plain SGD, x - lr * dL/dx, with ``lr``; with ``optimizer``, it is the step that
    optimizer would take now with the gradient of this batch (momentum, Adam moments, weight
    decay included), computed on copies without disturbing its state. Give exactly one.

    Layers: by default every Conv/Linear module (``LAYER_TYPES``) with a trainable weight that the
    forward calls; ``layers`` selects some (names or modules with a ``weight``). Results are in
    forward order (order of first call). "The parameters of layers 1..i-1" are those the forward
    first uses before layer i is called, minus layer i's own: a normalization module's parameters
    therefore belong to the layer before it, and a parameter used before any layer (or not at all)
    to none.

    scheme: "shared_prefix" computes all G' in one sweep: the forward through the already-updated
    earlier layers is cached and shared between layer i and i+1, each G' is then one forward from
    layer i on plus a backward that stops at W_i (only the later layers' input gradients and W_i's
    own are computed). "naive" evaluates one full forward per layer (backward still restricted to
    W_i). "auto" (default) uses shared_prefix and falls back to naive, with a warning, when the
    model's module calls are not the same from pass to pass or a layer's weight is used before
    the layer itself is called (tied weights).

    Leaves no trace: see the module docstring.
    """
    op = "bnext.landscape.ics"
    if (lr is None) == (optimizer is None):
        raise ValueError(f"{op}: give exactly one of lr (plain SGD) and optimizer")
    if lr is not None and (not isinstance(lr, (int, float)) or not math.isfinite(lr)):
        raise ValueError(f"{op}: lr must be a finite number, got {lr!r}")
    if scheme not in ("auto", "shared_prefix", "naive"):
        raise ValueError(f"{op}: scheme must be 'auto', 'shared_prefix' or 'naive', got {scheme!r}")
    st = _Model(op, model, loss_fn, batch, criterion)
    gens = _Generators(model)
    rng0 = gens.get()
    try:
        with _CallTracer(model, gens) as tracer:
            # Reference pass: G for every parameter, the module call sequence, first uses.
            values = st.detached()
            leaves = st.leaves(values, st.trainable)
            watch = _FirstUse(tracer, {id(values[i]): i for i in range(len(values))})
            st.wrapper.context = lambda: watch
            try:
                loss = st.loss(values)
            finally:
                st.wrapper.context = None
            G = [g.detach() for g in _grads(loss, leaves)]
            del loss
            first_use = _first_uses(model, st, tracer, watch.first)
            layer_list = _resolve_layers(op, model, layers, tracer, st)
            if not layer_list:
                return []
            current = st.detached()
            trained = [current[i] for i in st.trainable]
            if lr is not None:
                stepped = _sgd_update(trained, G, float(lr))
            else:
                stepped = _optimizer_update(op, optimizer, [st.params[i] for i in st.trainable], G)
            updated = list(current)
            for i, v in zip(st.trainable, stepped):
                updated[i] = v
            grad_of = {i: g for i, g in zip(st.trainable, G)}

            own = [{id(p) for p in m.parameters()} for _, m, _, _ in layer_list]
            prefixes = []
            for (_, m, c, _), own_ids in zip(layer_list, own):
                prefixes.append({i for i in st.trainable if first_use.get(i, math.inf) <= c
                                 and id(st.params[i]) not in own_ids})
            tied = any(first_use.get(i, math.inf) <= c for (_, m, c, _), own_ids in zip(layer_list, own)
                       for i in st.trainable if id(st.params[i]) in own_ids)
            use = scheme
            if tied and scheme == "shared_prefix":
                raise ValueError(f"{op}: scheme='shared_prefix' cannot handle a layer whose own parameter "
                                 "is used before the layer is called (tied weights); use 'naive' or 'auto'")
            if scheme == "auto":
                use = "naive" if tied else "shared_prefix"
                if tied:
                    warnings.warn(f"{op}: a layer's own parameter is used before the layer is called "
                                  "(tied weights); using the naive scheme", stacklevel=2)
            G_after = None
            if use == "shared_prefix":
                try:
                    G_after = _ics_shared_prefix(st, tracer, layer_list, prefixes, current, updated, grad_of)
                except _CallSequenceChanged as e:
                    if scheme != "auto":
                        raise RuntimeError(f"{op}: scheme='shared_prefix' needs the same module calls in "
                                           f"every forward pass ({e})") from None
                    warnings.warn(f"{op}: the model's module calls change between passes ({e}); "
                                  "using the naive scheme", stacklevel=2)
            if G_after is None:
                G_after = _ics_naive(st, tracer, gens, rng0, layer_list, prefixes, current, updated, grad_of)
    finally:
        gens.set(rng0)
    stats = grad_stats([grad_of[w] for _, _, _, w in layer_list], G_after)
    cos = cosine(stats)
    return [LayerICS(name, math.sqrt(max(float(s[2]), 0.0)), float(c), math.sqrt(float(s[0])), math.sqrt(float(s[1])))
            for (name, _, _, _), s, c in zip(layer_list, stats, cos)]


def _point(current, updated, prefix) -> List[Tensor]:
    return [updated[i] if i in prefix else v for i, v in enumerate(current)]


def _ics_naive(st, tracer, gens, rng0, layer_list, prefixes, current, updated, grad_of) -> List[Tensor]:
    out = []
    tracer.start(passive=True)
    for (_, _, _, w), prefix in zip(layer_list, prefixes):
        if not prefix:
            out.append(grad_of[w])
            continue
        values = _point(current, updated, prefix)
        leaf = st.leaves(values, [w])
        gens.set(rng0)
        out.append(_grads(st.loss(values), leaf)[0].detach())
    return out


def _ics_shared_prefix(st, tracer, layer_list, prefixes, current, updated, grad_of) -> List[Tensor]:
    """cache[j] = output of call j, valid for every later layer: calls that completed before the
    current layer's first call, computed with the prefix parameters updated. Advancing from layer
    i to i+1 runs the calls between them (under no_grad) with prefix(i+1) updated and stops at
    layer i+1's call. If the model modifies a cached output in place, the sweep starts over
    serving copies of the cached outputs."""
    try:
        return _shared_prefix_sweep(st, tracer, layer_list, prefixes, current, updated, grad_of)
    except _CacheModified:
        tracer.copy_outputs = True
        return _shared_prefix_sweep(st, tracer, layer_list, prefixes, current, updated, grad_of)


def _shared_prefix_sweep(st, tracer, layer_list, prefixes, current, updated, grad_of) -> List[Tensor]:
    out, cache = [], {}
    for k, ((_, _, c, w), prefix) in enumerate(zip(layer_list, prefixes)):
        if not prefix:
            out.append(grad_of[w])
        else:
            values = _point(current, updated, prefix)
            leaf = st.leaves(values, [w])
            tracer.start(cache=cache)
            out.append(_grads(st.loss(values), leaf)[0].detach())
        if k + 1 < len(layer_list):
            tracer.start(cache=cache, stop_at=layer_list[k + 1][2], record=True)
            try:
                with torch.no_grad():
                    st.loss(_point(current, updated, prefixes[k + 1]))
            except _StopForward:
                pass
            else:
                raise _CallSequenceChanged(f"call {layer_list[k + 1][2]} was not reached")
            cache.update(tracer.recorded_entries())
    return out


# =================================================================================================
# Line probes along the gradient (Sec. 3.2, App. A.2.2)
# =================================================================================================

@dataclass
class LineProbe:
    """Loss and gradient at x - eta_k d, for the step sizes etas (d = g, the gradient at x, by
    default), over all trainable parameters:
        losses[k]     = L(x - eta_k d)
        grad_diffs[k] = ||grad L(x - eta_k d) - g||_2
        beta          = max_k grad_diffs[k] / ||eta_k d||_2    (effective beta-smoothness; eta = 0 skipped)
    The paper's "loss variation" is ``loss_range`` and its "gradient predictiveness"
    ``grad_diff_range``."""
    etas: List[float]
    losses: List[float]
    grad_diffs: List[float]
    beta: float
    loss: float                    # L(x)
    grad_norm: float               # ||g||_2
    direction_norm: float          # ||d||_2
    batched: bool                  # True: the K points were evaluated together with torch.func.vmap
    fallback_reason: Optional[str] = None  # why vmap was not used (None when batched)

    @property
    def loss_range(self) -> float:
        return max(self.losses) - min(self.losses)

    @property
    def grad_diff_range(self) -> float:
        return max(self.grad_diffs) - min(self.grad_diffs)


def _direction(op, st: _Model, direction, g: List[Tensor], seed: int) -> List[Tensor]:
    params = [st.params[i] for i in st.trainable]
    if direction is None or (isinstance(direction, str) and direction == "gradient"):
        return g
    if isinstance(direction, str):
        if direction != "random":
            raise ValueError(f"{op}: direction must be None/'gradient', 'random' or a list of tensors, got {direction!r}")
        gen = torch.Generator(device=params[0].device).manual_seed(seed)
        d = [torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=gen) for p in params]
        stats = grad_stats(d, g)
        dn, gn = float(stats[:, 0].sum().sqrt()), float(stats[:, 1].sum().sqrt())
        scale = gn / dn if gn > 0 else 1.0 / dn
        return [t * scale for t in d]
    if isinstance(direction, dict):
        names = [st.names[i][len("model."):] for i in st.trainable]
        missing = [n for n in names if n not in direction]
        if missing:
            raise ValueError(f"{op}: direction has no tensor for parameter(s) {missing[:5]}")
        direction = [direction[n] for n in names]
    direction = list(direction)
    if len(direction) != len(params):
        raise ValueError(f"{op}: direction must have one tensor per trainable parameter ({len(params)}), "
                         f"got {len(direction)}")
    for k, (t, p) in enumerate(zip(direction, params)):
        if not isinstance(t, Tensor) or t.shape != p.shape:
            raise ValueError(f"{op}: direction[{k}] must be a tensor of shape {tuple(p.shape)} "
                             f"(parameter {st.names[st.trainable[k]][len('model.'):]})")
    return [t.detach().to(p.dtype) for t, p in zip(direction, params)]


def _probe_batched(st: _Model, stacked: List[Tensor], chunk_size):
    fixed = {st.names[i]: st.params[i].detach() for i in range(len(st.params)) if i not in set(st.trainable)}
    names = [st.names[i] for i in st.trainable]
    buffers = {n: b.clone() for n, b in st.buffers.items()}

    def one(*point):
        params = dict(fixed)
        params.update(zip(names, point))
        return functional_call(st.wrapper, (params, buffers), (st.batch,)).reshape(())

    leaves = [s.requires_grad_(True) for s in stacked]
    losses = torch.func.vmap(one, randomness="same", chunk_size=chunk_size)(*leaves)
    grads = _grads(losses.sum(), leaves)
    return losses.detach(), grads


def _probe_sequential(st: _Model, gens, rng0, stacked: List[Tensor]):
    losses, grads = [], [torch.empty_like(s) for s in stacked]
    for k in range(stacked[0].shape[0] if stacked else 0):
        values = st.detached()
        for i, s in zip(st.trainable, stacked):
            values[i] = s[k]
        leaves = st.leaves(values, st.trainable)
        gens.set(rng0)
        loss = st.loss(values)
        for out, g in zip(grads, _grads(loss, leaves)):
            out[k] = g
        losses.append(loss.detach())
    return torch.stack(losses), grads


@_measurement
def line_probe(model: nn.Module, loss_fn: Optional[LossFn] = None, batch=None, etas: Sequence[float] = None,
               direction=None, *, mode: str = "auto", chunk_size: Optional[int] = None, seed: int = 0,
               criterion=None) -> LineProbe:
    """The landscape along a direction (Sec. 3.2 and App. A.2.2 of the paper).

    At the current parameters x with loss L and gradient g (this batch, current mode: batch
    statistics in train mode), for each step size eta_k in ``etas``:
        loss variation           L(x - eta_k d)                      -> ``losses``, ``loss_range``
        gradient predictiveness  ||grad L(x - eta_k d) - g||_2        -> ``grad_diffs``, ``grad_diff_range``
        effective beta-smoothness max_k ||grad L(x - eta_k d) - g|| / ||eta_k d||   -> ``beta``
    with d = g by default (the paper). ``direction="random"``: a Gaussian direction scaled to
    ||g|| (seeded by ``seed``, drawn from a private generator); or a list of tensors, one per
    trainable parameter (or a dict name -> tensor).

    mode="batched": the K points are built with :func:`bnext.multi_axpy`, evaluated together with
    ``torch.func.vmap`` over ``functional_call`` with the stacked weights (``chunk_size`` bounds how
    many at once), and differentiated with one ordinary backward of the summed losses (the K losses
    are independent, so each point gets its own gradient). BatchNorm layers in train mode run
    with track_running_stats=False for the call (same batch statistics, buffers untouched).
    mode="sequential": one forward/backward per point. mode="auto" (default): batched, falling
    back to sequential when vmap fails on the model; ``LineProbe.batched`` and
    ``fallback_reason`` report what happened. Random draws in the forward are the same at every
    point (vmap randomness="same"; the sequential loop replays the generators).

    Leaves no trace: see the module docstring.
    """
    op = "bnext.landscape.line_probe"
    if mode not in ("auto", "batched", "sequential"):
        raise ValueError(f"{op}: mode must be 'auto', 'batched' or 'sequential', got {mode!r}")
    if etas is None:
        raise TypeError(f"{op}: etas (the step sizes) is required")
    if isinstance(etas, Tensor):
        etas = etas.reshape(-1).tolist() if etas.dim() <= 1 else etas
    try:
        etas = [float(e) for e in etas]
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{op}: etas must be a sequence of numbers or a 1-D tensor, got {etas!r}") from None
    if not all(math.isfinite(e) for e in etas):
        raise ValueError(f"{op}: etas must be finite numbers, got {etas}")
    if not etas:
        raise ValueError(f"{op}: etas must hold at least one step size")
    st = _Model(op, model, loss_fn, batch, criterion)
    gens = _Generators(model)
    rng0 = gens.get()
    try:
        with _BatchStatisticsOnly(model):
            values = st.detached()
            leaves = st.leaves(values, st.trainable)
            loss0 = st.loss(values)
            g = [t.detach() for t in _grads(loss0, leaves)]
            d = _direction(op, st, direction, g, seed)
            stacked = multi_axpy([st.params[i] for i in st.trainable], d, etas)
            batched, reason = mode != "sequential", None
            if batched:
                try:
                    gens.set(rng0)
                    losses, grads = _probe_batched(st, stacked, chunk_size)
                except Exception as e:  # noqa: BLE001 - any failure of vmap on this model
                    if mode == "batched":
                        raise
                    batched, reason = False, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                    stacked = [s.detach() for s in stacked]
            if not batched:
                losses, grads = _probe_sequential(st, gens, rng0, stacked)
    finally:
        gens.set(rng0)
    K = len(etas)
    a = [gk[k] for k in range(K) for gk in grads]
    b = [gj for _ in range(K) for gj in g]
    per_k = grad_stats(a, b).view(K, len(g), 4).sum(1)
    diffs = per_k[:, 2].clamp_min(0).sqrt().tolist()
    gd = grad_stats(g, d)
    g_norm, d_norm = float(gd[:, 0].sum().sqrt()), float(gd[:, 1].sum().sqrt())
    ratios = [diff / (abs(e) * d_norm) for diff, e in zip(diffs, etas) if e != 0 and d_norm > 0]
    beta = max(ratios) if ratios else math.nan
    return LineProbe(etas, [float(v) for v in losses], diffs, beta, float(loss0.detach()), g_norm, d_norm,
                     batched, reason)


# =================================================================================================
# Curvature: Hessian-vector products by double backward
# =================================================================================================

class _HessianVectorProduct:
    """v -> H v for the Hessian of the loss w.r.t. the trainable parameters at their current
    values, by double backward (through bnext's differentiable BatchNorm backward). One forward
    and first backward (create_graph=True), reused for every product."""

    def __init__(self, op, model, loss_fn, batch, criterion=None):
        self.st = st = _Model(op, model, loss_fn, batch, criterion)
        values = st.detached()
        self.leaves = st.leaves(values, st.trainable)
        grads = torch.autograd.grad(st.loss(values), self.leaves, create_graph=True, allow_unused=True)
        self.live = [k for k, g in enumerate(grads) if g is not None and g.requires_grad]
        self.grads = [grads[k] for k in self.live]

    def __call__(self, v: List[Tensor]) -> List[Tensor]:
        out = [torch.zeros_like(x) for x in self.leaves]
        if self.live:
            hv = torch.autograd.grad(self.grads, [self.leaves[k] for k in self.live],
                                     grad_outputs=[v[k] for k in self.live], retain_graph=True, allow_unused=True)
            for k, h in zip(self.live, hv):
                if h is not None:
                    out[k] = h.detach()
        return out


def _generator_for(t: Tensor, seed: int) -> torch.Generator:
    return torch.Generator(device=t.device).manual_seed(seed)


@_measurement
def hessian_top_eigenvalue(model: nn.Module, loss_fn: Optional[LossFn] = None, batch=None, iters: int = 100,
                           tol: float = 1e-3, seed: int = 0, *, criterion=None) -> float:
    """The Hessian eigenvalue of largest magnitude (signed), by power iteration.

    H = d^2 L / dx^2 over the trainable parameters x at their current values, on this batch, in
    the model's current mode: in train mode BatchNorm uses batch statistics, so H is the Hessian of
    the function actually being trained (PyHessian forces eval mode). Hessian-vector products come
    from double backward. Iteration: v <- H v / ||H v||, eigenvalue estimate lambda = <v, H v>
    (Rayleigh quotient, v unit); stops after ``iters`` products or when |lambda_t - lambda_{t-1}|
    <= tol * |lambda_t|. The start vector is Gaussian from a private generator seeded by ``seed``.
    Leaves no trace: see the module docstring.
    """
    op = "bnext.landscape.hessian_top_eigenvalue"
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{op}: iters must be a positive int, got {iters!r}")
    gens = _Generators(model)
    rng0 = gens.get()
    try:
        hvp = _HessianVectorProduct(op, model, loss_fn, batch, criterion)
        gen = _generator_for(hvp.leaves[0], seed)
        v = [torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=gen) for x in hvp.leaves]
        norm = float(grad_stats(v, v)[:, 0].sum().sqrt())
        v = [t / norm for t in v]
        lam = None
        for _ in range(iters):
            hv = hvp(v)
            s = grad_stats(v, hv).sum(0)
            new, hv_norm = float(s[3]), float(s[1].sqrt())
            if hv_norm == 0:
                return 0.0
            v = [t / hv_norm for t in hv]
            converged = lam is not None and abs(new - lam) <= tol * abs(new)
            lam = new
            if converged:
                break
        return lam
    finally:
        gens.set(rng0)


@_measurement
def hessian_trace(model: nn.Module, loss_fn: Optional[LossFn] = None, batch=None, samples: int = 100,
                  seed: int = 0, *, criterion=None) -> float:
    """Hutchinson's estimate of the Hessian trace, tr(H) = E_v[v^T H v] with Rademacher v
    (entries +-1), averaged over ``samples`` vectors from a private generator seeded by ``seed``.

    H as in :func:`hessian_top_eigenvalue` (current mode, batch statistics in train mode, double
    backward). The estimator's variance is 2 * sum_{i != j} H_ij^2 / samples. Leaves no trace.
    """
    op = "bnext.landscape.hessian_trace"
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"{op}: samples must be a positive int, got {samples!r}")
    gens = _Generators(model)
    rng0 = gens.get()
    try:
        hvp = _HessianVectorProduct(op, model, loss_fn, batch, criterion)
        gen = _generator_for(hvp.leaves[0], seed)
        total = 0.0
        for _ in range(samples):
            v = [torch.randint(0, 2, x.shape, device=x.device, generator=gen).to(x.dtype).mul_(2).sub_(1)
                 for x in hvp.leaves]
            total += float(grad_stats(v, hvp(v))[:, 3].sum())
        return total / samples
    finally:
        gens.set(rng0)


# =================================================================================================
# Theorem 4.1, measured per BatchNorm channel
# =================================================================================================

@dataclass
class BNGradientIdentity:
    """Theorem 4.1 for one BatchNorm layer, per channel (tensors of shape (C,), float64).

    y: the layer's input, m values per channel, mu and var its batch mean and (biased) variance,
    sigma^2 = var + eps, yhat = (y - mu) / sigma, z = gamma * yhat + beta the layer's output,
    g = dL/dz (before a fused ReLU: g = dL/d relu(z) * [z > 0]).
        lhs       = ||dL/dy||^2                       (from the backward pass itself)
        rhs_paper = (gamma^2 / sigma^2) (||g||^2 - <1,g>^2/m - <g,yhat>^2/m)
        rhs       = (gamma^2 / sigma^2) (||g||^2 - <1,g>^2/m - <g,yhat>^2/m * (2 - ||yhat||^2/m)
                                         + 2 <1,g><g,yhat><1,yhat>/m^2)
    ``rhs`` is the exact expansion of ||(gamma/sigma)(g - <1,g>/m - yhat <g,yhat>/m)||^2; it equals
    ``rhs_paper`` when eps = 0 (then ||yhat||^2 = m and <1,yhat> = 0). With eps > 0 they differ by
    (gamma^2/sigma^2) <g,yhat>^2/m * eps / sigma^2, relatively about eps / var.
    (The paper prints 1/sqrt(m) and an inequality; its own projection argument gives this equality.)
    """
    name: str
    lhs: Tensor
    rhs: Tensor
    rhs_paper: Tensor
    m: int
    scale: Optional[Tensor] = None   # gamma^2 / sigma^2, the factor the theorem's argument rests on
    g_sq: Optional[Tensor] = None    # ||g||^2; 1 - (rhs / scale) / g_sq is the share of it the projection removes

    @property
    def rel_error(self) -> Tensor:
        """|lhs - rhs| / max(|lhs|, |rhs|) per channel (0 where both are 0)."""
        scale = torch.maximum(self.lhs.abs(), self.rhs.abs())
        return torch.where(scale > 0, (self.lhs - self.rhs).abs() / scale.clamp_min(1e-300),
                           torch.zeros_like(scale))


_RECORD_ATTR = "_bnext_bn_identity"
_TRACKED_ATTR = "_bnext_bn_identity_tracked"


def _is_batch_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _find_consumer(out: Tensor, inp: Tensor, max_depth: int = 8):
    """The autograd node that consumed `inp` as its first input, searched from out.grad_fn."""
    def is_inp(fn):
        return fn is not None and (fn is inp.grad_fn or getattr(fn, "variable", None) is inp)

    frontier, seen = [out.grad_fn], set()
    for _ in range(max_depth):
        nxt = []
        for node in frontier:
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            fns = node.next_functions
            if fns and is_inp(fns[0][0]):
                return node
            nxt.extend(f for f, _ in fns)
        frontier = nxt
    return None


def _identity_sums(y: Tensor, g_out: Tensor, out: Optional[Tensor], g_in: Tensor, module: nn.Module,
                   name: str) -> BNGradientIdentity:
    dims = [0] + list(range(2, y.dim()))
    C = y.shape[1]
    m = y.numel() // max(C, 1)
    y64 = y.detach().double()
    mu = y64.mean(dims, keepdim=True)
    var = y64.var(dims, unbiased=False, keepdim=True)
    sigma2 = var + module.eps
    yhat = (y64 - mu) / sigma2.sqrt()
    g = g_out.detach().double()
    if out is not None:  # fused ReLU: g = dL/d relu(z) * [z > 0]
        g = g * (out.detach() > 0)
    gamma2 = (module.weight.detach().double() ** 2 if module.weight is not None
              else torch.ones(C, dtype=torch.float64, device=y.device))
    s_gg = (g * g).sum(dims)
    s_g = g.sum(dims)
    s_gy = (g * yhat).sum(dims)
    s_yy = (yhat * yhat).sum(dims)
    s_y = yhat.sum(dims)
    k = gamma2 / sigma2.reshape(-1)
    rhs = k * (s_gg - s_g ** 2 / m - s_gy ** 2 / m * (2 - s_yy / m) + 2 * s_g * s_gy * s_y / m ** 2)
    rhs_paper = k * (s_gg - s_g ** 2 / m - s_gy ** 2 / m)
    lhs = (g_in.detach().double() ** 2).sum(dims)
    return BNGradientIdentity(name, lhs, rhs, rhs_paper, m, k, s_gg)


class BNGradientTracker:
    """Hooks that record Theorem 4.1's two sides for every BatchNorm layer of a model at each
    backward pass; read them with :func:`bn_gradient_identity`. ``remove()`` (or leaving the
    ``with`` block) takes the hooks off.

    How: a forward hook on each BatchNorm module (training mode, or no running statistics, with
    grad enabled) finds the autograd node that consumed the layer's input and registers a node
    hook on it; when the backward reaches that node the hook receives dL/dz (its output gradient)
    and dL/dy (its input gradient), exactly the layer's own contribution, and reduces them per
    channel in float64. Cost when tracking: a few reductions over the layer's input and gradients
    per backward (and a float64 copy of them while reducing); nothing is kept but (C,) vectors.
    A layer whose input does not require grad (e.g. BN directly on data) gets a detached leaf
    input that does, so dL/dy exists. A module called several times keeps its last record. The passes of
    this module's own measurements (ics, line_probe, hessian_*) are not recorded."""

    def __init__(self, model: nn.Module):
        self.handles = []
        for name, mod in model.named_modules():
            if _is_batch_norm(mod):
                self.handles.append(mod.register_forward_pre_hook(self._pre_hook))
                self.handles.append(mod.register_forward_hook(self._make_hook(name)))
                setattr(mod, _TRACKED_ATTR, True)
                self.handles.append(_AttrHandle(mod))

    @staticmethod
    def _active(mod) -> bool:
        return (not _measuring[0] and torch.is_grad_enabled()
                and (mod.training or mod.running_mean is None))

    def _pre_hook(self, mod, args):
        if self._active(mod) and isinstance(args[0], Tensor) and not args[0].requires_grad:
            return (args[0].detach().requires_grad_(True),) + tuple(args[1:])
        return None

    def _make_hook(self, name):
        def hook(mod, args, out):
            if not self._active(mod) or not isinstance(out, Tensor) or out.grad_fn is None:
                return
            y = args[0]
            node = _find_consumer(out, y)
            if node is None:
                return
            relu_out = out if (getattr(mod, "activation", None) == "relu" and node is out.grad_fn) else None
            if getattr(mod, "activation", None) == "relu" and relu_out is None:
                return

            def node_hook(grad_inputs, grad_outputs):
                if grad_inputs[0] is not None and grad_outputs[0] is not None:
                    setattr(mod, _RECORD_ATTR,
                            _identity_sums(y, grad_outputs[0], relu_out, grad_inputs[0], mod, name))
            node.register_hook(node_hook)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class _AttrHandle:
    def __init__(self, mod):
        self.mod = mod

    def remove(self):
        for attr in (_TRACKED_ATTR, _RECORD_ATTR):
            if attr in self.mod.__dict__:
                delattr(self.mod, attr)


def track_bn_gradients(model: nn.Module) -> BNGradientTracker:
    """Starts recording Theorem 4.1 for every BatchNorm layer (torch's or bnext's) of ``model``;
    returns the tracker (``.remove()`` stops it; usable as a context manager). See
    :class:`BNGradientTracker` and :func:`bn_gradient_identity`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"bnext.landscape.track_bn_gradients: model must be a torch.nn.Module, got {type(model).__name__}")
    return BNGradientTracker(model)


def bn_gradient_identity(model: nn.Module) -> Dict[str, BNGradientIdentity]:
    """Theorem 4.1 of the paper, measured at the last backward pass, per BatchNorm layer (by
    qualified name) and channel:

        ||dL/dy||^2  =  (gamma^2 / sigma^2) (||g||^2 - <1,g>^2/m - <g,yhat>^2/m)

    for the layer's input y (m values per channel), g = dL/dz for its output z = gamma*yhat + beta.
    See :class:`BNGradientIdentity` for the exact and the paper's right-hand sides. Requires
    :func:`track_bn_gradients` before the forward pass; layers that were not run in a recorded
    backward (eval mode, no_grad) are absent. Returns {} for a model without BatchNorm layers."""
    bns = [(n, m) for n, m in model.named_modules() if _is_batch_norm(m)]
    if bns and not any(getattr(m, _TRACKED_ATTR, False) for _, m in bns):
        raise RuntimeError("bnext.landscape.bn_gradient_identity: BatchNorm gradients are not being "
                           "recorded; call bnext.landscape.track_bn_gradients(model) before the forward pass")
    return {n: getattr(m, _RECORD_ATTR) for n, m in bns if getattr(m, _RECORD_ATTR, None) is not None}
