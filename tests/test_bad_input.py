"""Table-driven bad-input tests of every public op and module, and of the raw torch.ops.bnext.* ops.

Each case must raise a Python exception (ValueError, TypeError or RuntimeError; torch's
TORCH_CHECK_VALUE/TYPE map to ValueError/TypeError) whose message names the offending argument.
The raw-op cases run in a subprocess first, so that a case that would crash the interpreter (an
out-of-bounds write, an abort) fails its test instead of killing the test run.
"""
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import bnext
from bnext import landscape
from bnext import nn as bnn
from op_registry import NORM_OPS, SECOND_BUFFER

EXC = (ValueError, TypeError, RuntimeError)

x4 = lambda *s: torch.randn(*(s or (4, 3, 2, 2)))  # noqa: E731
c3 = lambda: torch.randn(3)  # noqa: E731
pos3 = lambda: torch.rand(3) + 0.5  # noqa: E731
META = torch.device("meta")

# (id, callable, regex the message must match: the argument's name)
BN_CASES = []


def _norm_cases(name, fn, second):
    """Cases shared by batch_norm / noisy_batch_norm / lp_norm; fn(input, rm, r2, weight, bias, training,
    momentum, eps)."""
    return [
        (f"{name}-input-not-tensor", lambda: fn([1.0, 2.0], None, None, None, None, True, 0.1, 1e-5), r"\binput\b"),
        (f"{name}-input-1d", lambda: fn(torch.randn(5), None, None, None, None, True, 0.1, 1e-5), r"\binput\b"),
        (f"{name}-input-6d", lambda: fn(torch.randn(2, 2, 1, 1, 1, 1), None, None, None, None, True, 0.1, 1e-5), r"\binput\b"),
        (f"{name}-input-int", lambda: fn(torch.ones(4, 3, dtype=torch.int64), None, None, None, None, True, 0.1, 1e-5), r"\binput\b"),
        (f"{name}-input-complex", lambda: fn(torch.ones(4, 3, dtype=torch.complex64), None, None, None, None, True, 0.1, 1e-5), r"\binput\b"),
        (f"{name}-input-bool", lambda: fn(torch.ones(4, 3, dtype=torch.bool), None, None, None, None, True, 0.1, 1e-5), r"\binput\b"),
        (f"{name}-weight-shape", lambda: fn(x4(), None, None, torch.ones(4), None, True, 0.1, 1e-5), r"\bweight\b"),
        (f"{name}-weight-2d", lambda: fn(x4(), None, None, torch.ones(1, 3), None, True, 0.1, 1e-5), r"\bweight\b"),
        (f"{name}-weight-0d", lambda: fn(x4(), None, None, torch.tensor(1.0), None, True, 0.1, 1e-5), r"\bweight\b"),
        (f"{name}-weight-int", lambda: fn(x4(), None, None, torch.ones(3, dtype=torch.int32), None, True, 0.1, 1e-5), r"\bweight\b"),
        (f"{name}-weight-float64-for-float32", lambda: fn(x4(), None, None, torch.ones(3, dtype=torch.float64), None, True, 0.1, 1e-5), r"\bweight\b"),
        (f"{name}-weight-device", lambda: fn(x4(), None, None, torch.ones(3, device=META), None, True, 0.1, 1e-5), r"\bweight\b"),
        (f"{name}-weight-not-tensor", lambda: fn(x4(), None, None, [1.0, 1.0, 1.0], None, True, 0.1, 1e-5), r"\bweight\b"),
        (f"{name}-bias-shape", lambda: fn(x4(), None, None, None, torch.zeros(2), True, 0.1, 1e-5), r"\bbias\b"),
        (f"{name}-bias-device", lambda: fn(x4(), None, None, None, torch.zeros(3, device=META), True, 0.1, 1e-5), r"\bbias\b"),
        (f"{name}-running_mean-shape", lambda: fn(x4(), torch.zeros(5), pos3(), None, None, True, 0.1, 1e-5), r"\brunning_mean\b"),
        (f"{name}-running_mean-dtype", lambda: fn(x4(), torch.zeros(3, dtype=torch.float16), pos3(), None, None, True, 0.1, 1e-5), r"\brunning_mean\b"),
        (f"{name}-{second}-shape", lambda: fn(x4(), c3(), torch.ones(3, 1), None, None, True, 0.1, 1e-5), rf"\b{second}\b"),
        (f"{name}-{second}-missing", lambda: fn(x4(), c3(), None, None, None, True, 0.1, 1e-5), rf"\b{second}\b"),
        (f"{name}-eval-without-running", lambda: fn(x4(), None, None, None, None, False, 0.1, 1e-5), r"\brunning_mean\b"),
        (f"{name}-eps-negative", lambda: fn(x4(), None, None, None, None, True, 0.1, -1e-5), r"\beps\b"),
        (f"{name}-eps-nan", lambda: fn(x4(), None, None, None, None, True, 0.1, math.nan), r"\beps\b"),
        (f"{name}-eps-inf", lambda: fn(x4(), None, None, None, None, True, 0.1, math.inf), r"\beps\b"),
        (f"{name}-eps-str", lambda: fn(x4(), None, None, None, None, True, 0.1, "1e-5"), r"\beps\b"),
        (f"{name}-eps-tensor", lambda: fn(x4(), None, None, None, None, True, 0.1, torch.tensor([1e-5, 1e-5])), r"\beps\b"),
        (f"{name}-momentum-negative", lambda: fn(x4(), None, None, None, None, True, -0.1, 1e-5), r"\bmomentum\b"),
        (f"{name}-momentum-above-1", lambda: fn(x4(), None, None, None, None, True, 1.5, 1e-5), r"\bmomentum\b"),
        (f"{name}-momentum-nan", lambda: fn(x4(), None, None, None, None, True, math.nan, 1e-5), r"\bmomentum\b"),
        (f"{name}-momentum-none", lambda: fn(x4(), None, None, None, None, True, None, 1e-5), r"\bmomentum\b"),
        (f"{name}-one-value-per-channel", lambda: fn(torch.randn(1, 3), None, None, None, None, True, 0.1, 1e-5), r"\binput\b"),
        (f"{name}-one-value-per-channel-3d", lambda: fn(torch.randn(1, 3, 1), None, None, None, None, True, 0.1, 1e-5), r"\binput\b"),
    ]


