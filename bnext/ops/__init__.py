"""bnext's operators: the functional API and their torch.library registrations (fake kernels,
double-backward composites, vmap rules), one module per op:

    module               registered ops (csrc/registration.cpp)          functions
    batch_norm.py        batch_norm_forward / _backward                  batch_norm
    noisy_batch_norm.py  noisy_batch_norm_forward / _backward            noisy_batch_norm, draw_seed
    lp_norm.py           lp_norm_forward / _backward                     lp_norm, lp_norm_reference
    grad_stats.py        grad_stats, multi_axpy                          grad_stats, multi_axpy, cosine,
                                                                         l2_distance
    sync.py              batch_norm_stats, lp_norm_stats,                channel_stats
                         sync_backward_elementwise, noise_apply
    running_stats.py     update_running_stats                            update_running_stats
    registration.py      what the registrations share: fake outputs, the channel-folding vmap rule
    checks.py            the argument checks the normalization wrappers share

The CPU/CUDA kernels live in csrc/, the autograd of the normalization ops in csrc/autograd.cpp.
Importing this package registers everything. The public functions are re-exported here, so a
function shadows the submodule of the same name as an attribute (bnext.ops.batch_norm is the
function); reach a module's other names with `from bnext.ops.batch_norm import ...`."""
from .checks import check_input_tensor, check_norm_args
from .running_stats import update_running_stats
from .batch_norm import batch_norm, batch_norm_backward_reference
from .noisy_batch_norm import draw_seed, noisy_batch_norm, noisy_batch_norm_noise
from .lp_norm import check_p, lp_norm, lp_norm_reference
from .lp_norm import _lp_norm_of  # noqa: F401  (the tests' l_p references take the norm from it)
from .grad_stats import GRAD_STATS_COLUMNS, cosine, grad_stats, l2_distance, multi_axpy
from .sync import channel_stats

__all__ = ["GRAD_STATS_COLUMNS", "batch_norm", "batch_norm_backward_reference", "channel_stats", "check_input_tensor",
           "check_norm_args", "check_p", "cosine", "draw_seed", "grad_stats", "l2_distance", "lp_norm",
           "lp_norm_reference", "multi_axpy", "noisy_batch_norm", "noisy_batch_norm_noise", "update_running_stats"]
