"""bnext: fused normalization layers (BatchNorm, noisy BatchNorm, l_p norm) for PyTorch, and the
instrumentation and experiments of Santurkar et al., "How Does Batch Normalization Help
Optimization?" (NeurIPS 2018)."""
import os

import torch

__version__ = "0.1.0"


def _release_and_cuda(version: str, cuda):
    """What decides whether a compiled bnext fits a torch: its public release (2.13.0 of 2.13.0+cpu)
    and its CUDA major version (None for a CPU-only torch). The local tag alone (+cpu, +cu130)
    does not: a CPU build and a CUDA 13 build differ in the second item already."""
    return version.split("+")[0], (None if cuda is None else str(cuda).split(".")[0])


def _rebuild_hint(package_dir: str, built: str) -> str:
    """How to fix a bnext that does not fit the imported torch: rebuild an editable checkout in place
    (a source tree holds setup.py next to the package), or, for an installed wheel, either restore the
    torch it was built for or rebuild bnext from its source against this torch."""
    root = os.path.dirname(package_dir)
    if os.path.exists(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc")):
        return ("Rebuild bnext against this torch (an editable checkout):\n"
                f"    pip install --no-build-isolation --no-deps --force-reinstall -e {root}")
    release = built.split("+")[0]
    return ("Rebuild bnext against this torch from its source (its sdist bnext-*.tar.gz or a "
            "checkout), or install the torch it was built for:\n"
            "    pip install --no-build-isolation --no-deps --force-reinstall <bnext sdist or source dir>\n"
            f"    pip install torch=={release}   (for a CUDA build: from the index of the CUDA version above)")


def _load_extension():
    package_dir = os.path.dirname(os.path.abspath(__file__))
    try:
        from . import _build_config
    except ImportError:
        raise ImportError(
            "bnext's compiled extension is missing (no bnext/_build_config.py, which the build writes beside "
            "it). " + _rebuild_hint(package_dir, torch.__version__).replace("Rebuild", "Build", 1)) from None
    built = _build_config.TORCH_VERSION
    built_cuda = getattr(_build_config, "TORCH_CUDA", None)
    if _release_and_cuda(built, built_cuda) != _release_and_cuda(torch.__version__, torch.version.cuda):
        raise ImportError(
            f"bnext was built against torch {built} (CUDA {built_cuda or 'none'}) but torch {torch.__version__} "
            f"(CUDA {torch.version.cuda or 'none'}) is imported; bnext's extension uses torch's C++ ABI, "
            "which differs between releases and CUDA versions. " + _rebuild_hint(package_dir, built))
    try:
        from . import _C
    except ImportError as e:
        raise ImportError(
            f"bnext's extension failed to load ({e}). It may have been built for another torch or "
            "Python. " + _rebuild_hint(package_dir, built)) from e
    return _C


_C = _load_extension()

from .ops import batch_norm, lp_norm, noisy_batch_norm  # noqa: E402
from .allocator import tune_cpu_allocator  # noqa: E402
from . import nn  # noqa: E402
from .ops import GRAD_STATS_COLUMNS, channel_stats, cosine, grad_stats, l2_distance, multi_axpy  # noqa: E402
from . import landscape  # noqa: E402


def build_info() -> dict:
    """What the loaded extension was compiled with: torch version, CUDA kernels in or not and why,
    and the CUDA architectures (empty for a CPU-only build)."""
    from . import _build_config
    info = dict(_C.build_info())
    info["bnext_version"] = __version__
    # Why the build made these kernels (setup.py decide_cuda), e.g. "torch 2.13.0+cpu is a CPU-only build".
    info["cuda_reason"] = getattr(_build_config, "CUDA_REASON", "")
    info["cuda_archs"] = [a for a in info["cuda_archs"].replace(",", ";").split(";") if a]
    return info


__all__ = ["batch_norm", "build_info", "lp_norm", "nn", "noisy_batch_norm", "tune_cpu_allocator"]
__all__ += ["GRAD_STATS_COLUMNS", "channel_stats", "cosine", "grad_stats", "l2_distance", "landscape", "multi_axpy"]
