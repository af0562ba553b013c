"""Curvature of the loss: the Hessian's top eigenvalue and its trace, from Hessian-vector products
by double backward (through bnext's differentiable BatchNorm backward).

"The module docstring" of the functions here is bnext.landscape's: the loss conventions, what "the
parameters" are, and how a measurement leaves no trace.
"""
import contextlib
from typing import List, Optional

import torch
from torch import Tensor, nn

from ..ops import grad_stats
from ._core import Generators, LossFn, Model, measurement, seeded_generator


class _HessianVectorProduct:
    """v -> H v for the Hessian of the loss w.r.t. the trainable parameters at their current
    values, by double backward (through bnext's differentiable BatchNorm backward). One forward
    and first backward (create_graph=True), reused for every product."""

    def __init__(self, op, model, loss_fn, batch, criterion=None):
        self.st = st = Model(op, model, loss_fn, batch, criterion)
        values = st.detached()
        self.leaves = st.leaves(values, st.trainable)
        grads = torch.autograd.grad(st.loss(values), self.leaves, create_graph=True, allow_unused=True)
        self.live = [k for k, g in enumerate(grads) if g is not None and g.requires_grad]
        self.grads = [grads[k] for k in self.live]

    def __call__(self, v: List[Tensor]) -> List[Tensor]:
        out = [torch.zeros_like(x) for x in self.leaves]
        if self.live:
            hv = torch.autograd.grad(self.grads, [self.leaves[k] for k in self.live],
                                     grad_outputs=[v[k] for k in self.live], retain_graph=True, allow_unused=True)
            for k, h in zip(self.live, hv):
                if h is not None:
                    out[k] = h.detach()
        return out


@contextlib.contextmanager
def _hessian(op: str, model, loss_fn, batch, criterion, count_name: str, count, seed: int):
    """Checks the number of products, then yields the Hessian-vector product and a private
    generator seeded by `seed` for the test vectors; the global generators are restored after."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"{op}: {count_name} must be a positive int, got {count!r}")
    with Generators(model):
        hvp = _HessianVectorProduct(op, model, loss_fn, batch, criterion)
        yield hvp, seeded_generator(hvp.leaves[0], seed)


@measurement
def hessian_top_eigenvalue(model: nn.Module, loss_fn: Optional[LossFn] = None, batch=None, iters: int = 100,
                           tol: float = 1e-3, seed: int = 0, *, criterion=None) -> float:
    """The Hessian eigenvalue of largest magnitude (signed), by power iteration.

    H = d^2 L / dx^2 over the trainable parameters x at their current values, on this batch, in
    the model's current mode: in train mode BatchNorm uses batch statistics, so H is the Hessian of
    the function actually being trained (PyHessian forces eval mode). Hessian-vector products come
    from double backward. Iteration: v <- H v / ||H v||, eigenvalue estimate lambda = <v, H v>
    (Rayleigh quotient, v unit); stops after ``iters`` products or when |lambda_t - lambda_{t-1}|
    <= tol * |lambda_t|. The start vector is Gaussian from a private generator seeded by ``seed``.
    Leaves no trace: see the module docstring.
    """
    with _hessian("bnext.landscape.hessian_top_eigenvalue", model, loss_fn, batch, criterion,
                  "iters", iters, seed) as (hvp, gen):
        v = [torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=gen) for x in hvp.leaves]
        norm = float(grad_stats(v, v)[:, 0].sum().sqrt())
        v = [t / norm for t in v]
        lam = None
        for _ in range(iters):
            hv = hvp(v)
            s = grad_stats(v, hv).sum(0)
            new, hv_norm = float(s[3]), float(s[1].sqrt())
            if hv_norm == 0:
                return 0.0
            v = [t / hv_norm for t in hv]
            converged = lam is not None and abs(new - lam) <= tol * abs(new)
            lam = new
            if converged:
                break
        return lam


@measurement
def hessian_trace(model: nn.Module, loss_fn: Optional[LossFn] = None, batch=None, samples: int = 100,
                  seed: int = 0, *, criterion=None) -> float:
    """Hutchinson's estimate of the Hessian trace, tr(H) = E_v[v^T H v] with Rademacher v
    (entries +-1), averaged over ``samples`` vectors from a private generator seeded by ``seed``.

    H as in :func:`hessian_top_eigenvalue` (current mode, batch statistics in train mode, double
    backward). The estimator's variance is 2 * sum_{i != j} H_ij^2 / samples. Leaves no trace.
    """
    with _hessian("bnext.landscape.hessian_trace", model, loss_fn, batch, criterion,
                  "samples", samples, seed) as (hvp, gen):
        total = 0.0
        for _ in range(samples):
            v = [torch.randint(0, 2, x.shape, device=x.device, generator=gen).to(x.dtype).mul_(2).sub_(1)
                 for x in hvp.leaves]
            total += float(grad_stats(v, hvp(v))[:, 3].sum())
        return total / samples