_bn, _noisy, _lp = NORM_OPS["batch_norm"], NORM_OPS["noisy_batch_norm"], NORM_OPS["lp_norm"]
CASES = [case for name, fn in NORM_OPS.items() for case in _norm_cases(name, fn, SECOND_BUFFER[name])]
CASES += [
    ("batch_norm-activation", lambda: _bn(x4(), None, None, None, None, True, 0.1, 1e-5, activation="gelu"), r"\bactivation\b"),
    ("noisy-noise_mean-negative", lambda: _noisy(x4(), None, None, None, None, True, 0.1, 1e-5, noise_mean=-1.0), r"\bnoise_mean\b"),
    ("noisy-noise_mean-nan", lambda: _noisy(x4(), None, None, None, None, True, 0.1, 1e-5, noise_mean=math.nan), r"\bnoise_mean\b"),
    ("noisy-noise_std-below-1", lambda: _noisy(x4(), None, None, None, None, True, 0.1, 1e-5, noise_std=0.5), r"\bnoise_std\b"),
    ("noisy-noise_std-inf", lambda: _noisy(x4(), None, None, None, None, True, 0.1, 1e-5, noise_std=math.inf), r"\bnoise_std\b"),
    ("noisy-noise_mean_spread-str", lambda: _noisy(x4(), None, None, None, None, True, 0.1, 1e-5, noise_mean_spread="0.1"), r"\bnoise_mean_spread\b"),
    ("noisy-noise_std_spread-negative", lambda: _noisy(x4(), None, None, None, None, True, 0.1, 1e-5, noise_std_spread=-0.1), r"\bnoise_std_spread\b"),
    ("noisy-generator", lambda: _noisy(x4(), None, None, None, None, True, 0.1, 1e-5, generator=123), r"\bgenerator\b"),
]
CASES += [(f"lp_norm-p-{p!r}", (lambda p=p: _lp(x4(), None, None, None, None, True, 0.1, 1e-5, p=p)), r"\bp\b")
          for p in (0, 3, 1.5, -1, -math.inf, math.nan, "two", None, True, [2])]

