"""Noisy BatchNorm (bnext/experiments/PROTOCOL.md, "Noisy BatchNorm"): BatchNorm, then s * a + m with
noise drawn in the kernel from a counter-based generator (csrc/common/noise.h). Nothing input-sized
is saved for backward: the kernel regenerates s from the seed. The functional wrapper
bnext.noisy_batch_norm, and the fake kernels, double-backward composite and vmap rules of
bnext::noisy_batch_norm_forward / noisy_batch_norm_backward (autograd in csrc/autograd.cpp)."""
import math
from typing import Optional

import torch
from torch import Tensor

from .batch_norm import batch_norm_backward_reference
from .checks import _is_batched, check_norm_args, check_running_stats
from .registration import _acc_dtype, _ops, per_channel_outputs_fake, vmap_folding_channels
from .running_stats import update_running_stats


def _noise_list(noise_mean, noise_std, noise_mean_spread, noise_std_spread):
    return [float(noise_mean), float(noise_std), float(noise_mean_spread), float(noise_std_spread)]


@torch.library.register_fake("bnext::noisy_batch_norm_forward")
def _noisy_bn_forward_fake(input, weight, bias, eps, seed, noise, noise_channels):
    return per_channel_outputs_fake(input)


@torch.library.register_fake("bnext::noisy_batch_norm_backward")
def _noisy_bn_backward_fake(grad_out, input, weight, bias, mean, var, eps, seed, noise, noise_channels):
    return per_channel_outputs_fake(input)


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
    y = s * a + m, so BatchNorm's composite with g = grad_out * s, s materialized here only."""
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
    return vmap_folding_channels(_ops.noisy_batch_norm_forward, info, in_dims,
                                 (input, weight, bias, eps, seed, noise, noise_channels),
                                 inputs=(0,), channels=(1, 2))


@torch.library.register_vmap("bnext::noisy_batch_norm_backward")
def _noisy_bn_backward_vmap(info, in_dims, grad_out, input, weight, bias, mean, var, eps, seed, noise,
                            noise_channels):
    _check_unbatched_seed("bnext.noisy_batch_norm", in_dims[7])
    return vmap_folding_channels(_ops.noisy_batch_norm_backward, info, in_dims,
                                 (grad_out, input, weight, bias, mean, var, eps, seed, noise, noise_channels),
                                 inputs=(0, 1), channels=(2, 3, 4, 5))


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
    count = check_running_stats(op, input, running_mean, running_var, "running_var", training)
    if not training:
        return _ops.batch_norm_forward(input, weight, bias, running_mean, running_var, False, float(eps), False)[0]
    seed = draw_seed(generator)
    noise = _noise_list(noise_mean, noise_std, noise_mean_spread, noise_std_spread)
    out, mean, var = _ops.noisy_batch_norm_forward(input, weight, bias, float(eps), seed, noise, input.shape[1])
    if count > 0:
        update_running_stats(op, running_mean, running_var, mean, var, count, float(momentum),
                             _is_batched(input, weight, bias, running_mean, running_var))
    return out
