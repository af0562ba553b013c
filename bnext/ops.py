"""Registration of bnext's operators with torch.library (fake kernels, autograd, vmap) and the
functional API. Schemas and CPU/CUDA kernels live in csrc/ (csrc/registration.cpp)."""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the operator library)

_ops = torch.ops.bnext

_ACTIVATIONS = (None, "relu")


# -------------------------------------------------------------------------------------------------
# Shared helpers
# -------------------------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_in_kernel_layout(x: Tensor) -> Tensor:
    """An empty tensor with the strides the kernels give their outputs (see csrc/layout.h):
    NCHW-contiguous input -> contiguous, channels-last-dense input -> channels-last, else contiguous."""
    if x.is_contiguous():
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.movedim(1, -1).is_contiguous():
        return torch.empty(x.movedim(1, -1).shape, dtype=x.dtype, device=x.device).movedim(-1, 1)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _reduce_dims(x: Tensor):
    return [0] + list(range(2, x.dim()))


def _channel_view(v: Tensor, x: Tensor) -> Tensor:
    return v.view([1, -1] + [1] * (x.dim() - 2))


# -------------------------------------------------------------------------------------------------
# batch_norm_forward / batch_norm_backward
# -------------------------------------------------------------------------------------------------

@torch.library.register_fake("bnext::batch_norm_forward")
def _batch_norm_forward_fake(input, weight, bias, running_mean, running_var, training, eps, relu):
    acc = _acc_dtype(input.dtype)
    C = input.shape[1]
    stats = input.new_empty((C,), dtype=acc)
    return _empty_in_kernel_layout(input), stats, stats.new_empty((C,))


@torch.library.register_fake("bnext::batch_norm_backward")
def _batch_norm_backward_fake(grad_out, input, weight, bias, mean, var, training, eps, relu):
    acc = _acc_dtype(input.dtype)
    C = input.shape[1]
    sums = input.new_empty((C,), dtype=acc)
    return _empty_in_kernel_layout(input), sums, sums.new_empty((C,))


