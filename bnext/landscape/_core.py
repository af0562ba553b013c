"""The core every measurement stands on: the two loss conventions, one functional evaluation of the
loss at given parameter values, the random generators a forward may draw from, and the evaluation
of loss and gradient at K points, batched with torch.func.vmap or one after another."""
import functools
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

LossFn = Callable[[nn.Module, Any], Tensor]

# > 0 while a measurement runs: BNGradientTracker then ignores the measurement's own passes.
_measuring = [0]


def measurement(fn):
    """Marks fn's passes as a measurement's own (see :func:`measuring`)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _measuring[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _measuring[0] -= 1
    return wrapper


def measuring() -> bool:
    """True inside a measurement, whose forward and backward passes are not the training step's."""
    return _measuring[0] > 0


# -------------------------------------------------------------------------------------------------
# The loss: loss_fn(model, batch) or criterion(model(inputs), targets)
# -------------------------------------------------------------------------------------------------

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
    """The loss as loss_fn(model, batch), from either convention (see the package docstring)."""
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


# -------------------------------------------------------------------------------------------------
# Functional evaluation at given parameter values
# -------------------------------------------------------------------------------------------------

def grads(loss: Tensor, leaves: Sequence[Tensor], **kw) -> List[Tensor]:
    """d loss / d leaves, zeros for leaves the loss does not depend on."""
    gs = torch.autograd.grad(loss, leaves, allow_unused=True, **kw)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, leaves)]


class Model:
    """A model's parameters and buffers by name, and one functional loss evaluation.

    Parameters are numbered in ``named_parameters()`` order; ``trainable`` lists the numbers of
    those with requires_grad, the parameters every measurement differentiates."""

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
        loss = functional_call(self.wrapper, (params, self.fresh_buffers()), (self.batch,))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"{self.op}: loss_fn must return a scalar Tensor, got "
                             f"{type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)}")
        return loss.reshape(())

    def fresh_buffers(self):
        """Copies of the buffers: a pass may update running statistics, the model's own never change."""
        return {n: b.clone() for n, b in self.buffers.items()}

    def detached(self) -> List[Tensor]:
        return [p.detach() for p in self.params]

    def leaves(self, values: List[Tensor], which: Sequence[int]) -> List[Tensor]:
        """Fresh leaves requiring grad for the entries `which` of `values` (replaced in place)."""
        out = []
        for i in which:
            values[i] = values[i].detach().requires_grad_(True)
            out.append(values[i])
        return out

    def loss_and_grads(self, values: Sequence[Tensor], which: Sequence[int]) -> Tuple[Tensor, List[Tensor]]:
        """The loss at `values` and its gradients w.r.t. the entries `which`, all detached."""
        values = list(values)
        leaves = self.leaves(values, which)
        loss = self.loss(values)
        return loss.detach(), [g.detach() for g in grads(loss, leaves)]


class Generators:
    """States of every random generator a forward pass may draw from: the default CPU and CUDA
    generators and any torch.Generator stored on a module. ``initial`` holds the states at
    construction; ``reset()`` returns to them, so that every pass sees the draws of the first,
    and leaving the ``with`` block does too, so that a measurement leaves the generators as it
    found them."""

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
        self.initial = self.get()

    def get(self) -> List[Tensor]:
        return [g.get_state() for g in self.gens]

    def set(self, states: List[Tensor]):
        for g, s in zip(self.gens, states):
            g.set_state(s)

    def reset(self):
        self.set(self.initial)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.reset()

    @staticmethod
    def equal(a: List[Tensor], b: List[Tensor]) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b))


def seeded_generator(like: Tensor, seed: int) -> torch.Generator:
    """A private generator on `like`'s device: a measurement's own draws leave the global ones alone."""
    return torch.Generator(device=like.device).manual_seed(seed)


class BatchStatisticsOnly:
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


# -------------------------------------------------------------------------------------------------
# Loss and gradient at K points: batched (vmap) or sequential
# -------------------------------------------------------------------------------------------------

class Points(NamedTuple):
    """Loss and gradient at K points of the trainable parameters."""
    losses: Tensor          # (K,)
    grads: List[Tensor]     # per trainable parameter, (K, *shape): grads[j][k] at point k
    batched: bool           # True: evaluated together with torch.func.vmap
    fallback_reason: Optional[str]  # why vmap was not used (None when batched or not tried)


def _batched(st: Model, stacked: List[Tensor], chunk_size) -> Tuple[Tensor, List[Tensor]]:
    """One vmap over functional_call with the stacked weights, then one ordinary backward of the
    summed losses: the K losses are independent, so each point gets its own gradient."""
    trainable = set(st.trainable)
    fixed = {st.names[i]: st.params[i].detach() for i in range(len(st.params)) if i not in trainable}
    names = [st.names[i] for i in st.trainable]
    buffers = st.fresh_buffers()

    def one(*point):
        params = dict(fixed)
        params.update(zip(names, point))
        return functional_call(st.wrapper, (params, buffers), (st.batch,)).reshape(())

    leaves = [s.requires_grad_(True) for s in stacked]
    losses = torch.func.vmap(one, randomness="same", chunk_size=chunk_size)(*leaves)
    return losses.detach(), grads(losses.sum(), leaves)


def _sequential(st: Model, gens: Generators, stacked: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
    """One forward and backward per point, each with the generators reset (the draws of vmap's
    randomness="same")."""
    losses, out = [], [torch.empty_like(s) for s in stacked]
    for k in range(stacked[0].shape[0] if stacked else 0):
        values = st.detached()
        for i, s in zip(st.trainable, stacked):
            values[i] = s[k]
        gens.reset()
        loss, gs = st.loss_and_grads(values, st.trainable)
        for o, g in zip(out, gs):
            o[k] = g
        losses.append(loss)
    return torch.stack(losses), out


def evaluate_points(st: Model, gens: Generators, stacked: List[Tensor], mode: str, chunk_size) -> Points:
    """Loss and gradient at the K points ``stacked`` (one (K, *shape) tensor per trainable
    parameter). mode "batched": with vmap, errors propagate; "sequential": a loop; "auto": vmap,
    falling back to the loop (with the reason) when vmap fails on the model. BatchNorm layers
    in train mode must not track running statistics meanwhile (see BatchStatisticsOnly)."""
    if mode != "sequential":
        try:
            gens.reset()
            return Points(*_batched(st, stacked, chunk_size), True, None)
        except Exception as e:  # noqa: BLE001 - any failure of vmap on this model
            if mode == "batched":
                raise
            text = str(e).strip()
            reason = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
            stacked = [s.detach() for s in stacked]
    else:
        reason = None
    return Points(*_sequential(st, gens, stacked), False, reason)
