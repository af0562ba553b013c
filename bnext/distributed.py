"""Synchronized normalization across processes (torch.distributed: NCCL on GPUs, gloo on CPU).

With a process group of world size > 1 and the layer in training mode, the per-channel statistics
of BatchNorm, noisy BatchNorm and l_p normalization are those of the GLOBAL batch (the
concatenation of every rank's local batch in rank order), and so are the backward sums:

    forward:  local statistics (kernel)  -> ONE all_gather of [count, N, seed, stats]  -> merge
              in fp64, in rank order (identical on every rank)  -> elementwise pass (kernel, the
              eval-mode forward with the global statistics)
    backward: eval-mode backward (kernel: dx_eval and the local sums in one pass)  -> ONE
              all_reduce of the sums  -> dx = dx_eval - a_c - b_c * dir(x - center_c)
              (kernel sync_backward_elementwise, csrc/common/sync_math.h)
Local statistics come from the kernels batch_norm_stats / lp_norm_stats (the statistics passes of
the fused forward, returned in fp64).

Statistics per kind:
  BatchNorm:  (count, mean, M2) per rank, merged with Chan's parallel Welford formula in fp64
              (nothing cancels when |mean| >> std).
  l_p:        sum x and sum |x|^p (p = 1, 2), or max |x| with its position (p = inf; a tie between
              ranks goes to the lowest rank, within a rank to the first position: exactly the
              single-process rule "first arg-max in NCHW order" on the concatenated batch).
  noisy BN:   BatchNorm's statistics; the noise key is rank 0's seed (carried in the same
              all_gather), so the channel noise (mu_c, sigma_c) is identical on all ranks, and
              element noise is drawn at the element's GLOBAL sample index (samples of lower ranks
              come first): independent across ranks, and equal to the noise a single process would
              draw for the concatenated batch with the same seed.

Uneven batches, including ranks with an EMPTY batch, are handled: a rank contributes its count
(possibly 0), and every rank runs the same collectives. Running statistics are updated from the
global statistics (unbiased variance with the global count), identically on every rank.

Gradients of weight and bias are the rank-LOCAL contributions (their sum over ranks is the
gradient of the summed loss), as in torch.nn.SyncBatchNorm: DistributedDataParallel then averages
them like every other parameter gradient. The input gradient includes every rank's contribution
through the all-reduced sums.

Every rank must call forward and backward of a synchronized layer the same number of times (the
collectives pair up), also a rank whose batch is empty.
"""
import contextlib
import math
from typing import Optional

import torch
from torch import Tensor

from .ops.checks import check_norm_args
from .ops.noisy_batch_norm import draw_seed
from .ops.registration import _acc_dtype, _ops
from .ops.running_stats import update_running_stats

__all__ = ["check_process_group", "is_synchronized", "sync_disabled", "sync_batch_norm", "sync_noisy_batch_norm",
           "sync_lp_norm", "merge_welford"]


def _dist():
    import torch.distributed as dist
    return dist


def check_process_group(op: str, process_group):
    """Raises TypeError unless process_group is None or a torch.distributed ProcessGroup."""
    if process_group is None:
        return
    dist = _dist()
    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{op}: process_group must be a torch.distributed.ProcessGroup or None, "
                        f"got {type(process_group).__name__}")


class GroupRef:
    """A process group held by reference: copy.deepcopy shares it, pickling drops it (None)."""
    __slots__ = ("group",)

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (GroupRef, (None,))


def is_synchronized(process_group, training: bool) -> bool:
    """True when a layer with this group synchronizes: training, and a group of world size > 1."""
    if process_group is None or not training:
        return False
    dist = _dist()
    return dist.is_initialized() and dist.get_world_size(process_group) > 1


@contextlib.contextmanager
def sync_disabled(model: torch.nn.Module):
    """Within the block, every layer of ``model`` that has a ``process_group`` (bnext.nn's
    normalization layers) computes LOCAL statistics (``process_group = None``); the groups are put back
    on exit. For measuring a synchronized model on the whole global batch in ONE process: a synchronized
    layer applied to the global batch split across ranks equals the unsynchronized layer applied to
    the concatenated batch, and no collective is issued (the other ranks need not take part)."""
    saved = [(m, m.process_group) for m in model.modules() if hasattr(type(m), "process_group")]
    try:
        for m, _ in saved:
            m.process_group = None
        yield model
    finally:
        for m, group in saved:
            m.process_group = group