def batch_norm_backward_reference(grad_out, input, weight, bias, mean, var, training, eps, relu):
    """BatchNorm backward composed of differentiable torch ops: used for double backward
    (Hessian-vector products). Returns (grad_input, grad_weight, grad_bias).

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


# Autograd of batch_norm_forward is registered in C++ (csrc/autograd.cpp); its backward calls
# batch_norm_backward, or with create_graph=True this composite, so that a second derivative
# (Hessian-vector products) flows through differentiable torch ops.
@torch.library.impl("bnext::batch_norm_backward_composite", "CompositeImplicitAutograd")
def _batch_norm_backward_composite(grad_out, input, weight, bias, mean, var, training, eps, relu):
    return batch_norm_backward_reference(grad_out, input, weight, bias, mean, var, training, eps, relu)


# --- vmap: fold the vmapped dimension into the channel dimension ---------------------------------
# A BatchNorm over B independent problems of C channels is one BatchNorm over B*C channels, so the
# batching rule is a reshape, not a loop.

def _fold_input(x: Optional[Tensor], bdim: Optional[int], B: int) -> Optional[Tensor]:
    if x is None:
        return None
    x = x.movedim(bdim, 0) if bdim is not None else x.unsqueeze(0).expand(B, *x.shape)
    x = x.movedim(0, 1)  # (N, B, C, *)
    return x.reshape(x.shape[0], B * x.shape[2], *x.shape[3:])


def _fold_channel(v: Optional[Tensor], bdim: Optional[int], B: int, C: int) -> Optional[Tensor]:
    if v is None:
        return None
    v = v.movedim(bdim, 0) if bdim is not None else v.unsqueeze(0).expand(B, C)
    return v.reshape(B * C)


def _unfold_input(y: Tensor, B: int) -> Tensor:
    return y.reshape(y.shape[0], B, y.shape[1] // B, *y.shape[2:])  # batch dim 1


@torch.library.register_vmap("bnext::batch_norm_forward")
def _batch_norm_forward_vmap(info, in_dims, input, weight, bias, running_mean, running_var,
                             training, eps, relu):
    B = info.batch_size
    x = _fold_input(input, in_dims[0], B)
    C = x.shape[1] // B
    out, mean, var = _ops.batch_norm_forward(
        x, _fold_channel(weight, in_dims[1], B, C), _fold_channel(bias, in_dims[2], B, C),
        _fold_channel(running_mean, in_dims[3], B, C), _fold_channel(running_var, in_dims[4], B, C),
        training, eps, relu)
    return (_unfold_input(out, B), mean.view(B, C), var.view(B, C)), (1, 0, 0)


@torch.library.register_vmap("bnext::batch_norm_backward")
def _batch_norm_backward_vmap(info, in_dims, grad_out, input, weight, bias, mean, var,
                              training, eps, relu):
    B = info.batch_size
    x = _fold_input(input, in_dims[1], B)
    C = x.shape[1] // B
    dx, s_dy, s_dy_xhat = _ops.batch_norm_backward(
        _fold_input(grad_out, in_dims[0], B), x, _fold_channel(weight, in_dims[2], B, C),
        _fold_channel(bias, in_dims[3], B, C), _fold_channel(mean, in_dims[4], B, C),
        _fold_channel(var, in_dims[5], B, C), training, eps, relu)
    return (_unfold_input(dx, B), s_dy.view(B, C), s_dy_xhat.view(B, C)), (1, 0, 0)


# -------------------------------------------------------------------------------------------------
# Argument checking (one place for every normalization op)
# -------------------------------------------------------------------------------------------------

_is_batchedtensor = getattr(torch._C._functorch, "is_batchedtensor", None)


def _is_batched(*tensors) -> bool:
    if _is_batchedtensor is None:
        return False
    for t in tensors:
        if t is not None and isinstance(t, Tensor) and _is_batchedtensor(t):
            return True
    return False


_INPUT_DTYPES = frozenset((torch.float64, torch.float32, torch.float16, torch.bfloat16))
_REDUCED_DTYPES = frozenset((torch.float16, torch.bfloat16))


def check_input_tensor(op: str, input):
    """input must be a float Tensor of shape (N, C, *) with 0 to 3 spatial dims."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}: input must be a Tensor, got {type(input).__name__}")
    dim = input.dim()
    if dim < 2 or dim > 5:
        raise ValueError(f"{op}: input must have shape (N, C, *) with 0 to 3 spatial dims, "
                         f"got a {input.dim()}-d tensor of shape {tuple(input.shape)}")
    if input.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{op}: input must be float64, float32, float16 or bfloat16, got {input.dtype}")


