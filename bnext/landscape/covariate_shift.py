"""Internal covariate shift, Definition 2.1: per layer, the gradient of its weight before and after
the earlier layers took the update, on the same batch.

"The module docstring" of the functions here is bnext.landscape's: the loss conventions, what "the
parameters" are, and how a measurement leaves no trace.
"""
import copy
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ..ops import cosine, grad_stats
from ._call_tracer import CacheModified, CallSequenceChanged, CallTracer, FirstUse, StopForward, first_uses
from ._core import Generators, LossFn, Model, grads, measurement

#: Modules that count as "layers" for ics() by default.
LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class LayerICS:
    """ICS of one layer (Definition 2.1): G = dL/dW_i at the current parameters, G' = dL/dW_i
    after the parameters of layers 1..i-1 took the update, same batch."""
    name: str            # qualified module name
    l2: float            # ||G - G'||_2  (ideal 0)
    cosine: float        # cos(G, G')    (ideal 1; 1 when G = G' = 0, 0 when exactly one is 0)
    grad_norm: float     # ||G||_2
    grad_norm_after: float  # ||G'||_2


class Layer(NamedTuple):
    """One layer i of Definition 2.1 as ics() measures it."""
    name: str                # qualified module name
    module: nn.Module
    call: int                # index of the module's first call in the forward
    weight: int              # index of its weight among the model's parameters
    prefix: FrozenSet[int]   # the trainable parameters updated for G': first used before `call`, not its own
    tied: bool               # one of its own trainable parameters is used before `call`


class Step(NamedTuple):
    """The parameters before and after the update, and the gradient G that made it."""
    current: List[Tensor]     # every parameter, now
    updated: List[Tensor]     # every parameter after the update (those not trained: as now)
    grad: Dict[int, Tensor]   # G of every trainable parameter, by its index

    def point(self, prefix: FrozenSet[int]) -> List[Tensor]:
        """The parameters with those in `prefix` updated, the others as now."""
        return [self.updated[i] if i in prefix else v for i, v in enumerate(self.current)]


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


def _chosen_modules(op: str, model: nn.Module, layers, tracer: CallTracer, st: Model) -> List[nn.Module]:
    """The modules `layers` names (all Conv/Linear the forward calls, by default), checked."""
    if layers is None:
        return [m for m in dict.fromkeys(tracer.seq) if isinstance(m, LAYER_TYPES)
                and isinstance(getattr(m, "weight", None), Tensor) and m.weight.requires_grad]
    names = {id(m): n for n, m in model.named_modules()}
    by_name = dict(model.named_modules())
    param_ids = {id(p) for p in st.params}
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
        if not isinstance(w, Tensor) or id(w) not in param_ids or not w.requires_grad:
            raise ValueError(f"{op}: layer {names[id(l)]!r} has no trainable parameter 'weight'")
        if tracer.first_call(l) is None:
            raise ValueError(f"{op}: layer {names[id(l)]!r} is not called by loss_fn(model, batch)")
        chosen.append(l)
    return list(dict.fromkeys(chosen))


def _resolve_layers(op: str, model: nn.Module, layers, tracer: CallTracer, st: Model,
                    first_use: Dict[int, int]) -> List[Layer]:
    """The layers to measure in forward order, each with the parameters its G' updates."""
    names = {id(m): n for n, m in model.named_modules()}
    param_index = {id(p): i for i, p in enumerate(st.params)}
    out = []
    for m in _chosen_modules(op, model, layers, tracer, st):
        call, own = tracer.first_call(m), {id(p) for p in m.parameters()}
        before = [i for i in st.trainable if first_use.get(i, math.inf) <= call]
        out.append(Layer(names[id(m)], m, call, param_index[id(m.weight)],
                         frozenset(i for i in before if id(st.params[i]) not in own),
                         any(id(st.params[i]) in own for i in before)))
    return sorted(out, key=lambda layer: layer.call)


def _reference_pass(st: Model, tracer: CallTracer):
    """G for every trainable parameter, recording the module calls and every parameter's first use."""
    values = st.detached()
    leaves = st.leaves(values, st.trainable)
    watch = FirstUse(tracer, {id(values[i]): i for i in range(len(values))})
    st.wrapper.context = lambda: watch
    try:
        loss = st.loss(values)
    finally:
        st.wrapper.context = None
    return [g.detach() for g in grads(loss, leaves)], watch.first