def merge_welford(counts, means: Tensor, m2s: Tensor):
    """Chan's parallel merge of per-rank (count, mean, M2) rows, in rank order, fp64:
        n = na + nb, d = mean_b - mean_a, mean = mean_a + d nb / n, M2 = M2_a + M2_b + d^2 na nb / n.
    Ranks with count 0 are skipped. Returns (total count, mean, M2)."""
    n, mean, m2 = 0, torch.zeros_like(means[0]), torch.zeros_like(m2s[0])
    for r, nb in enumerate(counts):
        if nb == 0:
            continue
        if n == 0:
            n, mean, m2 = nb, means[r].clone(), m2s[r].clone()
            continue
        tot = n + nb
        d = means[r] - mean
        mean = mean + d * (nb / tot)
        m2 = m2 + m2s[r] + d * d * (n * nb / tot)
        n = tot
    return n, mean, m2


def _all_gather_rows(row: Tensor, group) -> Tensor:
    """(world_size, len(row)): every rank's row, in rank order (one collective)."""
    dist = _dist()
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    return torch.stack(rows)


def _all_reduce_sums(*sums: Tensor, group) -> list:
    """Sums over ranks of the given per-channel vectors, in fp64 (one collective)."""
    buf = torch.cat([s.to(torch.float64) for s in sums])
    _dist().all_reduce(buf, group=group)
    return list(buf.chunk(len(sums)))


def _counts(input: Tensor):
    C = input.shape[1]
    return (input.numel() // C if C > 0 else 0), input.shape[0]


def _check_global_count(op: str, total: int, shapes_hint: str):
    if total == 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got 1 over all ranks "
                         f"({shapes_hint})")


def _weight64(weight: Optional[Tensor], C: int, like: Tensor) -> Tensor:
    if weight is None:
        return torch.ones(C, dtype=torch.float64, device=like.device)
    return weight.detach().to(torch.float64)


# -------------------------------------------------------------------------------------------------
# BatchNorm (+ ReLU) and noisy BatchNorm
# -------------------------------------------------------------------------------------------------

class _SyncBatchNorm(torch.autograd.Function):
    """Outputs (y, mean, var, count): y differentiable; mean and biased var (fp64) and the global
    count (0-d int64) for the running-stat update."""

    @staticmethod
    def forward(ctx, input, weight, bias, eps, relu, group, seed, noise):
        dist = _dist()
        C = input.shape[1]
        count, N = _counts(input)
        mean_l, m2_l = _ops.batch_norm_stats(input)
        seed_v = int(seed) if seed is not None else 0
        header = torch.tensor([count, N, seed_v & 0xFFFFFFFF, seed_v >> 32], dtype=torch.float64,
                              device=input.device)
        rows = _all_gather_rows(torch.cat([header, mean_l, m2_l]), group)
        head = rows[:, :4].cpu().tolist()
        counts = [int(h[0]) for h in head]
        total, mean, m2 = merge_welford(counts, rows[:, 4:4 + C], rows[:, 4 + C:])
        acc = _acc_dtype(input.dtype)
        var = m2 / total if total > 0 else torch.full_like(m2, math.nan)
        mean_a, var_a = mean.to(acc), var.to(acc)
        y = _ops.batch_norm_forward(input, weight, bias, mean_a, var_a, False, float(eps), bool(relu))[0]
        n0 = 0
        if noise is not None:
            rank = dist.get_rank(group)
            n0 = sum(int(h[1]) for h in head[:rank])
            seed = torch.tensor(int(head[0][2]) | (int(head[0][3]) << 32), dtype=torch.int64)
            y = _ops.noise_apply(y, seed, noise, C, n0, True)
        ctx.save_for_backward(input, weight, bias, mean_a, var_a)
        ctx.eps, ctx.relu, ctx.group, ctx.total = float(eps), bool(relu), group, total
        ctx.seed, ctx.noise, ctx.n0 = seed, noise, n0
        stats_count = torch.tensor(total, dtype=torch.int64)
        ctx.mark_non_differentiable(mean, var, stats_count)
        return y, mean, var, stats_count

    @staticmethod
    def backward(ctx, grad_out, _gm, _gv, _gc):
        input, weight, bias, mean, var = ctx.saved_tensors
        C = input.shape[1]
        g = grad_out
        if ctx.noise is not None:  # y = s * bn(x) + m: the BatchNorm part sees g = dy * s
            g = _ops.noise_apply(g, ctx.seed, ctx.noise, C, ctx.n0, False)
        dx_eval, sum_dy, sum_dy_xhat = _ops.batch_norm_backward(
            g, input, weight, bias, mean, var, False, ctx.eps, ctx.relu)
        s_dy, s_dy_xhat = _all_reduce_sums(sum_dy, sum_dy_xhat, group=ctx.group)
        M = float(ctx.total)
        invstd = torch.rsqrt(var.to(torch.float64) + ctx.eps)
        coeff = _weight64(weight, C, input) * invstd
        a = coeff * s_dy / M
        b = coeff * invstd * s_dy_xhat / M
        dx = _ops.sync_backward_elementwise(dx_eval, input, mean, a, b, False)
        dw = sum_dy_xhat.to(weight.dtype) if (weight is not None and ctx.needs_input_grad[1]) else None
        db = sum_dy.to(bias.dtype) if (bias is not None and ctx.needs_input_grad[2]) else None
        return (dx if ctx.needs_input_grad[0] else None), dw, db, None, None, None, None, None