# grad_stats / multi_axpy / cosine
f3 = lambda: torch.randn(3)  # noqa: E731
CASES += [
    ("channel_stats-not-tensor", lambda: bnext.channel_stats([1.0, 2.0]), r"\binput\b"),
    ("channel_stats-1d", lambda: bnext.channel_stats(torch.randn(5)), r"\binput\b"),
    ("channel_stats-6d", lambda: bnext.channel_stats(torch.randn(2, 2, 1, 1, 1, 1)), r"\binput\b"),
    ("channel_stats-int", lambda: bnext.channel_stats(torch.ones(2, 3, dtype=torch.int64)), r"\binput\b"),
    ("grad_stats-length", lambda: bnext.grad_stats([f3(), f3()], [f3()]), r"len\(a\)"),
    ("grad_stats-a-single-tensor", lambda: bnext.grad_stats(f3(), [f3()]), r"\ba\b"),
    ("grad_stats-b-not-iterable", lambda: bnext.grad_stats([f3()], 3), r"\bb\b"),
    ("grad_stats-a-element", lambda: bnext.grad_stats([f3(), 1.0], [f3(), f3()]), r"\ba\[1\]"),
    ("grad_stats-shape", lambda: bnext.grad_stats([f3()], [torch.randn(4)]), r"\bb\[0\]"),
    ("grad_stats-shape-transposed", lambda: bnext.grad_stats([torch.randn(2, 3)], [torch.randn(3, 2)]), r"\bb\[0\]"),
    ("grad_stats-dtype-mismatch", lambda: bnext.grad_stats([f3()], [f3().double()]), r"\bb\[0\]"),
    ("grad_stats-dtype-int", lambda: bnext.grad_stats([torch.ones(3, dtype=torch.int64)] * 2, [torch.ones(3, dtype=torch.int64)] * 2), r"\ba\[0\]"),
    ("grad_stats-dtype-complex", lambda: bnext.grad_stats([torch.ones(3, dtype=torch.complex64)], [torch.ones(3, dtype=torch.complex64)]), r"\ba\[0\]"),
    ("grad_stats-device", lambda: bnext.grad_stats([f3(), f3()], [f3(), torch.randn(3, device=META)]), r"\bb\[1\]"),
    ("multi_axpy-length", lambda: bnext.multi_axpy([f3()], [f3(), f3()], [0.1]), r"len\(params\)"),
    ("multi_axpy-params-single-tensor", lambda: bnext.multi_axpy(f3(), [f3()], [0.1]), r"\bparams\b"),
    ("multi_axpy-direction-element", lambda: bnext.multi_axpy([f3()], ["x"], [0.1]), r"\bdirection\[0\]"),
    ("multi_axpy-shape", lambda: bnext.multi_axpy([f3()], [torch.randn(2)], [0.1]), r"\bd(irection)?\[0\]"),
    ("multi_axpy-dtype", lambda: bnext.multi_axpy([f3()], [f3().half()], [0.1]), r"\bd(irection)?\[0\]"),
    ("multi_axpy-etas-2d", lambda: bnext.multi_axpy([f3()], [f3()], torch.ones(2, 2)), r"\betas\b"),
    ("multi_axpy-etas-str", lambda: bnext.multi_axpy([f3()], [f3()], ["a"]), r"\betas\b"),
    ("multi_axpy-etas-none", lambda: bnext.multi_axpy([f3()], [f3()], None), r"\betas\b"),
    ("multi_axpy-etas-scalar", lambda: bnext.multi_axpy([f3()], [f3()], 0.5), r"\betas\b"),
]


