"""The experiments' only contact with bnext.landscape (ICS, line probes, curvature, Theorem 4.1).

Each function returns plain JSON-able numbers for metrics.jsonl; train.run_one calls them.
"""
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch


def _finite(v) -> Optional[float]:
    v = float(v)
    return v if math.isfinite(v) else None


def ics(model, loss_fn: Callable, batch, lr: float, layers: Sequence[str]) -> List[Dict[str, Any]]:
    """Definition 2.1 for each named layer: ||G - G'|| and cos(G, G')."""
    from bnext import landscape
    out = landscape.ics(model, loss_fn, batch, lr=lr, layers=list(layers))
    return [{"name": r.name, "l2": _finite(r.l2), "cosine": _finite(r.cosine)} for r in out]


def line_probe(model, loss_fn: Callable, batch, etas: Sequence[float]) -> Dict[str, Any]:
    """Loss and gradient along -g at the given step sizes; the paper's three summaries and their
    scale-free companions.

    loss_range     max - min over eta of L(x - eta g)
    grad_pred_top  max over eta of ||grad L(x - eta g) - g||: the top of the band the paper plots as
                   "gradient predictiveness"; grad_pred is the band's width (max - min), kept alongside
    beta           max over eta of ||grad L(x - eta g) - g|| / ||eta g||
    grad_pred_rel  grad_pred_top / ||g||: how far the gradient turns, in units of its own length
    loss_range_rel loss_range / (eta_max ||g||^2): the loss change in units of the first-order
                   prediction eta_max ||g||^2 of the largest step
    A network whose gradient is 300x larger has loss ranges and gradient changes ~300x larger at the same
    curvature; the two relative figures do not scale with ||g||."""
    from bnext import landscape
    p = landscape.line_probe(model, loss_fn, batch, list(etas))
    losses = [float(v) for v in p.losses]
    diffs = [float(v) for v in p.grad_diffs]
    ok = all(math.isfinite(v) for v in losses + diffs)
    g = _finite(p.grad_norm)
    eta_max = max(abs(float(e)) for e in p.etas)
    loss_range = (max(losses) - min(losses)) if ok else None
    top = max(diffs) if ok else None
    return {"etas": [float(e) for e in p.etas], "losses": losses, "grad_diffs": diffs, "batched": bool(p.batched),
            "loss": _finite(p.loss), "grad_norm": g,
            "loss_range": loss_range,
            "grad_pred": (max(diffs) - min(diffs)) if ok else None,
            "grad_pred_top": top,
            "beta": _finite(p.beta) if ok else None,
            "grad_pred_rel": top / g if ok and g else None,
            "loss_range_rel": loss_range / (eta_max * g * g) if ok and g and eta_max > 0 else None}


def hessian_top(model, loss_fn: Callable, batch, iters: int) -> Optional[float]:
    from bnext import landscape
    return _finite(landscape.hessian_top_eigenvalue(model, loss_fn, batch, iters=iters))


def start_theorem41(model):
    """Begin recording Theorem 4.1's two sides for the next forward/backward (returns the tracker)."""
    from bnext import landscape
    return landscape.track_bn_gradients(model)


def theorem41(model, tracker) -> Optional[Dict[str, Any]]:
    """Theorem 4.1 after the recorded backward: the largest per-channel relative error between
    ||dL/dy||^2 and the exact right-hand side (and, for reference, the paper's printed form, which
    differs by about eps/var) over all BN layers; None when nothing was recorded. Stops the tracker.

    Also, per BN layer (by module name), the medians over channels of the two quantities the paper's
    argument rests on: gamma^2/sigma^2 (a BN layer shrinks the gradient when it is < 1) and the share of
    ||g||^2 that the projection removes, 1 - ||g - <1,g>/m - yhat <g,yhat>/m||^2 / ||g||^2 (in [0, 1];
    channels with g = 0 left out), and of their product's measured value ||dL/dy||^2 / ||g||^2 (the
    gradient with respect to the layer's input against the one with respect to its output: below 1, BN shrinks
    it; claim 6 decides on it)."""
    from bnext import landscape
    try:
        res = landscape.bn_gradient_identity(model)
    finally:
        tracker.remove()
    if not res:
        return None
    worst = max(float(r.rel_error.max()) for r in res.values())
    paper = 0.0
    for r in res.values():
        scale = torch.maximum(r.lhs.abs(), r.rhs_paper.abs())
        keep = scale > 0
        if keep.any():
            paper = max(paper, float(((r.lhs - r.rhs_paper).abs()[keep] / scale[keep]).max()))
    per_layer = {}
    for name, r in res.items():
        if r.scale is None or r.g_sq is None:
            continue
        keep = (r.g_sq > 0) & (r.scale > 0)
        removed = 1.0 - (r.rhs[keep] / r.scale[keep]) / r.g_sq[keep]
        ratio = r.lhs[keep] / r.g_sq[keep]  # ||dL/dy||^2 / ||g||^2 per channel, from autograd's own backward
        per_layer[name] = {"gamma2_over_sigma2": _finite(r.scale.median()),
                           "removed_fraction": _finite(removed.median()) if keep.any() else None,
                           "grad_ratio": _finite(ratio.median()) if keep.any() else None}
    return {"per_layer": per_layer, "max_rel_err": _finite(worst), "max_rel_err_paper_form": _finite(paper),
            "layers": len(res),
            "channels": sum(int(r.lhs.numel()) for r in res.values())}
