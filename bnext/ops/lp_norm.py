"""l_p normalization, p in {1, 2, inf} (csrc/common/lp_norm_math.h): the functional wrapper
bnext.lp_norm, its torch-op reference, and the fake kernels, double-backward composite and vmap rules
of bnext::lp_norm_forward / lp_norm_backward (autograd in csrc/autograd.cpp)."""
import math
from typing import Optional

import torch
from torch import Tensor

from .checks import _is_batched, check_norm_args, check_running_stats
from .registration import (_channel_view, _ops, _reduce_dims, per_channel_outputs_fake,
                           vmap_folding_channels)
from .running_stats import update_running_stats

_P_VALUES = (1.0, 2.0, math.inf)


@torch.library.register_fake("bnext::lp_norm_forward")
def _lp_forward_fake(input, p, weight, bias, running_mean, running_norm, training, eps):
    return (*per_channel_outputs_fake(input), input.new_empty((input.shape[1],), dtype=torch.int64))


@torch.library.register_fake("bnext::lp_norm_backward")
def _lp_backward_fake(grad_out, input, p, weight, bias, mean, norm, argmax, training, eps):
    return per_channel_outputs_fake(input)


def _lp_norm_of(x: Tensor, p: float, argmax: Optional[Tensor]) -> Tensor:
    """N_p per channel (shape (1, C, 1...)), differentiably, with the kernel's subgradient for
    p = inf: the max is read at the saved arg-max position (first in logical NCHW order)."""
    dims = _reduce_dims(x)
    if p == 1:
        return x.abs().mean(dims, keepdim=True)
    if p == 2:
        return x.square().mean(dims, keepdim=True).sqrt()
    flat = x.movedim(1, 0).reshape(x.shape[1], -1)  # (C, M), position n * S + s
    if argmax is None:
        argmax = flat.abs().argmax(1)  # torch.argmax returns the first maximal index
    return _channel_view(flat.abs().gather(1, argmax.view(-1, 1)).view(-1), x)


def lp_norm_reference(input, p, weight, bias, mean, norm, argmax, training, eps):
    """l_p normalization composed of torch ops (differentiable; the double-backward path and the
    tests' reference). Training recomputes the statistics from `input`; eval uses mean/norm."""
    dims = _reduce_dims(input)
    if training:
        mu = input.mean(dims, keepdim=True)
        n = _lp_norm_of(input, p, argmax)
    else:
        mu = _channel_view(mean.to(input.dtype), input)
        n = _channel_view(norm.to(input.dtype), input)
    y = (input - mu) / (n + eps)
    if weight is not None:
        y = y * _channel_view(weight.to(input.dtype), input)
    if bias is not None:
        y = y + _channel_view(bias.to(input.dtype), input)
    return y


@torch.library.impl("bnext::lp_norm_backward_composite", "CompositeImplicitAutograd")
def _lp_norm_backward_composite(grad_out, input, p, weight, bias, mean, norm, argmax, training, eps):
    """Double backward of lp_norm_forward (its C++ autograd calls this when create_graph=True): the
    composite built on the saved tensors themselves, differentiated with create_graph, so the outer
    graph sees the first derivative as a function of them. An empty tensor stands for a gradient
    nobody asked for (the C++ side drops it)."""
    y = lp_norm_reference(input, p, weight, bias, mean, norm, argmax if p == math.inf else None, training, eps)
    wanted = [t is not None and t.requires_grad for t in (input, weight, bias)]
    wrt = [t for t, w in zip((input, weight, bias), wanted) if w]
    it = iter(torch.autograd.grad(y, wrt, grad_out, create_graph=True, allow_unused=True) if wrt else [])
    grads = [next(it) if w else None for w in wanted]
    return tuple(g if g is not None else input.new_empty((0,)) for g in grads)


@torch.library.register_vmap("bnext::lp_norm_forward")
def _lp_forward_vmap(info, in_dims, input, p, weight, bias, running_mean, running_norm, training, eps):
    return vmap_folding_channels(_ops.lp_norm_forward, info, in_dims,
                                 (input, p, weight, bias, running_mean, running_norm, training, eps),
                                 inputs=(0,), channels=(2, 3, 4, 5))


@torch.library.register_vmap("bnext::lp_norm_backward")
def _lp_backward_vmap(info, in_dims, grad_out, input, p, weight, bias, mean, norm, argmax, training, eps):
    return vmap_folding_channels(_ops.lp_norm_backward, info, in_dims,
                                 (grad_out, input, p, weight, bias, mean, norm, argmax, training, eps),
                                 inputs=(0, 1), channels=(3, 4, 5, 6, 7))


def check_p(op: str, p) -> float:
    """p as a float in (1.0, 2.0, inf); accepts 1, 2, inf (numbers) and "inf"."""
    if isinstance(p, str) and p.lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(p, bool) or not isinstance(p, (int, float)) or float(p) not in _P_VALUES:
        raise ValueError(f"{op}: p must be 1, 2 or inf (math.inf), got {p!r}")
    return float(p)


def lp_norm(input: Tensor, p, running_mean: Optional[Tensor], running_norm: Optional[Tensor],
            weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
            momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """l_p normalization per channel over (N, *), p in {1, 2, inf}:

        z = weight * (x - mean(x)) / (N_p(x) + eps) + bias,
        N_1 = mean |x|,  N_2 = sqrt(mean x^2),  N_inf = max |x|   (the norm of x BEFORE centering).

    training=True: batch statistics; running_mean/running_norm (when given) are updated in place,
    running = (1 - momentum) * running + momentum * batch (the norm as it is, no correction).
    training=False: the running statistics (both required).
    Gradients are exact; subgradients: sign(0) = 0 for p = 1; an all-zero channel has zero norm
    gradient for p = 2; for p = inf the gradient of max |x| goes entirely to ONE element, the
    first arg-max in logical NCHW order (smallest n, then smallest spatial index).
    One statistics pass and one elementwise pass forward; the same backward.
    """
    op = "bnext.lp_norm"
    check_norm_args(op, input, {"running_mean": running_mean, "running_norm": running_norm,
                                "weight": weight, "bias": bias}, eps, momentum)
    p = check_p(op, p)
    count = check_running_stats(op, input, running_mean, running_norm, "running_norm", training)
    out, mean, norm, _argmax = _ops.lp_norm_forward(
        input, p, weight, bias, running_mean, running_norm, bool(training), float(eps))
    if training and count > 0:
        update_running_stats(op, running_mean, running_norm, mean, norm, count, float(momentum),
                             _is_batched(input, weight, bias, running_mean, running_norm), bessel=False)
    return out
