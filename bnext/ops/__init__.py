"""bnext's operators: the functional API and their torch.library registrations (fake kernels,
double-backward composites, vmap rules), one module per op:

    batch_norm.py        bnext::batch_norm_forward / _backward       batch_norm
    noisy_batch_norm.py  bnext::noisy_batch_norm_forward / _backward noisy_batch_norm, draw_seed
    lp_norm.py           bnext::lp_norm_forward / _backward          lp_norm, lp_norm_reference
    grad_stats.py        bnext::grad_stats, multi_axpy                grad_stats, multi_axpy, cosine, l2_distance
    sync.py              bnext::batch_norm_stats, lp_norm_stats, sync_backward_elementwise, noise_apply;
                         channel_stats (bnext.distributed builds on these)
    running_stats.py     bnext::update_running_stats                 update_running_stats
    registration.py      what the registrations share: fake outputs, the channel-folding vmap rule
    checks.py            the argument checks the normalization wrappers share

Schemas and CPU/CUDA kernels live in csrc/ (csrc/registration.cpp), the autograd of the
normalization ops in csrc/autograd.cpp. Importing this package registers everything. The functions
below are re-exported here under their old names; they shadow the submodules of the same name as
attributes (bnext.ops.batch_norm is the function): import a module's other names with
`from bnext.ops.batch_norm import ...`."""
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