def _sync_bn(op, input, running_mean, running_var, weight, bias, momentum, eps, relu, group, seed, noise):
    check_norm_args(op, input, {"running_mean": running_mean, "running_var": running_var, "weight": weight,
                                "bias": bias}, eps, momentum)
    y, mean, var, total = _SyncBatchNorm.apply(input, weight, bias, eps, relu, group, seed, noise)
    total = int(total)
    _check_global_count(op, total, f"local input {tuple(input.shape)}")
    if total > 0:
        update_running_stats(op, running_mean, running_var, mean, var, total, float(momentum), batched=False)
    return y


def sync_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], momentum: float, eps: float,
                    activation: Optional[str], process_group) -> Tensor:
    """Training-mode bnext.batch_norm with the statistics of the global batch over `process_group`
    (see the module docstring)."""
    return _sync_bn("bnext.nn.BatchNorm (synchronized)", input, running_mean, running_var, weight, bias,
                    momentum, eps, activation == "relu", process_group, None, None)


def sync_noisy_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          weight: Optional[Tensor], bias: Optional[Tensor], momentum: float, eps: float,
                          noise: list, generator: Optional[torch.Generator], process_group) -> Tensor:
    """Training-mode bnext.noisy_batch_norm over the global batch: every rank draws a seed from its
    generator (so all generators advance alike), rank 0's is used by all (see the module docstring)."""
    seed = int(draw_seed(generator))
    return _sync_bn("bnext.nn.NoisyBatchNorm (synchronized)", input, running_mean, running_var, weight, bias,
                    momentum, eps, False, process_group, seed, [float(v) for v in noise])


# -------------------------------------------------------------------------------------------------
# l_p normalization
# -------------------------------------------------------------------------------------------------

def _lp_local_stats(input: Tensor, p: float):
    """Per-channel fp64 (sum x, sum |x|^p or max |x|, local arg-max position or -1) of the local batch
    (kernel lp_norm_stats: lp_norm_forward's statistics pass)."""
    s, power, arg = _ops.lp_norm_stats(input, p)
    return s, power, arg.to(torch.float64)


