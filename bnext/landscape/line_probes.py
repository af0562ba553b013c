"""The landscape along a direction (Sec. 3.2, App. A.2.2): loss variation, gradient predictiveness
and effective beta-smoothness at points x - eta_k d.

"The module docstring" of the functions here is bnext.landscape's: the loss conventions, what "the
parameters" are, and how a measurement leaves no trace.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..ops import grad_stats, multi_axpy
from ._core import BatchStatisticsOnly, Generators, LossFn, Model, evaluate_points, measurement, seeded_generator


@dataclass
class LineProbe:
    """Loss and gradient at x - eta_k d, for the step sizes etas (d = g, the gradient at x, by
    default), over all trainable parameters:
        losses[k]     = L(x - eta_k d)
        grad_diffs[k] = ||grad L(x - eta_k d) - g||_2
        beta          = max_k grad_diffs[k] / ||eta_k d||_2    (effective beta-smoothness; eta = 0 skipped)
    The paper's "loss variation" is ``loss_range`` and its "gradient predictiveness"
    ``grad_diff_range``."""
    etas: List[float]
    losses: List[float]
    grad_diffs: List[float]
    beta: float
    loss: float                    # L(x)
    grad_norm: float               # ||g||_2
    direction_norm: float          # ||d||_2
    batched: bool                  # True: the K points were evaluated together with torch.func.vmap
    fallback_reason: Optional[str] = None  # why vmap was not used (None when batched)

    @property
    def loss_range(self) -> float:
        return max(self.losses) - min(self.losses)

    @property
    def grad_diff_range(self) -> float:
        return max(self.grad_diffs) - min(self.grad_diffs)


def _direction(op, st: Model, direction, g: List[Tensor], seed: int) -> List[Tensor]:
    params = [st.params[i] for i in st.trainable]
    if direction is None or (isinstance(direction, str) and direction == "gradient"):
        return g
    if isinstance(direction, str):
        if direction != "random":
            raise ValueError(f"{op}: direction must be None/'gradient', 'random' or a list of tensors, got {direction!r}")
        gen = seeded_generator(params[0], seed)
        d = [torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=gen) for p in params]
        stats = grad_stats(d, g)
        dn, gn = float(stats[:, 0].sum().sqrt()), float(stats[:, 1].sum().sqrt())
        scale = gn / dn if gn > 0 else 1.0 / dn
        return [t * scale for t in d]
    if isinstance(direction, dict):
        names = [st.names[i][len("model."):] for i in st.trainable]
        missing = [n for n in names if n not in direction]
        if missing:
            raise ValueError(f"{op}: direction has no tensor for parameter(s) {missing[:5]}")
        direction = [direction[n] for n in names]
    direction = list(direction)
    if len(direction) != len(params):
        raise ValueError(f"{op}: direction must have one tensor per trainable parameter ({len(params)}), "
                         f"got {len(direction)}")
    for k, (t, p) in enumerate(zip(direction, params)):
        if not isinstance(t, Tensor) or t.shape != p.shape:
            raise ValueError(f"{op}: direction[{k}] must be a tensor of shape {tuple(p.shape)} "
                             f"(parameter {st.names[st.trainable[k]][len('model.'):]})")
    return [t.detach().to(p.dtype) for t, p in zip(direction, params)]


def _step_sizes(op: str, etas) -> List[float]:
    if etas is None:
        raise TypeError(f"{op}: etas (the step sizes) is required")
    if isinstance(etas, Tensor):
        etas = etas.reshape(-1).tolist() if etas.dim() <= 1 else etas
    try:
        etas = [float(e) for e in etas]
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{op}: etas must be a sequence of numbers or a 1-D tensor, got {etas!r}") from None
    if not all(math.isfinite(e) for e in etas):
        raise ValueError(f"{op}: etas must be finite numbers, got {etas}")
    if not etas:
        raise ValueError(f"{op}: etas must hold at least one step size")
    return etas


@measurement
def line_probe(model: nn.Module, loss_fn: Optional[LossFn] = None, batch=None, etas: Sequence[float] = None,
               direction=None, *, mode: str = "auto", chunk_size: Optional[int] = None, seed: int = 0,
               criterion=None) -> LineProbe:
    """The landscape along a direction (Sec. 3.2 and App. A.2.2 of the paper).

    At the current parameters x with loss L and gradient g (this batch, current mode: batch
    statistics in train mode), for each step size eta_k in ``etas``:
        loss variation           L(x - eta_k d)                      -> ``losses``, ``loss_range``
        gradient predictiveness  ||grad L(x - eta_k d) - g||_2        -> ``grad_diffs``, ``grad_diff_range``
        effective beta-smoothness max_k ||grad L(x - eta_k d) - g|| / ||eta_k d||   -> ``beta``
    with d = g by default (the paper). ``direction="random"``: a Gaussian direction scaled to
    ||g|| (seeded by ``seed``, drawn from a private generator); or a list of tensors, one per
    trainable parameter (or a dict name -> tensor).

    mode="batched": the K points are built with :func:`bnext.multi_axpy`, evaluated together with
    ``torch.func.vmap`` over ``functional_call`` with the stacked weights (``chunk_size`` bounds how
    many at once), and differentiated with one ordinary backward of the summed losses (the K losses
    are independent, so each point gets its own gradient). BatchNorm layers in train mode run
    with track_running_stats=False for the call (same batch statistics, buffers untouched).
    mode="sequential": one forward/backward per point. mode="auto" (default): batched, falling
    back to sequential when vmap fails on the model; ``LineProbe.batched`` and
    ``fallback_reason`` report what happened. Random draws in the forward are the same at every
    point (vmap randomness="same"; the sequential loop replays the generators).

    Leaves no trace: see the module docstring.
    """
    op = "bnext.landscape.line_probe"
    if mode not in ("auto", "batched", "sequential"):
        raise ValueError(f"{op}: mode must be 'auto', 'batched' or 'sequential', got {mode!r}")
    etas = _step_sizes(op, etas)
    st = Model(op, model, loss_fn, batch, criterion)
    with Generators(model) as gens, BatchStatisticsOnly(model):
        loss0, g = st.loss_and_grads(st.detached(), st.trainable)
        d = _direction(op, st, direction, g, seed)
        stacked = multi_axpy([st.params[i] for i in st.trainable], d, etas)
        points = evaluate_points(st, gens, stacked, mode, chunk_size)
    K = len(etas)
    a = [gk[k] for k in range(K) for gk in points.grads]
    b = [gj for _ in range(K) for gj in g]
    per_k = grad_stats(a, b).view(K, len(g), 4).sum(1)
    diffs = per_k[:, 2].clamp_min(0).sqrt().tolist()
    gd = grad_stats(g, d)
    g_norm, d_norm = float(gd[:, 0].sum().sqrt()), float(gd[:, 1].sum().sqrt())
    ratios = [diff / (abs(e) * d_norm) for diff, e in zip(diffs, etas) if e != 0 and d_norm > 0]
    beta = max(ratios) if ratios else math.nan
    return LineProbe(etas, [float(v) for v in points.losses], diffs, beta, float(loss0), g_norm, d_norm,
                     points.batched, points.fallback_reason)
