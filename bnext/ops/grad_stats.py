"""grad_stats / multi_axpy: multi-tensor ops over lists of tensors (csrc/cpu/grad_stats.cpp,
csrc/cuda/grad_stats.cu), and l2_distance / cosine on grad_stats' result. Measurement tools: not
differentiable, their inputs are detached."""
import torch
from torch import Tensor

from .registration import _ops

#: Column names of grad_stats' result, in order.
GRAD_STATS_COLUMNS = ("a_sq", "b_sq", "diff_sq", "dot")


def _check_tensor_pairs(op: str, a_name: str, a, b_name: str, b):
    """The checks of csrc/multi_tensor.h (check_tensor_pairs), for the fake kernels: under
    torch.compile the C++ ones only run when the compiled graph does."""
    if len(a) != len(b):
        raise ValueError(f"{op}: {a_name} and {b_name} must have the same length, got "
                         f"len({a_name})={len(a)} and len({b_name})={len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(f"{op}: {a_name}[{i}] has shape {list(x.shape)} but {b_name}[{i}] has shape {list(y.shape)}")
        if x.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{op}: {a_name}[{i}] must be float64, float32, float16 or bfloat16, got {x.dtype}")
        if x.dtype != y.dtype:
            raise TypeError(f"{op}: {a_name}[{i}] has dtype {x.dtype} but {b_name}[{i}] has dtype {y.dtype}")
        for name, t in ((a_name, x), (b_name, y)):
            if t.device != a[0].device:
                raise ValueError(f"{op}: {name}[{i}] is on {t.device} but {a_name}[0] is on {a[0].device} "
                                 "(all tensors must be on one device)")


@torch.library.register_fake("bnext::grad_stats")
def _grad_stats_fake(a, b):
    _check_tensor_pairs("bnext.grad_stats", "a", a, "b", b)
    if not a:
        return torch.empty((0, 4), dtype=torch.float64)
    return a[0].new_empty((len(a), 4), dtype=torch.float64)


@torch.library.register_fake("bnext::multi_axpy")
def _multi_axpy_fake(x, d, etas):
    _check_tensor_pairs("bnext.multi_axpy", "x", x, "d", d)
    return [t.new_empty((len(etas), *t.shape)) for t in x]


def _tensor_list(op: str, name: str, ts) -> list:
    if isinstance(ts, Tensor):
        raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got a single Tensor "
                        f"(wrap it in a list)")
    try:
        ts = list(ts)
    except TypeError:
        raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got {type(ts).__name__}") from None
    for i, t in enumerate(ts):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name}[{i}] must be a Tensor, got {type(t).__name__}")
    return [t.detach() for t in ts]


def grad_stats(a, b) -> Tensor:
    """Fused statistics of pairs of tensors (typically two gradients of the same parameters).

    For lists ``a`` and ``b`` of equal length, pairwise equal shapes and dtypes, all on one device,
    returns a float64 tensor of shape ``(len(a), 4)`` whose row i is::

        [ ||a_i||^2,  ||b_i||^2,  ||a_i - b_i||^2,  <a_i, b_i> ]     (GRAD_STATS_COLUMNS)

    (the dot product is there because the cosine needs it). Every pair is read once, products and
    sums are in float64, and all pairs are processed in one parallel pass (CPU) or one
    multi-tensor launch (CUDA); the result does not depend on the thread count. ||a_i - b_i||^2
    is accumulated directly, not derived, so it stays accurate when a_i ~ b_i. Feed the result to
    :func:`l2_distance` and :func:`cosine`. Not differentiable (inputs are detached). Accepts
    float64/32/16 and bfloat16.
    """
    op = "bnext.grad_stats"
    a, b = _tensor_list(op, "a", a), _tensor_list(op, "b", b)
    if len(a) != len(b):
        raise ValueError(f"{op}: a and b must have the same length, got len(a)={len(a)} and len(b)={len(b)}")
    if not a:
        return torch.zeros((0, 4), dtype=torch.float64)
    return _ops.grad_stats(a, b)


def l2_distance(stats: Tensor, total: bool = False) -> Tensor:
    """||a_i - b_i||_2 per row of a :func:`grad_stats` result (shape (n,)), or with ``total=True``
    the distance between the concatenations of all a_i and all b_i (a 0-d tensor)."""
    d2 = stats[:, 2]
    return (d2.sum() if total else d2).clamp_min(0).sqrt()


def cosine(stats: Tensor, total: bool = False) -> Tensor:
    """cos(a_i, b_i) = <a_i, b_i> / (||a_i|| ||b_i||) per row of a :func:`grad_stats` result, or
    with ``total=True`` the cosine between the concatenations of all a_i and all b_i.

    Zero vectors: the cosine of two zero vectors is 1 (they are equal: "the gradient did not
    change", the ideal value of the ICS measure), and the cosine of a zero and a non-zero vector
    is 0. Results are clamped to [-1, 1]."""
    if total:
        stats = stats.sum(0, keepdim=True)
    aa, bb, ab = stats[:, 0], stats[:, 1], stats[:, 3]
    denom = (aa * bb).sqrt()
    cos = torch.where(denom > 0, ab / denom.clamp_min(torch.finfo(stats.dtype).tiny), torch.zeros_like(ab))
    cos = torch.where((aa == 0) & (bb == 0), torch.ones_like(cos), cos).clamp(-1.0, 1.0)
    return cos[0] if total else cos


def multi_axpy(params, direction, etas) -> list:
    """For every tensor x_i of ``params`` and d_i of ``direction`` (same shapes and dtypes, one
    device), returns out_i of shape ``(K, *x_i.shape)`` with::

        out_i[k] = x_i - etas[k] * d_i,      k = 0 .. K-1,  K = len(etas)

    i.e. the K points x - eta_k d of a line search, stacked along a new leading dimension (the
    layout ``torch.func.vmap`` and ``functional_call`` take for batched weights). Each x_i and d_i
    is read once for all K outputs, all tensors in one parallel pass / one CUDA launch; computed
    in float32 (float64 for float64) and rounded once. Outputs are new, contiguous tensors that do
    not require grad. ``etas``: a sequence of numbers or a 1-D tensor.
    """
    op = "bnext.multi_axpy"
    x, d = _tensor_list(op, "params", params), _tensor_list(op, "direction", direction)
    if len(x) != len(d):
        raise ValueError(f"{op}: params and direction must have the same length, got "
                         f"len(params)={len(x)} and len(direction)={len(d)}")
    if isinstance(etas, Tensor):
        if etas.dim() != 1:
            raise ValueError(f"{op}: etas must be a 1-D tensor or a sequence of numbers, got shape {tuple(etas.shape)}")
        etas = etas.tolist()
    try:
        etas = [float(e) for e in etas]
    except (TypeError, ValueError):
        raise TypeError(f"{op}: etas must be a sequence of numbers or a 1-D tensor, got {etas!r}") from None
    if not x:
        return []
    return list(_ops.multi_axpy(x, d, etas))
