"""What the torch.library registrations of the normalization ops share: output shapes for the fake
kernels, the channel-folding vmap rule, and the shape helpers of the differentiable composites.
Schemas and CPU/CUDA kernels live in csrc/ (csrc/registration.cpp); the C++ autograd in
csrc/autograd.cpp."""
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (loads the operator library)

_ops = torch.ops.bnext


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels keep statistics and sums in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_in_kernel_layout(x: Tensor) -> Tensor:
    """An empty tensor with the strides the kernels give their outputs (see csrc/layout.h):
    NCHW-contiguous input -> contiguous, channels-last-dense input -> channels-last, else contiguous."""
    if x.is_contiguous():
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.movedim(1, -1).is_contiguous():
        return torch.empty(x.movedim(1, -1).shape, dtype=x.dtype, device=x.device).movedim(-1, 1)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def per_channel_outputs_fake(input: Tensor):
    """Fake outputs (out, u_c, v_c) of a normalization forward or backward: an input-shaped tensor in
    the kernel's layout and two per-channel vectors in the accumulation dtype (mean and var, mean and
    norm, or the backward sums of dy and dy * xhat)."""
    u = input.new_empty((input.shape[1],), dtype=_acc_dtype(input.dtype))
    return _empty_in_kernel_layout(input), u, u.new_empty(u.shape)


def _reduce_dims(x: Tensor):
    """The dims a per-channel statistic reduces over: (N, *), all but dim 1."""
    return [0] + list(range(2, x.dim()))


def _channel_view(v: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector (C,) viewed as (1, C, 1, ...) to broadcast against x."""
    return v.view([1, -1] + [1] * (x.dim() - 2))


# --- vmap: fold the vmapped dimension into the channel dimension ---------------------------------
# A normalization over B independent problems of C channels is one normalization over B*C
# channels, so the batching rule is a reshape, not a loop.

def _fold_input(x: Optional[Tensor], bdim: Optional[int], B: int) -> Optional[Tensor]:
    """(B, N, C, *) batched at bdim (or unbatched: expanded) -> (N, B*C, *)."""
    if x is None:
        return None
    x = x.movedim(bdim, 0) if bdim is not None else x.unsqueeze(0).expand(B, *x.shape)
    x = x.movedim(0, 1)  # (N, B, C, *)
    return x.reshape(x.shape[0], B * x.shape[2], *x.shape[3:])


def _fold_channel(v: Optional[Tensor], bdim: Optional[int], B: int, C: int) -> Optional[Tensor]:
    """(B, C) batched at bdim (or unbatched (C,): expanded) -> (B*C,)."""
    if v is None:
        return None
    v = v.movedim(bdim, 0) if bdim is not None else v.unsqueeze(0).expand(B, C)
    return v.reshape(B * C)


def _unfold_input(y: Tensor, B: int) -> Tensor:
    """(N, B*C, *) -> (N, B, C, *), batched at dim 1."""
    return y.reshape(y.shape[0], B, y.shape[1] // B, *y.shape[2:])


def vmap_folding_channels(op, info, in_dims, args: Sequence, inputs: Sequence[int], channels: Sequence[int]):
    """The vmap rule of a normalization op: calls `op` once on `args` with the vmapped dimension
    folded into the channels. args[i] for i in `inputs` are (N, C, *) tensors, for i in `channels`
    per-channel vectors (C,), the rest are passed as they are. The op's first output is input-shaped
    (returned batched at dim 1), the others per-channel (returned as (B, C), batched at dim 0)."""
    B = info.batch_size
    folded = list(args)
    for i in inputs:
        folded[i] = _fold_input(args[i], in_dims[i], B)
    C = folded[inputs[0]].shape[1] // B
    for i in channels:
        folded[i] = _fold_channel(args[i], in_dims[i], B, C)
    first, *per_channel = op(*folded)
    return (_unfold_input(first, B), *(v.view(B, C) for v in per_channel)), (1,) + (0,) * len(per_channel)