def _updated(op: str, st: Model, G: List[Tensor], lr: Optional[float], optimizer) -> Step:
    current = st.detached()
    trained = [current[i] for i in st.trainable]
    if lr is not None:
        stepped = _sgd_update(trained, G, float(lr))
    else:
        stepped = _optimizer_update(op, optimizer, [st.params[i] for i in st.trainable], G)
    updated = list(current)
    for i, v in zip(st.trainable, stepped):
        updated[i] = v
    return Step(current, updated, dict(zip(st.trainable, G)))


def _scheme_for(op: str, scheme: str, layers: List[Layer]) -> str:
    """The scheme to run: shared_prefix cannot serve a layer whose own parameter is used before
    the layer is called (tied weights), since that parameter's use lies in the shared prefix."""
    tied = any(layer.tied for layer in layers)
    if tied and scheme == "shared_prefix":
        raise ValueError(f"{op}: scheme='shared_prefix' cannot handle a layer whose own parameter "
                         "is used before the layer is called (tied weights); use 'naive' or 'auto'")
    if scheme != "auto":
        return scheme
    if tied:
        warnings.warn(f"{op}: a layer's own parameter is used before the layer is called "
                      "(tied weights); using the naive scheme", stacklevel=3)
        return "naive"
    return "shared_prefix"


@measurement
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
    st = Model(op, model, loss_fn, batch, criterion)
    with Generators(model) as gens, CallTracer(model, gens) as tracer:
        G, seen = _reference_pass(st, tracer)
        chosen = _resolve_layers(op, model, layers, tracer, st, first_uses(model, st, tracer, seen))
        if not chosen:
            return []
        step = _updated(op, st, G, lr, optimizer)
        use = _scheme_for(op, scheme, chosen)
        G_after = None
        if use == "shared_prefix":
            try:
                G_after = _ics_shared_prefix(st, tracer, chosen, step)
            except CallSequenceChanged as e:
                if scheme != "auto":
                    raise RuntimeError(f"{op}: scheme='shared_prefix' needs the same module calls in "
                                       f"every forward pass ({e})") from None
                warnings.warn(f"{op}: the model's module calls change between passes ({e}); "
                              "using the naive scheme", stacklevel=2)
        if G_after is None:
            G_after = _ics_naive(st, tracer, chosen, step)
    stats = grad_stats([step.grad[layer.weight] for layer in chosen], G_after)
    cos = cosine(stats)
    return [LayerICS(layer.name, math.sqrt(max(float(s[2]), 0.0)), float(c), math.sqrt(float(s[0])),
                     math.sqrt(float(s[1])))
            for layer, s, c in zip(chosen, stats, cos)]


def _g_after(st: Model, layer: Layer, step: Step) -> Tensor:
    """G' of one layer: the gradient of its weight with its prefix updated."""
    return st.loss_and_grads(step.point(layer.prefix), [layer.weight])[1][0]


def _ics_naive(st: Model, tracer: CallTracer, layers: List[Layer], step: Step) -> List[Tensor]:
    out = []
    tracer.start(passive=True)
    for layer in layers:
        if not layer.prefix:
            out.append(step.grad[layer.weight])
            continue
        tracer.gens.reset()
        out.append(_g_after(st, layer, step))
    return out


def _ics_shared_prefix(st: Model, tracer: CallTracer, layers: List[Layer], step: Step) -> List[Tensor]:
    """cache[j] = output of call j, valid for every later layer: calls that completed before the
    current layer's first call, computed with the prefix parameters updated. Advancing from layer
    i to i+1 runs the calls between them (under no_grad) with prefix(i+1) updated and stops at
    layer i+1's call. If the model modifies a cached output in place, the sweep starts over
    serving copies of the cached outputs."""
    # Looked up on the package when called, so that bnext.landscape._shared_prefix_sweep, if
    # replaced there (to watch the restart), is what runs.
    from . import _shared_prefix_sweep as sweep
    try:
        return sweep(st, tracer, layers, step)
    except CacheModified:
        tracer.copy_outputs = True
        return sweep(st, tracer, layers, step)


def _shared_prefix_sweep(st: Model, tracer: CallTracer, layers: List[Layer], step: Step) -> List[Tensor]:
    out, cache = [], {}
    for layer, following in zip(layers, layers[1:] + [None]):
        if not layer.prefix:
            out.append(step.grad[layer.weight])
        else:
            tracer.start(cache=cache)
            out.append(_g_after(st, layer, step))
        if following is not None:
            tracer.start(cache=cache, stop_at=following.call, record=True)
            try:
                with torch.no_grad():
                    st.loss(step.point(following.prefix))
            except StopForward:
                pass
            else:
                raise CallSequenceChanged(f"call {following.call} was not reached")
            cache.update(tracer.recorded_entries())
    return out
