"""BatchNorm (+ fused ReLU): the functional wrapper bnext.batch_norm, and the fake kernels, double-backward
composite and vmap rules of bnext::batch_norm_forward / batch_norm_backward (kernels in
csrc/cpu/ and csrc/cuda/, autograd in csrc/autograd.cpp)."""
from typing import Optional

import torch
from torch import Tensor

from .checks import _is_batched, check_norm_args, check_running_stats
from .registration import _channel_view, _ops, _reduce_dims, per_channel_outputs_fake, vmap_folding_channels
from .running_stats import update_running_stats

_ACTIVATIONS = (None, "relu")


@torch.library.register_fake("bnext::batch_norm_forward")
def _batch_norm_forward_fake(input, weight, bias, running_mean, running_var, training, eps, relu):
    return per_channel_outputs_fake(input)


@torch.library.register_fake("bnext::batch_norm_backward")
def _batch_norm_backward_fake(grad_out, input, weight, bias, mean, var, training, eps, relu):
    return per_channel_outputs_fake(input)


def batch_norm_backward_reference(grad_out, input, weight, bias, mean, var, training, eps, relu):
    """BatchNorm backward composed of differentiable torch ops: used for double backward
    (Hessian-vector products). Returns (grad_input, grad_weight, grad_bias).

    With xhat = (x - mean) * invstd, g = dy (times the ReLU mask y > 0) and sums over (N, *) of M
    values per channel:
        grad_bias = sum g,  grad_weight = sum g * xhat,
        grad_input = w * invstd * (g - mean(g) - xhat * mean(g * xhat))   (training)
                   = w * invstd * g                                        (eval)
    In training the statistics are recomputed from `input` so that their dependence on the input
    is part of the graph; in eval `mean`/`var` are constants."""
    dims = _reduce_dims(input)
    if training:
        mu = input.mean(dims, keepdim=True)
        v = input.var(dims, unbiased=False, keepdim=True)
    else:
        mu = _channel_view(mean.to(input.dtype), input)
        v = _channel_view(var.to(input.dtype), input)
    invstd = torch.rsqrt(v + eps)
    xhat = (input - mu) * invstd
    w = _channel_view(weight.to(input.dtype), input) if weight is not None else None
    g = grad_out
    if relu:
        y = xhat * w if w is not None else xhat
        if bias is not None:
            y = y + _channel_view(bias.to(input.dtype), input)
        g = grad_out * (~(y <= 0)).to(grad_out.dtype)  # torch's threshold_backward: NaN y passes dy
    grad_bias = g.sum(dims)
    grad_weight = (g * xhat).sum(dims)
    scale = invstd * w if w is not None else invstd
    if training:
        gx = g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True)
    else:
        gx = g
    return gx * scale, grad_weight, grad_bias


# The C++ autograd of batch_norm_forward calls batch_norm_backward, or with create_graph=True this
# composite, so that a second derivative (Hessian-vector products) flows through differentiable
# torch ops.
@torch.library.impl("bnext::batch_norm_backward_composite", "CompositeImplicitAutograd")
def _batch_norm_backward_composite(grad_out, input, weight, bias, mean, var, training, eps, relu):
    return batch_norm_backward_reference(grad_out, input, weight, bias, mean, var, training, eps, relu)


@torch.library.register_vmap("bnext::batch_norm_forward")
def _batch_norm_forward_vmap(info, in_dims, input, weight, bias, running_mean, running_var,
                             training, eps, relu):
    return vmap_folding_channels(_ops.batch_norm_forward, info, in_dims,
                                 (input, weight, bias, running_mean, running_var, training, eps, relu),
                                 inputs=(0,), channels=(1, 2, 3, 4))


@torch.library.register_vmap("bnext::batch_norm_backward")
def _batch_norm_backward_vmap(info, in_dims, grad_out, input, weight, bias, mean, var,
                              training, eps, relu):
    return vmap_folding_channels(_ops.batch_norm_backward, info, in_dims,
                                 (grad_out, input, weight, bias, mean, var, training, eps, relu),
                                 inputs=(0, 1), channels=(2, 3, 4, 5))


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
               activation: Optional[str] = None) -> Tensor:
    """Fused BatchNorm, same arguments and meaning as torch.nn.functional.batch_norm, plus
    ``activation in (None, "relu")`` applied in the same pass.

    y = act((x - mean) / sqrt(var + eps) * weight + bias), statistics per channel over (N, *).
    training=True: batch statistics (biased variance), and running stats, when given, are updated
    in place: running = (1 - momentum) * running + momentum * batch (unbiased variance).
    training=False: running statistics (both required).
    """
    op = "bnext.batch_norm"
    check_norm_args(op, input, {"running_mean": running_mean, "running_var": running_var,
                                "weight": weight, "bias": bias}, eps, momentum)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{op}: activation must be None or 'relu', got {activation!r}")
    count = check_running_stats(op, input, running_mean, running_var, "running_var", training)
    out, mean, var = _ops.batch_norm_forward(
        input, weight, bias, running_mean, running_var, bool(training), float(eps), activation == "relu")
    if training and count > 0:  # an empty batch leaves the running stats alone, as in torch
        update_running_stats(op, running_mean, running_var, mean, var, count, float(momentum),
                             _is_batched(input, weight, bias, running_mean, running_var))
    return out
