"""One table of bnext's normalization ops for the cross-cutting suites (bad input, hardening): each op
called with one signature, so a suite is parametrized over the ops instead of repeating a block each.

NORM_OPS[name](input, running_mean, second_running_buffer, weight, bias, training, momentum, eps, **kw)
calls the public function; SECOND_BUFFER names that second buffer as the op's messages do.
CONFIGS are the named settings the hardening suite runs: (op name, training, keyword arguments).
"""
import math

import bnext


def _batch_norm(x, rm, rv, w, b, training, momentum, eps, **kw):
    return bnext.batch_norm(x, rm, rv, w, b, training, momentum, eps, **kw)


def _noisy_batch_norm(x, rm, rv, w, b, training, momentum, eps, **kw):
    return bnext.noisy_batch_norm(x, rm, rv, w, b, training, momentum, eps, **kw)


def _lp_norm(x, rm, rn, w, b, training, momentum, eps, p=2):
    return bnext.lp_norm(x, p, rm, rn, w, b, training, momentum, eps)


NORM_OPS = {"batch_norm": _batch_norm, "noisy_batch_norm": _noisy_batch_norm, "lp_norm": _lp_norm}
SECOND_BUFFER = {"batch_norm": "running_var", "noisy_batch_norm": "running_var", "lp_norm": "running_norm"}

# noisy_batch_norm's generator is added per call (its seed varies with the case).
CONFIGS = {
    "batch_norm": ("batch_norm", True, dict(activation="relu")),
    "batch_norm_eval": ("batch_norm", False, {}),
    "noisy_batch_norm": ("noisy_batch_norm", True, {}),
    "lp_norm_1": ("lp_norm", True, dict(p=1)),
    "lp_norm_2": ("lp_norm", True, dict(p=2)),
    "lp_norm_inf": ("lp_norm", True, dict(p=math.inf)),
}
