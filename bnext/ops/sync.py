"""Building blocks of the synchronized normalization layers (bnext/distributed.py;
csrc/cpu/sync.cpp, csrc/common/sync_math.h), with their fake kernels: the local
statistics passes batch_norm_stats / lp_norm_stats, the backward elementwise pass
sync_backward_elementwise, and noise_apply (noisy BatchNorm's noise on an already normalized
tensor: s * a + m forward, dy * s backward); and channel_stats on top of batch_norm_stats. Not
differentiable themselves: distributed.py's autograd functions use them."""
import math
from typing import Tuple

import torch
from torch import Tensor

from .checks import check_input_tensor
from .registration import _empty_in_kernel_layout, _ops


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