def check_norm_args(op: str, input, channel_args: dict, eps, momentum):
    """Validates the arguments shared by the normalization ops; raises TypeError/ValueError naming
    the offending argument. Called on every forward, so each check touches as few tensor attributes
    as it can (a Tensor attribute costs 40-100 ns from Python; small layers run in ~10 us)."""
    check_input_tensor(op, input)
    shape = (input.shape[1],)
    dtype = input.dtype
    input_cpu = input.is_cpu
    for name, t in channel_args.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.shape != shape:
            raise ValueError(f"{op}: {name} must have shape ({shape[0]},) (one value per channel of input "
                             f"{tuple(input.shape)}), got {tuple(t.shape)}")
        if not (input_cpu and t.is_cpu) and t.device != input.device:
            raise ValueError(f"{op}: {name} is on {t.device} but input is on {input.device}")
        t_dtype = t.dtype
        if t_dtype is not dtype and not (t_dtype is torch.float32 and dtype in _REDUCED_DTYPES):
            allowed = (dtype,) if dtype not in _REDUCED_DTYPES else (dtype, torch.float32)
            raise TypeError(f"{op}: {name} must have dtype {' or '.join(map(str, allowed))} "
                            f"to match input ({dtype}), got {t_dtype}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(momentum, (int, float)) or not (0.0 <= momentum <= 1.0):
        raise ValueError(f"{op}: momentum must be a number in [0, 1], got {momentum!r}")


def update_running_stats(op: str, running_mean, running_var, mean, var, count: int, momentum: float,
                         batched: bool, bessel: bool = True):
    """running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance, as
    torch.nn.functional.batch_norm does (bessel=False: the second statistic is taken as it is, e.g.
    the l_p norm of lp_norm)."""
    if running_mean is None and running_var is None:
        return
    if batched:
        raise RuntimeError(
            f"{op}: cannot update running_mean/{'running_var' if bessel else 'running_norm'} inside torch.func.vmap (each vmapped "
            "problem would write the same buffers). Use eval mode, pass running_mean=None and "
            "running_var=None, or a module with track_running_stats=False.")
    factor = count / (count - 1) if bessel else 1.0
    if running_mean is not None and running_var is not None:
        # One C++ call (csrc/running_stats.cpp) instead of six tensor ops: this update was a third
        # of the wrapper's time on small inputs.
        if mean.requires_grad or var.requires_grad:  # statistics of bnext.distributed's autograd functions
            mean, var = mean.detach(), var.detach()
        _ops.update_running_stats(running_mean, running_var, mean, var, momentum, factor)
        return
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            running_var.mul_(1.0 - momentum).add_((var * factor).to(running_var.dtype), alpha=momentum)


@torch.library.register_fake("bnext::update_running_stats")
def _update_running_stats_fake(running_mean, running_var, mean, var, momentum, var_correction):
    return None


# -------------------------------------------------------------------------------------------------
# Public functional API
# -------------------------------------------------------------------------------------------------

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
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must both be given or both be None")
    count = input.numel() // max(input.shape[1], 1)
    if training and count == 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, "
                         f"got input of shape {tuple(input.shape)}")
    if not training and running_mean is None:
        raise ValueError(f"{op}: running_mean and running_var are required when training=False")
    out, mean, var = _ops.batch_norm_forward(
        input, weight, bias, running_mean, running_var, bool(training), float(eps), activation == "relu")
    if training and count > 0:  # an empty batch leaves the running stats alone, as in torch
        update_running_stats(op, running_mean, running_var, mean, var, count, float(momentum),
                             _is_batched(input, weight, bias, running_mean, running_var))
    return out


# -------------------------------------------------------------------------------------------------
# Noisy BatchNorm (bnext/experiments/PROTOCOL.md, "Noisy BatchNorm"): BatchNorm, then s * a + m with noise drawn in the kernel
# from a counter-based generator (csrc/common/noise.h). Nothing input-sized is saved for backward:
# the kernel regenerates s from the seed.
# -------------------------------------------------------------------------------------------------

def _noise_list(noise_mean, noise_std, noise_mean_spread, noise_std_spread):
    return [float(noise_mean), float(noise_std), float(noise_mean_spread), float(noise_std_spread)]


@torch.library.register_fake("bnext::noisy_batch_norm_forward")
def _noisy_bn_forward_fake(input, weight, bias, eps, seed, noise, noise_channels):
    acc = _acc_dtype(input.dtype)
    C = input.shape[1]
    stats = input.new_empty((C,), dtype=acc)
    return _empty_in_kernel_layout(input), stats, stats.new_empty((C,))


@torch.library.register_fake("bnext::noisy_batch_norm_backward")
def _noisy_bn_backward_fake(grad_out, input, weight, bias, mean, var, eps, seed, noise, noise_channels):
    acc = _acc_dtype(input.dtype)
    C = input.shape[1]
    sums = input.new_empty((C,), dtype=acc)
    return _empty_in_kernel_layout(input), sums, sums.new_empty((C,))