# modules
def _module_case(cls, *args, x=None, train=True, **kw):
    def run():
        m = cls(*args, **kw)
        m.train(train)
        return m(x if x is not None else x4())
    return run


CASES += [
    ("BatchNorm2d-channels", _module_case(bnn.BatchNorm2d, 5), r"\b(weight|running_mean)\b"),
    ("BatchNorm2d-rank", _module_case(bnn.BatchNorm2d, 3, x=torch.randn(4, 3)), r"\binput\b"),
    ("BatchNorm1d-rank", _module_case(bnn.BatchNorm1d, 3), r"\binput\b"),
    ("BatchNorm2d-activation", _module_case(bnn.BatchNorm2d, 3, activation="tanh"), r"\bactivation\b"),
    ("BatchNorm2d-momentum", _module_case(bnn.BatchNorm2d, 3, momentum=-0.5), r"\bmomentum\b"),
    ("BatchNorm2d-eps", _module_case(bnn.BatchNorm2d, 3, eps=-1.0), r"\beps\b"),
    ("BatchNorm2d-dtype", _module_case(bnn.BatchNorm2d, 3, dtype=torch.float64), r"\b(weight|running_mean)\b"),
    ("NoisyBatchNorm2d-noise_std", _module_case(bnn.NoisyBatchNorm2d, 3, noise_std=0.1), r"\bnoise_std\b"),
    ("NoisyBatchNorm2d-channels", _module_case(bnn.NoisyBatchNorm2d, 4), r"\b(weight|running_mean)\b"),
    ("NoisyBatchNorm2d-eval-channels", _module_case(bnn.NoisyBatchNorm2d, 4, train=False), r"\b(weight|running_mean)\b"),
    ("LpNorm2d-p", _module_case(bnn.LpNorm2d, 3, 4), r"\bp\b"),
    ("LpNorm2d-num_features", _module_case(bnn.LpNorm2d, 0, 2), r"\bnum_features\b"),
    ("LpNorm2d-rank", _module_case(bnn.LpNorm2d, 3, 2, x=torch.randn(4, 3)), r"\binput\b"),
    ("LpNorm2d-channels", _module_case(bnn.LpNorm2d, 4, 1), r"\b(weight|running_mean)\b"),
    ("LpNorm2d-eps", _module_case(bnn.LpNorm2d, 3, 1, eps=math.nan), r"\beps\b"),
    ("convert-to", lambda: bnn.convert(torch.nn.BatchNorm2d(3), to="batchnorm"), r"\bto\b"),
]


# landscape helpers: the user-facing arguments
def _tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    return model, loss, batch


def _ls(fn, **kw):
    def run():
        model, loss, batch = _tiny()
        args = {"model": model, "loss_fn": loss, "batch": batch}
        args.update(kw)
        return fn(**args)
    return run


