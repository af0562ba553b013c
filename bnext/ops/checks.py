"""Argument checks shared by the normalization ops (batch_norm, noisy_batch_norm, lp_norm and the
synchronized layers of bnext.distributed): one place for the messages, each naming the argument.
They run on every forward, so each check touches as few tensor attributes as it can (a Tensor
attribute costs 40-100 ns from Python; small layers run in ~10 us)."""
import math

import torch
from torch import Tensor

_is_batchedtensor = getattr(torch._C._functorch, "is_batchedtensor", None)


def _is_batched(*tensors) -> bool:
    """Whether any of `tensors` is a torch.func.vmap batched tensor."""
    if _is_batchedtensor is None:
        return False
    for t in tensors:
        if t is not None and isinstance(t, Tensor) and _is_batchedtensor(t):
            return True
    return False


# Whether the loaded extension registered CUDA kernels (setup.py builds CPU-only ones when torch or
# nvcc lacks CUDA). Without them a CUDA tensor would reach the dispatcher's "Could not run
# 'bnext::...' with arguments from the 'CUDA' backend"; check_cuda_built says why and how to rebuild.
_CUDA_BUILT = torch._C._dispatch_has_kernel_for_dispatch_key("bnext::batch_norm_forward", "CUDA")


def _no_cuda_kernels_message(op: str, device) -> str:
    from .. import _build_config
    reason = getattr(_build_config, "CUDA_REASON", "unknown")
    return (f"{op}: input is on {device} but this bnext was built without CUDA kernels ({reason}). "
            "Rebuild it with them, with nvcc of torch's CUDA major version on CUDA_HOME:\n"
            "    BNEXT_CUDA=1 pip install --no-build-isolation --no-deps --force-reinstall <bnext source dir or sdist>\n"
            "(add -e for an editable checkout); `pip install -v` shows which kernels the build made.")


def check_cuda_built(op: str, input: Tensor):
    """Raises a RuntimeError naming the fix when `input` is a CUDA tensor and this bnext was built
    without CUDA kernels. Cost on a CUDA build: one global lookup."""
    if _CUDA_BUILT or not input.is_cuda:
        return
    raise RuntimeError(_no_cuda_kernels_message(op, input.device))


def _cuda_kernel_that_explains(name: str):
    """The CUDA kernel a CPU-only build registers for op `name`, so that the raw torch.ops.bnext.* ops
    and the ops without check_cuda_built (grad_stats, multi_axpy, ...) raise its error rather than
    the dispatcher's."""
    def kernel(*args, **kwargs):
        flat = [*args, *kwargs.values(), *[u for a in args if isinstance(a, (list, tuple)) for u in a]]
        device = next((t.device for t in flat if isinstance(t, Tensor)), "cuda")
        raise RuntimeError(_no_cuda_kernels_message(f"bnext.{name}", device))
    return kernel


_cuda_error_library = None
if not _CUDA_BUILT:
    _cuda_error_library = torch.library.Library("bnext", "IMPL")
    # the ops with a CPU kernel of csrc/ (a CUDA build has a CUDA one beside it); the composites
    # (CompositeImplicitAutograd, torch ops only) keep working on any device
    for _name in sorted(torch._C._dispatch_get_all_op_names()):
        if _name.startswith("bnext::") and torch._C._dispatch_has_kernel_for_dispatch_key(_name, "CPU"):
            _op = _name.split("::", 1)[1]
            _cuda_error_library.impl(_op, _cuda_kernel_that_explains(_op.split(".")[0]), "CUDA")


_INPUT_DTYPES = frozenset((torch.float64, torch.float32, torch.float16, torch.bfloat16))
_REDUCED_DTYPES = frozenset((torch.float16, torch.bfloat16))


def check_input_tensor(op: str, input):
    """input must be a float Tensor of shape (N, C, *) with 0 to 3 spatial dims."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}: input must be a Tensor, got {type(input).__name__}")
    dim = input.dim()
    if dim < 2 or dim > 5:
        raise ValueError(f"{op}: input must have shape (N, C, *) with 0 to 3 spatial dims, "
                         f"got a {input.dim()}-d tensor of shape {tuple(input.shape)}")
    if input.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{op}: input must be float64, float32, float16 or bfloat16, got {input.dtype}")
    check_cuda_built(op, input)


def check_norm_args(op: str, input, channel_args: dict, eps, momentum):
    """Validates the arguments shared by the normalization ops; raises TypeError/ValueError naming
    the offending argument. channel_args: name -> a per-channel vector (C,) of input's dtype (or
    float32 for float16/bfloat16 input) on input's device, or None."""
    check_input_tensor(op, input)
    shape = (input.shape[1],)
    dtype = input.dtype
    input_cpu = input.is_cpu
    for name, t in channel_args.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.shape != shape:
            raise ValueError(f"{op}: {name} must have shape ({shape[0]},) (one value per channel of input "
                             f"{tuple(input.shape)}), got {tuple(t.shape)}")
        if not (input_cpu and t.is_cpu) and t.device != input.device:
            raise ValueError(f"{op}: {name} is on {t.device} but input is on {input.device}")
        t_dtype = t.dtype
        if t_dtype is not dtype and not (t_dtype is torch.float32 and dtype in _REDUCED_DTYPES):
            allowed = (dtype,) if dtype not in _REDUCED_DTYPES else (dtype, torch.float32)
            raise TypeError(f"{op}: {name} must have dtype {' or '.join(map(str, allowed))} "
                            f"to match input ({dtype}), got {t_dtype}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(momentum, (int, float)) or not (0.0 <= momentum <= 1.0):
        raise ValueError(f"{op}: momentum must be a number in [0, 1], got {momentum!r}")


def check_running_stats(op: str, input: Tensor, running_mean, running_second, second_name: str,
                        training) -> int:
    """The running statistics (running_mean and `second_name`: running_var or running_norm) come
    together or not at all, eval mode needs them, and training needs more than one value per
    channel. Returns that count, M = numel / C (0 for an empty batch or C = 0)."""
    if (running_mean is None) != (running_second is None):
        raise ValueError(f"{op}: running_mean and {second_name} must both be given or both be None")
    count = input.numel() // max(input.shape[1], 1)
    if training and count == 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, "
                         f"got input of shape {tuple(input.shape)}")
    if not training and running_mean is None:
        raise ValueError(f"{op}: running_mean and {second_name} are required when training=False")
    return count