class _SyncLpNorm(torch.autograd.Function):
    """Outputs (y, mean, norm, count) like _SyncBatchNorm."""

    @staticmethod
    def forward(ctx, input, p, weight, bias, eps, group):
        dist = _dist()
        C = input.shape[1]
        count, _N = _counts(input)
        s, power, arg = _lp_local_stats(input, p)
        header = torch.tensor([count], dtype=torch.float64, device=input.device)
        rows = _all_gather_rows(torch.cat([header, s, power, arg]), group)
        counts = [int(v) for v in rows[:, 0].cpu().tolist()]
        total = sum(counts)
        sums, powers, args = rows[:, 1:1 + C], rows[:, 1 + C:1 + 2 * C], rows[:, 1 + 2 * C:]
        mean = sums.sum(0) / total if total > 0 else torch.full((C,), math.nan, dtype=torch.float64,
                                                               device=input.device)
        owner = torch.full((C,), -1, dtype=torch.int64, device=input.device)
        if math.isinf(p):
            # Largest max |x|; on a tie the lowest rank (strict >, ranks in order).
            norm = torch.full((C,), -1.0, dtype=torch.float64, device=input.device)
            for r in range(rows.shape[0]):
                if counts[r] == 0:
                    continue
                better = powers[r] > norm
                norm = torch.where(better, powers[r], norm)
                owner = torch.where(better, torch.full_like(owner, r), owner)
        elif p == 1.0:
            norm = powers.sum(0) / total
        else:
            norm = torch.sqrt(powers.sum(0) / total)
        acc = _acc_dtype(input.dtype)
        mean_a, norm_a = mean.to(acc), norm.to(acc)
        y = _ops.lp_norm_forward(input, p, weight, bias, mean_a, norm_a, False, float(eps))[0]
        rank = dist.get_rank(group)
        local_arg = torch.where(owner == rank, args[rank].to(torch.int64), torch.full_like(owner, -1))
        ctx.save_for_backward(input, weight, bias, mean_a, norm_a, local_arg)
        ctx.p, ctx.eps, ctx.group, ctx.total = p, float(eps), group, total
        stats_count = torch.tensor(total, dtype=torch.int64)
        ctx.mark_non_differentiable(mean, norm, stats_count)
        return y, mean, norm, stats_count

    @staticmethod
    def backward(ctx, grad_out, _gm, _gn, _gc):
        input, weight, bias, mean, norm, local_arg = ctx.saved_tensors
        C, p, eps, M = input.shape[1], ctx.p, ctx.eps, float(ctx.total)
        no_arg = torch.full((C,), -1, dtype=torch.int64, device=input.device)
        # Eval-mode backward: dx_eval = g * w / (N + eps), local sum g, sum g * (x - mean) / (N + eps).
        dx_eval, sum_dy, sum_dy_xhat = _ops.lp_norm_backward(
            grad_out, input, p, weight, bias, mean, norm, no_arg, False, eps)
        s_dy, s_dy_xhat = _all_reduce_sums(sum_dy, sum_dy_xhat, group=ctx.group)
        n64 = norm.to(torch.float64)
        d = n64 + eps
        s_dy_xc = s_dy_xhat * d
        coeff = _weight64(weight, C, input) / d
        if p == 1.0:
            q = s_dy_xc / (d * M)
        elif p == 2.0:
            q = torch.where(n64 > 0, s_dy_xc / (d * M * n64.clamp_min(torch.finfo(torch.float64).tiny)),
                            torch.zeros_like(n64))
        else:
            q = s_dy_xc / d
        a = coeff * s_dy / M
        b = coeff * q if not math.isinf(p) else torch.zeros_like(q)
        zeros = torch.zeros(C, dtype=torch.float64, device=input.device)
        dx = _ops.sync_backward_elementwise(dx_eval, input, zeros, a, b, p == 1.0)
        if math.isinf(p):
            # The gradient of max |x| goes to the global arg-max, on the rank that holds it.
            chans = torch.nonzero(local_arg >= 0).flatten()
            if chans.numel() > 0:
                pos = local_arg[chans]
                S = math.prod(input.shape[2:])
                n, s = pos // S, pos % S
                spatial = torch.unravel_index(s, tuple(input.shape[2:])) if input.dim() > 2 else ()
                index = (n, chans, *spatial)
                fix = (coeff * q)[chans] * torch.sign(input.detach()[index].to(torch.float64))
                dx = dx.index_put(index, (dx[index].to(torch.float64) - fix).to(dx.dtype))
        dw = sum_dy_xhat.to(weight.dtype) if (weight is not None and ctx.needs_input_grad[2]) else None
        db = sum_dy.to(bias.dtype) if (bias is not None and ctx.needs_input_grad[3]) else None
        return (dx if ctx.needs_input_grad[0] else None), None, dw, db, None, None


def sync_lp_norm(input: Tensor, p: float, running_mean: Optional[Tensor], running_norm: Optional[Tensor],
                 weight: Optional[Tensor], bias: Optional[Tensor], momentum: float, eps: float,
                 process_group) -> Tensor:
    """Training-mode bnext.lp_norm with the statistics of the global batch (see the module docstring)."""
    op = "bnext.nn.LpNorm (synchronized)"
    check_norm_args(op, input, {"running_mean": running_mean, "running_norm": running_norm, "weight": weight,
                                "bias": bias}, eps, momentum)
    y, mean, norm, total = _SyncLpNorm.apply(input, float(p), weight, bias, eps, process_group)
    total = int(total)
    _check_global_count(op, total, f"local input {tuple(input.shape)}")
    if total > 0:
        update_running_stats(op, running_mean, running_norm, mean, norm, total, float(momentum), batched=False,
                             bessel=False)
    return y
