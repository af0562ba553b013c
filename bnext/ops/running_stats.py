"""The running-statistics update of every normalization op in training (csrc/running_stats.cpp):

    running = (1 - momentum) * running + momentum * batch"""
import torch

from .registration import _ops


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
        # One C++ call instead of six tensor ops: this update was a third of the wrapper's time on
        # small inputs.
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
