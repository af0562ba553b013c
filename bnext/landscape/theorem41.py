"""Theorem 4.1, measured per BatchNorm channel at each recorded backward pass:
||grad_y L||^2 = (gamma^2/sigma^2)(||g||^2 - <1,g>^2/m - <g,yhat>^2/m).

"This module" in the docstrings here is bnext.landscape, whose measurements these hooks ignore.
"""
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from ._core import measuring


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
        return (not measuring() and torch.is_grad_enabled()
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