def noisy_batch_norm_noise(input: Tensor, seed: Tensor, noise, noise_channels: Optional[int] = None):
    """The noise (s, m) a noisy_batch_norm_forward call with this seed applies to an input shaped like
    `input`, materialized (input-sized, dtype of input): for tests and for the double-backward
    composite. Computed by the kernel itself on a = bias (weight 0): m from bias 0, s from bias 1."""
    C = input.shape[1]
    nc = C if noise_channels is None else noise_channels
    z = torch.zeros_like(input, memory_format=torch.contiguous_format)
    zeros = torch.zeros(C, dtype=_acc_dtype(input.dtype) if input.dtype != torch.float64 else input.dtype,
                        device=input.device)
    if input.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
        zeros = zeros.float()
    m = _ops.noisy_batch_norm_forward(z, zeros, zeros, 1.0, seed, list(noise), nc)[0]
    sm = _ops.noisy_batch_norm_forward(z, zeros, zeros + 1, 1.0, seed, list(noise), nc)[0]
    return (sm - m).to(input.dtype), m.to(input.dtype)


@torch.library.impl("bnext::noisy_batch_norm_backward_composite", "CompositeImplicitAutograd")
def _noisy_batch_norm_backward_composite(grad_out, input, weight, bias, mean, var, eps, seed, noise, noise_channels):
    """Double backward of noisy_batch_norm_forward (its C++ autograd calls this when create_graph=True):
    BatchNorm's composite with g = grad_out * s, s materialized here only."""
    s, _m = noisy_batch_norm_noise(input.detach(), seed, noise, noise_channels)
    return batch_norm_backward_reference(grad_out * s, input, weight, bias, mean, var, True, eps, False)


def _check_unbatched_seed(op, seed_dim):
    if seed_dim is not None:
        raise RuntimeError(
            f"{op}: the noise seed is batched under torch.func.vmap (randomness='different'); use "
            "randomness='same' (every vmapped problem gets the noise it would get alone)")


@torch.library.register_vmap("bnext::noisy_batch_norm_forward")
def _noisy_bn_forward_vmap(info, in_dims, input, weight, bias, eps, seed, noise, noise_channels):
    _check_unbatched_seed("bnext.noisy_batch_norm", in_dims[4])
    B = info.batch_size
    x = _fold_input(input, in_dims[0], B)
    C = x.shape[1] // B
    out, mean, var = _ops.noisy_batch_norm_forward(
        x, _fold_channel(weight, in_dims[1], B, C), _fold_channel(bias, in_dims[2], B, C), eps, seed, noise,
        noise_channels)
    return (_unfold_input(out, B), mean.view(B, C), var.view(B, C)), (1, 0, 0)


@torch.library.register_vmap("bnext::noisy_batch_norm_backward")
def _noisy_bn_backward_vmap(info, in_dims, grad_out, input, weight, bias, mean, var, eps, seed, noise,
                            noise_channels):
    _check_unbatched_seed("bnext.noisy_batch_norm", in_dims[7])
    B = info.batch_size
    x = _fold_input(input, in_dims[1], B)
    C = x.shape[1] // B
    dx, s_dy, s_dy_xhat = _ops.noisy_batch_norm_backward(
        _fold_input(grad_out, in_dims[0], B), x, _fold_channel(weight, in_dims[2], B, C),
        _fold_channel(bias, in_dims[3], B, C), _fold_channel(mean, in_dims[4], B, C),
        _fold_channel(var, in_dims[5], B, C), eps, seed, noise, noise_channels)
    return (_unfold_input(dx, B), s_dy.view(B, C), s_dy_xhat.view(B, C)), (1, 0, 0)


