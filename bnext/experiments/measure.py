"""The experiments' only contact with bnext.landscape (ICS, line probes, curvature, Theorem 4.1).

Each function returns plain JSON-able numbers for metrics.jsonl. If bnext.landscape is not
importable in this build, `landscape_available()` says why and the runner records the
measurements as missing instead of faking them.
"""
import math
from typing import Any, Callable, Dict, List, Optional, Sequence


def landscape_available():
    try:
        from bnext import landscape  # noqa: F401
    except ImportError as e:
        return False, f"bnext.landscape is not available: {e}"
    return True, ""


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
    return {"etas": [float(e) for e in p.etas], "losses": losses, "grad_diffs": diffs,
            "loss_range": (max(losses) - min(losses)) if ok else None,
            "grad_pred": (max(diffs) - min(diffs)) if ok else None,
            "beta": _finite(p.beta) if ok else None}


def hessian_top(model, loss_fn: Callable, batch, iters: int) -> Optional[float]:
    from bnext import landscape
    return _finite(landscape.hessian_top_eigenvalue(model, loss_fn, batch, iters=iters))


def theorem41(model) -> Optional[Dict[str, Any]]:
    """Theorem 4.1 after a backward: the largest per-channel relative error between the two sides
    over all BN layers (None when the model has no BN layer)."""
    from bnext import landscape
    res = landscape.bn_gradient_identity(model)
    if not res:
        return None
    worst, layers = 0.0, 0
    for item in (res.values() if isinstance(res, dict) else res):
        lhs, rhs = _sides(item)
        import torch
        lhs, rhs = torch.as_tensor(lhs, dtype=torch.float64), torch.as_tensor(rhs, dtype=torch.float64)
        scale = torch.maximum(lhs.abs(), rhs.abs())
        keep = scale > 0
        if keep.any():
            worst = max(worst, float(((lhs - rhs).abs()[keep] / scale[keep]).max()))
        layers += 1
    return {"max_rel_err": worst, "layers": layers}


def _sides(item):
    for a, b in (("lhs", "rhs"), ("grad_norm_sq", "predicted"), ("left", "right")):
        if hasattr(item, a) and hasattr(item, b):
            return getattr(item, a), getattr(item, b)
        if isinstance(item, dict) and a in item and b in item:
            return item[a], item[b]
    raise TypeError(f"unrecognised bn_gradient_identity result item: {item!r}")
