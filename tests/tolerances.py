"""The one tolerance rule of the op tests: a result of bnext against a float64 reference computed from
the same rounded inputs (the input and grad_out already rounded to the input's dtype, the parameters
in their own dtype), so that the only difference left is bnext's own rounding.

Where the bound comes from. bnext computes in an accumulation dtype (fp64 for fp64 inputs, fp32 for
every other dtype: acc_dtype in csrc/layout.h) and rounds each result once to its own dtype:

  * the final rounding moves an element by at most eps_out / 2 * |ref| (eps = torch.finfo(dtype).eps,
    eps_out of the result's dtype: the input's for outputs and input gradients, the parameters' for
    weight and bias gradients);
  * the arithmetic in the accumulation dtype adds a few roundings per element on terms of the size of
    the quantity (`scale` below: its root mean square over the tensor), and the per-channel sums over
    n values (mean, variance, N_p, sum dy, sum dy * xhat) add more: rounding errors of random sign
    in a sum of n terms add up to ~ sqrt(n) eps_acc sum |terms|, and sum |terms| ~ sqrt(n) |sum| for
    terms of either sign, so ~ n eps_acc times the size of the sum (the kernels' blocked, lane-split
    sums do better);
  * for float64 the reference (torch in float64) has errors of the same kind, of the same size.
Noisy BatchNorm's backward rounds g = dy * s to the input's dtype before it reduces it: its
reference starts from that rounded g (bn_grads_from_stored_g in tests/test_noisy_batch_norm.py).

So, per element:   |got - ref| <= K * (eps_out * |ref| + eps_acc * n * scale)

K = 8. Measured with K = 1 over every use in test_batch_norm.py, test_noisy_batch_norm.py,
test_lp_norm.py and test_numerics.py: fp16/bf16 outputs and input gradients reach 0.49 (their
final rounding, eps_out / 2), the largest of all is 1.5 (a float64 BatchNorm input gradient), so
K = 8 leaves a margin of 5 for other instruction sets and summation orders. It stays tight enough
that a gradient doubled, halved, negated or zeroed fails at every dtype: such a defect moves an element
by at least |ref| / 2, more than the bound wherever |ref| / 2 > K (eps_out |ref| + eps_acc n scale),
i.e. at every element not tiny against the tensor's scale (bf16: K eps_out = 1/16).
"""
import math

import torch

K = 8.0


def acc_dtype(dtype):
    """The dtype bnext accumulates in for inputs of `dtype` (csrc/layout.h, acc_dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def values_per_channel(x):
    """n of the bound for a normalization over (N, *) per channel: numel / C (at least 1)."""
    return max(1, x.numel() // x.shape[1]) if x.dim() > 1 and x.shape[1] else max(1, x.numel())


def bound(ref, out_dtype, input_dtype=None, n=1):
    """The per-element bound above for a result of dtype out_dtype computed from inputs of input_dtype
    (default out_dtype) with reductions over n values per channel."""
    ref = ref.double()
    eps_out = torch.finfo(out_dtype).eps
    eps_acc = torch.finfo(acc_dtype(input_dtype or out_dtype)).eps
    scale = ref.square().mean().sqrt().item() if ref.numel() else 0.0
    return K * (eps_out * ref.abs() + eps_acc * n * scale)


def assert_rounding_close(got, ref, input_dtype=None, n=1, what="result"):
    """got (bnext, any dtype) within bound() of ref (float64 from the same rounded inputs); a NaN or a
    shape mismatch fails. input_dtype: the dtype of the op's input (default got's own)."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, reference {tuple(ref.shape)}"
    ref = ref.detach().double()
    tol = bound(ref, got.dtype, input_dtype, n)
    err = (got.detach().double() - ref).abs()
    bad = ~(err <= tol)
    if bad.any():
        ratio = (err / tol.clamp_min(torch.finfo(torch.float64).tiny)).nan_to_num(math.inf)
        i = int(ratio.flatten().argmax())
        raise AssertionError(
            f"{what} ({got.dtype}, n={n}): {int(bad.sum())} of {ref.numel()} elements off by more than the "
            f"rounding bound (tests/tolerances.py); worst at flat index {i}: got {got.flatten()[i].item():.6g}, "
            f"reference {ref.flatten()[i].item():.6g}, {ratio.flatten()[i].item():.3g} x the bound")


def max_ratio(got, ref, input_dtype=None, n=1):
    """max |got - ref| / bound(K = 1): how much of the margin a result uses (0 when exact)."""
    ref = ref.detach().double()
    tol = bound(ref, got.dtype, input_dtype, n) / K
    err = (got.detach().double() - ref).abs()
    return float((err / tol.clamp_min(torch.finfo(torch.float64).tiny)).max()) if ref.numel() else 0.0