def draw_seed(generator: Optional[torch.Generator] = None) -> Tensor:
    """A 0-d int64 CPU tensor of 62 random bits from `generator` (default: torch's default CPU
    generator), the key of the noise of one noisy_batch_norm call. Advances the generator, so
    torch.manual_seed reproduces the sequence of noises, whatever device the input is on.
    (Under torch.compile the compiled graph draws it with its own random-number generator.)"""
    if generator is None:
        return torch.randint(0, 2 ** 62, (), dtype=torch.int64)
    return torch.randint(0, 2 ** 62, (), dtype=torch.int64, generator=generator, device=generator.device).cpu()


def _check_noise_args(op, noise_mean, noise_std, noise_mean_spread, noise_std_spread):
    for name, v in (("noise_mean", noise_mean), ("noise_std", noise_std),
                    ("noise_mean_spread", noise_mean_spread), ("noise_std_spread", noise_std_spread)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{op}: {name} must be a finite number >= 0, got {v!r}")
    if noise_std < 1:
        raise ValueError(f"{op}: noise_std must be >= 1 (sigma ~ U(1, noise_std)), got {noise_std!r}")


def noisy_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                     training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                     noise_mean: float = 0.5, noise_std: float = 1.25, noise_mean_spread: float = 0.1,
                     noise_std_spread: float = 0.1,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """"Noisy" BatchNorm, the paper's Algorithm 1, fused into the BatchNorm kernels.

    training=True: a = BatchNorm(input) with batch statistics and the affine weight/bias (running
    stats updated as in :func:`batch_norm`), then, drawn afresh at every call, per channel
    mu_c ~ U(-noise_mean, noise_mean) and sigma_c ~ U(1, noise_std), and per element
    m ~ U(mu_c - noise_mean_spread, mu_c + noise_mean_spread) and s ~ N(sigma_c, noise_std_spread)
    (a standard deviation); the output is s * a + m.
    training=False: plain BatchNorm with the running statistics (no noise).

    The noise is generated inside the kernel by Philox4x32-10 keyed with a 64-bit seed drawn from
    ``generator`` (default: torch's default CPU generator, for CUDA inputs too), indexed by the
    element's logical NCHW position: torch.manual_seed reproduces it, and the same seed gives the
    same noise on CPU and CUDA and in both memory layouts. Backward regenerates s (nothing
    input-sized is kept) and is exact for the sampled noise. Under torch.func.vmap use
    randomness="same": every vmapped problem then gets the noise it would get alone.
    """
    op = "bnext.noisy_batch_norm"
    check_norm_args(op, input, {"running_mean": running_mean, "running_var": running_var,
                                "weight": weight, "bias": bias}, eps, momentum)
    _check_noise_args(op, noise_mean, noise_std, noise_mean_spread, noise_std_spread)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must both be given or both be None")
    if not training:
        if running_mean is None:
            raise ValueError(f"{op}: running_mean and running_var are required when training=False")
        return _ops.batch_norm_forward(input, weight, bias, running_mean, running_var, False, float(eps), False)[0]
    count = input.numel() // max(input.shape[1], 1)
    if count == 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, "
                         f"got input of shape {tuple(input.shape)}")
    seed = draw_seed(generator)
    noise = _noise_list(noise_mean, noise_std, noise_mean_spread, noise_std_spread)
    out, mean, var = _ops.noisy_batch_norm_forward(input, weight, bias, float(eps), seed, noise, input.shape[1])
    if count > 0:
        update_running_stats(op, running_mean, running_var, mean, var, count, float(momentum),
                             _is_batched(input, weight, bias, running_mean, running_var))
    return out


# -------------------------------------------------------------------------------------------------
# l_p normalization, p in {1, 2, inf} (csrc/common/lp_norm_math.h)
# -------------------------------------------------------------------------------------------------

_P_VALUES = (1.0, 2.0, math.inf)


@torch.library.register_fake("bnext::lp_norm_forward")
def _lp_forward_fake(input, p, weight, bias, running_mean, running_norm, training, eps):
    acc = _acc_dtype(input.dtype)
    C = input.shape[1]
    stats = input.new_empty((C,), dtype=acc)
    return (_empty_in_kernel_layout(input), stats, stats.new_empty((C,)),
            input.new_empty((C,), dtype=torch.int64))


