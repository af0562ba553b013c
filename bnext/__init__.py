"""bnext: fused normalization layers (BatchNorm, noisy BatchNorm, l_p norm) for PyTorch, and the
instrumentation and experiments of Santurkar et al., "How Does Batch Normalization Help
Optimization?" (NeurIPS 2018)."""
import torch

__version__ = "0.1.0"


def _load_extension():
    try:
        from . import _build_config
    except ImportError:
        raise ImportError(
            "bnext's compiled extension is missing: build it with\n"
            "    pip install --no-build-isolation -e .\n"
            "from the bnext source directory (torch must already be installed).") from None
    if _build_config.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"bnext was built against torch {_build_config.TORCH_VERSION} but torch {torch.__version__} "
            "is imported. Rebuild bnext against this torch:\n"
            "    pip install --no-build-isolation --force-reinstall --no-deps -e .")
    try:
        from . import _C
    except ImportError as e:
        raise ImportError(
            f"bnext's extension failed to load ({e}). It may have been built for another torch or "
            "Python; rebuild with: pip install --no-build-isolation --force-reinstall --no-deps -e .") from e
    return _C


_C = _load_extension()

from .ops import batch_norm, lp_norm, noisy_batch_norm  # noqa: E402
from .allocator import tune_cpu_allocator  # noqa: E402
from . import nn  # noqa: E402
from .ops import GRAD_STATS_COLUMNS, channel_stats, cosine, grad_stats, l2_distance, multi_axpy  # noqa: E402
from . import landscape  # noqa: E402


def build_info() -> dict:
    """What the loaded extension was compiled with: torch version, CUDA kernels in or not, and the
    CUDA architectures (empty for a CPU-only build)."""
    info = dict(_C.build_info())
    info["bnext_version"] = __version__
    info["cuda_archs"] = [a for a in info["cuda_archs"].replace(",", ";").split(";") if a]
    return info


__all__ = ["batch_norm", "build_info", "lp_norm", "nn", "noisy_batch_norm", "tune_cpu_allocator"]
__all__ += ["GRAD_STATS_COLUMNS", "channel_stats", "cosine", "grad_stats", "l2_distance", "landscape", "multi_axpy"]
