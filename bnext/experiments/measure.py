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
    """Loss and gradient along -g at the given step sizes; the paper's three summaries."""
    from bnext import landscape
    p = landscape.line_probe(model, loss_fn, batch, list(etas))
    losses = [float(v) for v in p.losses]
    diffs = [float(v) for v in p.grad_diffs]
    ok = all(math.isfinite(v) for v in losses + diffs)
    return {"etas": [float(e) for e in p.etas], "losses": losses, "grad_diffs": diffs, "batched": bool(p.batched),
            "loss_range": (max(losses) - min(losses)) if ok else None,
            "grad_pred": (max(diffs) - min(diffs)) if ok else None,
            "beta": _finite(p.beta) if ok else None}


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
    differs by about eps/var) over all BN layers; None when nothing was recorded. Stops the tracker."""
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
    return {"max_rel_err": _finite(worst), "max_rel_err_paper_form": _finite(paper), "layers": len(res),
            "channels": sum(int(r.lhs.numel()) for r in res.values())}