@torch.library.register_fake("bnext::lp_norm_backward")
def _lp_backward_fake(grad_out, input, p, weight, bias, mean, norm, argmax, training, eps):
    acc = _acc_dtype(input.dtype)
    C = input.shape[1]
    sums = input.new_empty((C,), dtype=acc)
    return _empty_in_kernel_layout(input), sums, sums.new_empty((C,))


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
    B = info.batch_size
    x = _fold_input(input, in_dims[0], B)
    C = x.shape[1] // B
    out, mean, norm, argmax = _ops.lp_norm_forward(
        x, p, _fold_channel(weight, in_dims[2], B, C), _fold_channel(bias, in_dims[3], B, C),
        _fold_channel(running_mean, in_dims[4], B, C), _fold_channel(running_norm, in_dims[5], B, C),
        training, eps)
    return (_unfold_input(out, B), mean.view(B, C), norm.view(B, C), argmax.view(B, C)), (1, 0, 0, 0)


@torch.library.register_vmap("bnext::lp_norm_backward")
def _lp_backward_vmap(info, in_dims, grad_out, input, p, weight, bias, mean, norm, argmax, training, eps):
    B = info.batch_size
    x = _fold_input(input, in_dims[1], B)
    C = x.shape[1] // B
    dx, s_dy, s_dy_xhat = _ops.lp_norm_backward(
        _fold_input(grad_out, in_dims[0], B), x, p, _fold_channel(weight, in_dims[3], B, C),
        _fold_channel(bias, in_dims[4], B, C), _fold_channel(mean, in_dims[5], B, C),
        _fold_channel(norm, in_dims[6], B, C), _fold_channel(argmax, in_dims[7], B, C), training, eps)
    return (_unfold_input(dx, B), s_dy.view(B, C), s_dy_xhat.view(B, C)), (1, 0, 0)


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
    if (running_mean is None) != (running_norm is None):
        raise ValueError(f"{op}: running_mean and running_norm must both be given or both be None")
    count = input.numel() // max(input.shape[1], 1)
    if training and count == 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, "
                         f"got input of shape {tuple(input.shape)}")
    if not training and running_mean is None:
        raise ValueError(f"{op}: running_mean and running_norm are required when training=False")
    out, mean, norm, _argmax = _ops.lp_norm_forward(
        input, p, weight, bias, running_mean, running_norm, bool(training), float(eps))
    if training and count > 0:
        update_running_stats(op, running_mean, running_norm, mean, norm, count, float(momentum),
                             _is_batched(input, weight, bias, running_mean, running_norm), bessel=False)
    return out


# -------------------------------------------------------------------------------------------------
# grad_stats / multi_axpy: multi-tensor ops over lists of tensors (csrc/cpu/grad_stats.cpp,
# csrc/cuda/grad_stats.cu). Measurement tools: not differentiable, their inputs are detached.
# -------------------------------------------------------------------------------------------------

#: Column names of grad_stats' result, in order.
GRAD_STATS_COLUMNS = ("a_sq", "b_sq", "diff_sq", "dot")


