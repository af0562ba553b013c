"""Drop-in normalization modules and model conversion.

bnext.nn.BatchNorm1d/2d/3d subclass torch's classes: same constructor arguments, parameters,
buffers and state_dict keys (num_batches_tracked included), so checkpoints move freely between
torch and bnext, and code that tests isinstance(m, torch.nn.BatchNorm2d) keeps working. Only
forward differs: it runs bnext's fused kernels, optionally with a fused ReLU.
"""
from typing import Optional

import torch
from torch import Tensor

from .ops import batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert"]


class _FusedBatchNormMixin:
    """forward() of torch's _BatchNorm, routed to bnext.batch_norm."""

    def _init_activation(self, activation: Optional[str]):
        if activation not in (None, "relu"):
            raise ValueError(f"{type(self).__name__}: activation must be None or 'relu', got {activation!r}")
        self.activation = activation

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            # momentum=None: cumulative moving average, as in torch.
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight, self.bias, use_batch_stats, factor, self.eps, activation=self.activation)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", activation={self.activation!r}" if self.activation else "")


class BatchNorm1d(_FusedBatchNormMixin, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on bnext kernels; ``activation="relu"`` fuses a ReLU."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, activation: Optional[str] = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_activation(activation)


class BatchNorm2d(_FusedBatchNormMixin, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on bnext kernels; ``activation="relu"`` fuses a ReLU."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, activation: Optional[str] = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_activation(activation)


class BatchNorm3d(_FusedBatchNormMixin, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on bnext kernels; ``activation="relu"`` fuses a ReLU."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, activation: Optional[str] = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_activation(activation)


_TORCH_BN = {torch.nn.BatchNorm1d: 1, torch.nn.BatchNorm2d: 2, torch.nn.BatchNorm3d: 3}
_BNEXT_BN = {BatchNorm1d: 1, BatchNorm2d: 2, BatchNorm3d: 3}
_TARGETS = {"bn": {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d},
            "torch": {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}}


def _spatial_dims(module) -> Optional[int]:
    for table in (_BNEXT_BN, _TORCH_BN):  # bnext classes first: they subclass torch's
        if type(module) in table:
            return table[type(module)]
    return None


def _convert_one(module, to: str):
    dims = _spatial_dims(module)
    if dims is None:
        return None
    if to == "none":  # the unnormalized network
        return torch.nn.Identity()
    cls = _TARGETS[to][dims]
    if type(module) is cls:
        return module
    ref = module.weight if module.weight is not None else module.running_mean
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = cls(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
              track_running_stats=module.track_running_stats, **factory)
    new.load_state_dict(module.state_dict())
    new.train(module.training)
    if module.weight is not None:
        new.weight.requires_grad_(module.weight.requires_grad)
        new.bias.requires_grad_(module.bias.requires_grad)
    return new


def convert(model: torch.nn.Module, to: str = "bn") -> torch.nn.Module:
    """Returns `model` with every BatchNorm layer replaced, parameters and buffers kept.

    to="bn": torch.nn.BatchNorm1d/2d/3d -> bnext.nn.BatchNorm1d/2d/3d.
    to="torch": bnext's BatchNorm layers -> torch's.
    to="none": every BatchNorm layer -> torch.nn.Identity (the unnormalized network).
    The model is changed in place (and returned); a model that is itself a BatchNorm layer is
    returned as a new module.
    """
    if to not in _TARGETS and to != "none":
        raise ValueError(f"bnext.nn.convert: to must be one of {sorted(_TARGETS) + ['none']}, got {to!r}")
    replaced = _convert_one(model, to)
    if replaced is not None:
        return replaced
    for name, child in model.named_children():
        new = convert(child, to)
        if new is not child:
            setattr(model, name, new)
    return model