CASES += [
    ("ics-model", _ls(landscape.ics, model="net", lr=0.1), r"\bmodel\b"),
    ("ics-loss_fn", _ls(landscape.ics, loss_fn=3, lr=0.1), r"\bloss_fn\b"),
    ("ics-lr-and-optimizer", _ls(landscape.ics), r"\blr\b"),
    ("ics-lr-nan", _ls(landscape.ics, lr=math.nan), r"\blr\b"),
    ("ics-optimizer", _ls(landscape.ics, optimizer="sgd"), r"\boptimizer\b"),
    ("ics-scheme", _ls(landscape.ics, lr=0.1, scheme="fast"), r"\bscheme\b"),
    ("ics-layers", _ls(landscape.ics, lr=0.1, layers=["nope"]), r"\blayer\b"),
    ("line_probe-mode", _ls(landscape.line_probe, etas=[0.1], mode="parallel"), r"\bmode\b"),
    ("line_probe-etas-empty", _ls(landscape.line_probe, etas=[]), r"\betas\b"),
    ("line_probe-etas-str", _ls(landscape.line_probe, etas=["a"]), r"\betas\b"),
    ("line_probe-etas-none", _ls(landscape.line_probe, etas=None), r"\betas\b"),
    ("line_probe-etas-nan", _ls(landscape.line_probe, etas=[0.1, math.nan]), r"\betas\b"),
    ("line_probe-direction", _ls(landscape.line_probe, etas=[0.1], direction="up"), r"\bdirection\b"),
    ("line_probe-direction-length", _ls(landscape.line_probe, etas=[0.1], direction=[torch.zeros(4, 3)]), r"\bdirection\b"),
    ("line_probe-direction-shape", _ls(landscape.line_probe, etas=[0.1],
                                       direction=[torch.zeros(3, 4), torch.zeros(4), torch.zeros(2, 4), torch.zeros(2)]),
     r"\bdirection\[0\]"),
    ("hessian_top_eigenvalue-iters", _ls(landscape.hessian_top_eigenvalue, iters=0), r"\biters\b"),
    ("hessian_trace-samples", _ls(landscape.hessian_trace, samples=-2), r"\bsamples\b"),
    ("track_bn_gradients-model", lambda: landscape.track_bn_gradients("net"), r"\bmodel\b"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_public_api_rejects_bad_input(case):
    _id, fn, name = case
    with pytest.raises(EXC) as info:
        fn()
    assert re.search(name, str(info.value)), f"{_id}: message does not name the argument ({name}): {info.value}"


# -------------------------------------------------------------------------------------------------
# Raw torch.ops.bnext.* ops, as a user (or torch.compile) could call them directly
# -------------------------------------------------------------------------------------------------

RAW_CASES = textwrap.dedent(r'''
    import math, torch, bnext
    ops = torch.ops.bnext
    x = torch.randn(4, 3, 2, 2); g = torch.randn(4, 3, 2, 2)
    w, b, m, v = torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3)
    seed = torch.tensor(5); PAPER = [0.5, 1.25, 0.1, 0.1]
    am = torch.zeros(3, dtype=torch.long)
    M = torch.device("meta")
    CASES = {
      # batch_norm_forward
      "bn_fwd-input-1d": (lambda: ops.batch_norm_forward(torch.randn(5), None, None, None, None, True, 1e-5, False), r"\binput\b"),
      "bn_fwd-input-int": (lambda: ops.batch_norm_forward(torch.ones(4, 3, dtype=torch.int32), None, None, None, None, True, 1e-5, False), r"\binput\b"),
      "bn_fwd-weight-shape": (lambda: ops.batch_norm_forward(x, torch.ones(7), None, None, None, True, 1e-5, False), r"\bweight\b"),
      "bn_fwd-bias-shape": (lambda: ops.batch_norm_forward(x, None, torch.ones(2), None, None, True, 1e-5, False), r"\bbias\b"),
      "bn_fwd-running_mean-shape": (lambda: ops.batch_norm_forward(x, None, None, torch.zeros(1), v, False, 1e-5, False), r"\brunning_mean\b"),
      "bn_fwd-running_var-shape": (lambda: ops.batch_norm_forward(x, None, None, m, torch.ones(100), False, 1e-5, False), r"\brunning_var\b"),
      "bn_fwd-running_var-int": (lambda: ops.batch_norm_forward(x, None, None, m, torch.ones(3, dtype=torch.int64), False, 1e-5, False), r"\brunning_var\b"),
      "bn_fwd-eval-no-running": (lambda: ops.batch_norm_forward(x, None, None, None, None, False, 1e-5, False), r"\brunning_mean\b"),
      "bn_fwd-eps-negative": (lambda: ops.batch_norm_forward(x, None, None, None, None, True, -1.0, False), r"\beps\b"),
      "bn_fwd-eps-nan": (lambda: ops.batch_norm_forward(x, None, None, None, None, True, math.nan, False), r"\beps\b"),
      # batch_norm_backward: every tensor argument
      "bn_bwd-grad_out-shape": (lambda: ops.batch_norm_backward(torch.randn(4, 3, 2), x, w, b, m, v, True, 1e-5, False), r"\bgrad_out\b"),
      "bn_bwd-grad_out-dtype": (lambda: ops.batch_norm_backward(g.double(), x, w, b, m, v, True, 1e-5, False), r"\bgrad_out\b"),
      "bn_bwd-input-1d": (lambda: ops.batch_norm_backward(torch.randn(5), torch.randn(5), w, b, m, v, True, 1e-5, False), r"\binput\b"),
      "bn_bwd-mean-shape": (lambda: ops.batch_norm_backward(g, x, w, b, torch.zeros(1), v, True, 1e-5, False), r"\bmean\b"),
      "bn_bwd-mean-empty": (lambda: ops.batch_norm_backward(g, x, w, b, torch.zeros(0), v, True, 1e-5, False), r"\bmean\b"),
      "bn_bwd-var-shape": (lambda: ops.batch_norm_backward(g, x, w, b, m, torch.ones(2, 3), True, 1e-5, False), r"\bvar\b"),
      "bn_bwd-var-int": (lambda: ops.batch_norm_backward(g, x, w, b, m, torch.ones(3, dtype=torch.int64), True, 1e-5, False), r"\bvar\b"),
      "bn_bwd-weight-shape": (lambda: ops.batch_norm_backward(g, x, torch.ones(1), b, m, v, True, 1e-5, False), r"\bweight\b"),
      "bn_bwd-bias-shape": (lambda: ops.batch_norm_backward(g, x, w, torch.zeros(1), m, v, True, 1e-5, True), r"\bbias\b"),
      "bn_bwd-eps-negative": (lambda: ops.batch_norm_backward(g, x, w, b, m, v, True, -1.0, False), r"\beps\b"),
      # noisy_batch_norm
      "noisy_fwd-seed-dtype": (lambda: ops.noisy_batch_norm_forward(x, w, b, 1e-5, torch.tensor(5.0), PAPER, 3), r"\bseed\b"),
      "noisy_fwd-seed-shape": (lambda: ops.noisy_batch_norm_forward(x, w, b, 1e-5, torch.tensor([1, 2]), PAPER, 3), r"\bseed\b"),
      "noisy_fwd-noise-length": (lambda: ops.noisy_batch_norm_forward(x, w, b, 1e-5, seed, [0.5, 1.25], 3), r"\bnoise\b"),
      "noisy_fwd-noise_channels-zero": (lambda: ops.noisy_batch_norm_forward(x, w, b, 1e-5, seed, PAPER, 0), r"\bnoise_channels\b"),
      "noisy_fwd-noise_channels-negative": (lambda: ops.noisy_batch_norm_forward(x, w, b, 1e-5, seed, PAPER, -3), r"\bnoise_channels\b"),
      "noisy_fwd-noise_channels-not-dividing": (lambda: ops.noisy_batch_norm_forward(x, w, b, 1e-5, seed, PAPER, 2), r"\bnoise_channels\b"),
      "noisy_fwd-weight-shape": (lambda: ops.noisy_batch_norm_forward(x, torch.ones(5), b, 1e-5, seed, PAPER, 3), r"\bweight\b"),
      "noisy_fwd-input-int": (lambda: ops.noisy_batch_norm_forward(x.int(), w, b, 1e-5, seed, PAPER, 3), r"\binput\b"),
      "noisy_fwd-eps-nan": (lambda: ops.noisy_batch_norm_forward(x, w, b, math.nan, seed, PAPER, 3), r"\beps\b"),
      "noisy_bwd-mean-shape": (lambda: ops.noisy_batch_norm_backward(g, x, w, b, torch.zeros(1), v, 1e-5, seed, PAPER, 3), r"\bmean\b"),
      "noisy_bwd-var-shape": (lambda: ops.noisy_batch_norm_backward(g, x, w, b, m, torch.ones(4), 1e-5, seed, PAPER, 3), r"\bvar\b"),
      "noisy_bwd-weight-shape": (lambda: ops.noisy_batch_norm_backward(g, x, torch.ones(2), b, m, v, 1e-5, seed, PAPER, 3), r"\bweight\b"),
      "noisy_bwd-grad_out-shape": (lambda: ops.noisy_batch_norm_backward(g[:2], x, w, b, m, v, 1e-5, seed, PAPER, 3), r"\bgrad_out\b"),
      "noisy_bwd-seed-dtype": (lambda: ops.noisy_batch_norm_backward(g, x, w, b, m, v, 1e-5, torch.tensor(5, dtype=torch.int32), PAPER, 3), r"\bseed\b"),
      "noisy_bwd-noise_channels": (lambda: ops.noisy_batch_norm_backward(g, x, w, b, m, v, 1e-5, seed, PAPER, 4), r"\bnoise_channels\b"),
      # lp_norm
      "lp_fwd-p-3": (lambda: ops.lp_norm_forward(x, 3.0, w, b, None, None, True, 1e-5), r"\bp\b"),
      "lp_fwd-p-nan": (lambda: ops.lp_norm_forward(x, math.nan, w, b, None, None, True, 1e-5), r"\bp\b"),
      "lp_fwd-p--inf": (lambda: ops.lp_norm_forward(x, -math.inf, w, b, None, None, True, 1e-5), r"\bp\b"),
      "lp_fwd-running_norm-shape": (lambda: ops.lp_norm_forward(x, 2.0, w, b, m, torch.ones(9), False, 1e-5), r"\brunning_norm\b"),
      "lp_fwd-eval-no-running": (lambda: ops.lp_norm_forward(x, 2.0, w, b, None, None, False, 1e-5), r"\brunning_mean\b"),
      "lp_fwd-eps-negative": (lambda: ops.lp_norm_forward(x, 2.0, w, b, None, None, True, -1e-3), r"\beps\b"),
      "lp_bwd-mean-shape": (lambda: ops.lp_norm_backward(g, x, 2.0, w, b, torch.zeros(2), v, am, True, 1e-5), r"\bmean\b"),
      "lp_bwd-norm-shape": (lambda: ops.lp_norm_backward(g, x, 2.0, w, b, m, torch.ones(1), am, True, 1e-5), r"\bnorm\b"),
      "lp_bwd-norm-empty": (lambda: ops.lp_norm_backward(g, x, 1.0, w, b, m, torch.ones(0), am, True, 1e-5), r"\bnorm\b"),
      "lp_bwd-weight-shape": (lambda: ops.lp_norm_backward(g, x, 2.0, torch.ones(6), b, m, v, am, True, 1e-5), r"\bweight\b"),
      "lp_bwd-argmax-shape": (lambda: ops.lp_norm_backward(g, x, math.inf, w, b, m, v, torch.zeros(2, dtype=torch.long), True, 1e-5), r"\bargmax\b"),
      "lp_bwd-argmax-dtype": (lambda: ops.lp_norm_backward(g, x, math.inf, w, b, m, v, torch.zeros(3), True, 1e-5), r"\bargmax\b"),
      "lp_bwd-argmax-out-of-range": (lambda: ops.lp_norm_backward(g, x, math.inf, w, b, m, v, torch.full((3,), 1 << 40, dtype=torch.long), True, 1e-5), r"\bargmax\b"),
      "lp_bwd-argmax-just-out-of-range": (lambda: ops.lp_norm_backward(g, x, math.inf, w, b, m, v, torch.full((3,), 16, dtype=torch.long), True, 1e-5), r"\bargmax\b"),
      "lp_bwd-argmax-negative": (lambda: ops.lp_norm_backward(g, x, math.inf, w, b, m, v, torch.full((3,), -7, dtype=torch.long), True, 1e-5), r"\bargmax\b"),
      "lp_bwd-grad_out-dtype": (lambda: ops.lp_norm_backward(g.half(), x, 2.0, w, b, m, v, am, True, 1e-5), r"\bgrad_out\b"),
      "lp_bwd-p-0": (lambda: ops.lp_norm_backward(g, x, 0.0, w, b, m, v, am, True, 1e-5), r"\bp\b"),
      # grad_stats / multi_axpy
      "grad_stats-length": (lambda: ops.grad_stats([torch.ones(2)], []), r"len\(a\)"),
      "grad_stats-shape": (lambda: ops.grad_stats([torch.ones(2)], [torch.ones(3)]), r"\bb\[0\]"),
      "grad_stats-dtype": (lambda: ops.grad_stats([torch.ones(2)], [torch.ones(2).double()]), r"\bb\[0\]"),
      "grad_stats-int": (lambda: ops.grad_stats([torch.ones(2, dtype=torch.int8)], [torch.ones(2, dtype=torch.int8)]), r"\ba\[0\]"),
      "multi_axpy-length": (lambda: ops.multi_axpy([torch.ones(2)] * 2, [torch.ones(2)], [1.0]), r"len\(x\)"),
      "multi_axpy-shape": (lambda: ops.multi_axpy([torch.ones(2)], [torch.ones(2, 1)], [1.0]), r"\bd\[0\]"),
      "multi_axpy-dtype": (lambda: ops.multi_axpy([torch.ones(2).bfloat16()], [torch.ones(2).half()], [1.0]), r"\bd\[0\]"),
    }
    import json, re, sys
    out = open(sys.argv[1], "w")
    for name, (fn, pattern) in CASES.items():
        out.write(json.dumps({"case": name, "pattern": pattern, "started": True}) + "\n"); out.flush()
        try:
            fn()
            res = {"case": name, "raised": None}
        except Exception as e:
            res = {"case": name, "raised": type(e).__name__, "message": str(e).splitlines()[0][:500]}
        res["pattern"] = pattern
        out.write(json.dumps(res) + "\n"); out.flush()
''')

RAW_NAMES = re.findall(r'^  "([^"]+)": \(', RAW_CASES, re.M)


@pytest.fixture(scope="module")
def raw_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "results.jsonl"
    script = path.with_name("raw_cases.py")
    script.write_text(RAW_CASES)
    proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    results, last_started = {}, None
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        if r.get("started"):
            last_started = r["case"]
        else:
            results[r["case"]] = r
    return proc, results, last_started


@pytest.mark.parametrize("name", RAW_NAMES)
def test_raw_op_rejects_bad_input(raw_results, name):
    proc, results, last_started = raw_results
    if name not in results:
        crashed = last_started if proc.returncode != 0 else None
        pytest.fail(f"no result for {name}: the subprocess exited with {proc.returncode} "
                    f"(crashed in case {crashed!r}); stderr tail:\n{proc.stderr[-2000:]}")
    r = results[name]
    assert r["raised"] in ("ValueError", "TypeError", "RuntimeError", "IndexError"), \
        f"{name}: expected a Python exception, got {r['raised']!r}"
    assert re.search(r["pattern"], r["message"]), f"{name}: message does not name the argument: {r['message']}"


def test_raw_cases_are_all_collected():
    assert len(RAW_NAMES) >= 50 and len(set(RAW_NAMES)) == len(RAW_NAMES)