def _check_tensor_pairs(op: str, a_name: str, a, b_name: str, b):
    """The checks of csrc/multi_tensor.h (check_tensor_pairs), for the fake kernels: under
    torch.compile the C++ ones only run when the compiled graph does."""
    if len(a) != len(b):
        raise ValueError(f"{op}: {a_name} and {b_name} must have the same length, got "
                         f"len({a_name})={len(a)} and len({b_name})={len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(f"{op}: {a_name}[{i}] has shape {list(x.shape)} but {b_name}[{i}] has shape {list(y.shape)}")
        if x.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{op}: {a_name}[{i}] must be float64, float32, float16 or bfloat16, got {x.dtype}")
        if x.dtype != y.dtype:
            raise TypeError(f"{op}: {a_name}[{i}] has dtype {x.dtype} but {b_name}[{i}] has dtype {y.dtype}")
        for name, t in ((a_name, x), (b_name, y)):
            if t.device != a[0].device:
                raise ValueError(f"{op}: {name}[{i}] is on {t.device} but {a_name}[0] is on {a[0].device} "
                                 "(all tensors must be on one device)")


@torch.library.register_fake("bnext::grad_stats")
def _grad_stats_fake(a, b):
    _check_tensor_pairs("bnext.grad_stats", "a", a, "b", b)
    if not a:
        return torch.empty((0, 4), dtype=torch.float64)
    return a[0].new_empty((len(a), 4), dtype=torch.float64)


@torch.library.register_fake("bnext::multi_axpy")
def _multi_axpy_fake(x, d, etas):
    _check_tensor_pairs("bnext.multi_axpy", "x", x, "d", d)
    return [t.new_empty((len(etas), *t.shape)) for t in x]


def _tensor_list(op: str, name: str, ts) -> list:
    if isinstance(ts, Tensor):
        raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got a single Tensor "
                        f"(wrap it in a list)")
    try:
        ts = list(ts)
    except TypeError:
        raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got {type(ts).__name__}") from None
    for i, t in enumerate(ts):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name}[{i}] must be a Tensor, got {type(t).__name__}")
    return [t.detach() for t in ts]


def grad_stats(a, b) -> Tensor:
    """Fused statistics of pairs of tensors (typically two gradients of the same parameters).

    For lists ``a`` and ``b`` of equal length, pairwise equal shapes and dtypes, all on one device,
    returns a float64 tensor of shape ``(len(a), 4)`` whose row i is::

        [ ||a_i||^2,  ||b_i||^2,  ||a_i - b_i||^2,  <a_i, b_i> ]     (GRAD_STATS_COLUMNS)

    (the issue lists the first three; the dot product is the fourth column because the cosine
    needs it). Every pair is read once, products and sums are in float64, and all pairs are
    processed in one parallel pass (CPU) or one multi-tensor launch (CUDA); the result does not
    depend on the thread count. ||a_i - b_i||^2 is accumulated directly, not derived, so it stays
    accurate when a_i ~ b_i. Feed the result to :func:`l2_distance` and :func:`cosine`.
    Not differentiable (inputs are detached). Accepts float64/32/16 and bfloat16.
    """
    op = "bnext.grad_stats"
    a, b = _tensor_list(op, "a", a), _tensor_list(op, "b", b)
    if len(a) != len(b):
        raise ValueError(f"{op}: a and b must have the same length, got len(a)={len(a)} and len(b)={len(b)}")
    if not a:
        return torch.zeros((0, 4), dtype=torch.float64)
    return _ops.grad_stats(a, b)


def l2_distance(stats: Tensor, total: bool = False) -> Tensor:
    """||a_i - b_i||_2 per row of a :func:`grad_stats` result (shape (n,)), or with ``total=True``
    the distance between the concatenations of all a_i and all b_i (a 0-d tensor)."""
    d2 = stats[:, 2]
    return (d2.sum() if total else d2).clamp_min(0).sqrt()


def cosine(stats: Tensor, total: bool = False) -> Tensor:
    """cos(a_i, b_i) = <a_i, b_i> / (||a_i|| ||b_i||) per row of a :func:`grad_stats` result, or
    with ``total=True`` the cosine between the concatenations of all a_i and all b_i.

    Zero vectors: the cosine of two zero vectors is 1 (they are equal: "the gradient did not
    change", the ideal value of the ICS measure), and the cosine of a zero and a non-zero vector
    is 0. Results are clamped to [-1, 1]."""
    if total:
        stats = stats.sum(0, keepdim=True)
    aa, bb, ab = stats[:, 0], stats[:, 1], stats[:, 3]
    denom = (aa * bb).sqrt()
    cos = torch.where(denom > 0, ab / denom.clamp_min(torch.finfo(stats.dtype).tiny), torch.zeros_like(ab))
    cos = torch.where((aa == 0) & (bb == 0), torch.ones_like(cos), cos).clamp(-1.0, 1.0)
    return cos[0] if total else cos


def multi_axpy(params, direction, etas) -> list:
    """For every tensor x_i of ``params`` and d_i of ``direction`` (same shapes and dtypes, one
    device), returns out_i of shape ``(K, *x_i.shape)`` with::

        out_i[k] = x_i - etas[k] * d_i,      k = 0 .. K-1,  K = len(etas)

    i.e. the K points x - eta_k d of a line search, stacked along a new leading dimension (the
    layout ``torch.func.vmap`` and ``functional_call`` take for batched weights). Each x_i and d_i
    is read once for all K outputs, all tensors in one parallel pass / one CUDA launch; computed
    in float32 (float64 for float64) and rounded once. Outputs are new, contiguous tensors that do
    not require grad. ``etas``: a sequence of numbers or a 1-D tensor.
    """
    op = "bnext.multi_axpy"
    x, d = _tensor_list(op, "params", params), _tensor_list(op, "direction", direction)
    if len(x) != len(d):
        raise ValueError(f"{op}: params and direction must have the same length, got "
                         f"len(params)={len(x)} and len(direction)={len(d)}")
    if isinstance(etas, Tensor):
        if etas.dim() != 1:
            raise ValueError(f"{op}: etas must be a 1-D tensor or a sequence of numbers, got shape {tuple(etas.shape)}")
        etas = etas.tolist()
    try:
        etas = [float(e) for e in etas]
    except (TypeError, ValueError):
        raise TypeError(f"{op}: etas must be a sequence of numbers or a 1-D tensor, got {etas!r}") from None
    if not x:
        return []
    return list(_ops.multi_axpy(x, d, etas))


# -------------------------------------------------------------------------------------------------
# Synchronized normalization building blocks (bnext/distributed.py; csrc/cpu/sync_normalization.cpp,
# csrc/common/sync_math.h). Not differentiable themselves: distributed.py's autograd functions use them.
# -------------------------------------------------------------------------------------------------

def channel_stats(input: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of `input` (N, C, *) over (N, *), in float64: what
    torch.var_mean(input, dim=(0, 2, ...), unbiased=False) computes, by BatchNorm's statistics pass
    (one read of the input in either layout, no copy; fp32 segment sums merged in fp64 with
    Chan's formula, accurate when |mean| >> std). Not differentiable. Channels without values get
    NaN. For instrumentation: the experiments' per-step activation statistics use it."""
    check_input_tensor("bnext.channel_stats", input)
    mean, m2 = _ops.batch_norm_stats(input.detach())
    count = input.numel() // input.shape[1] if input.shape[1] else 0
    if count == 0:
        return mean.fill_(math.nan), m2.fill_(math.nan)
    return mean, m2 / count


@torch.library.register_fake("bnext::batch_norm_stats")
def _batch_norm_stats_fake(input):
    C = input.shape[1]
    mean = input.new_empty((C,), dtype=torch.float64)
    return mean, mean.new_empty((C,))


@torch.library.register_fake("bnext::lp_norm_stats")
def _lp_norm_stats_fake(input, p):
    C = input.shape[1]
    s = input.new_empty((C,), dtype=torch.float64)
    return s, s.new_empty((C,)), input.new_empty((C,), dtype=torch.int64)


@torch.library.register_fake("bnext::sync_backward_elementwise")
def _sync_backward_elementwise_fake(grad_eval, input, center, a, b, sign):
    return _empty_in_kernel_layout(input)


@torch.library.register_fake("bnext::noise_apply")
def _noise_apply_fake(input, seed, noise, noise_channels, sample_offset, forward):
    return _empty_in_kernel_layout(input)
