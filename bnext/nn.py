"""Drop-in normalization modules and model conversion.

bnext.nn.BatchNorm1d/2d/3d (and SyncBatchNorm) subclass torch's classes: same constructor
arguments (bias= and the device/dtype factory keywords included), parameters, buffers, state_dict
keys (num_batches_tracked included) and repr, so checkpoints move freely between torch and bnext,
and code that tests isinstance(m, torch.nn.BatchNorm2d) keeps working. Only forward differs: it
runs bnext's fused kernels, optionally with a fused ReLU.
"""
import inspect
import math
import sys
from typing import Optional

import torch
from torch import Tensor

from .ops.batch_norm import batch_norm
from .ops.lp_norm import check_p, lp_norm
from .ops.noisy_batch_norm import _check_noise_args, noisy_batch_norm
from . import distributed as _dist

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "NoisyBatchNorm1d", "NoisyBatchNorm2d",
           "NoisyBatchNorm3d", "NoisySyncBatchNorm", "LpNorm1d", "LpNorm2d", "LpNorm3d", "SyncLpNorm", "convert"]

# torch's BatchNorm takes bias= (an affine weight without a bias) in recent releases (2.13 does), not
# necessarily in every torch pyproject.toml allows; with one that does not, the modules still accept
# bias=False and drop the bias themselves (the repr then has no bias= field, like that torch's).
_TORCH_TAKES_BIAS = "bias" in inspect.signature(torch.nn.modules.batchnorm._NormBase.__init__).parameters


def _bias_kwargs(bias: bool) -> dict:
    return {"bias": bool(bias)} if _TORCH_TAKES_BIAS else {}


def _drop_bias_if_unsupported(module, bias: bool):
    if not _TORCH_TAKES_BIAS and not bias and module.affine:
        module.register_parameter("bias", None)


class _NormLayerMixin:
    """What every bnext normalization layer shares: its `process_group` and the start of forward().

    process_group (bnext.distributed): None, or a torch.distributed.ProcessGroup, checked when set.
    Held by reference so that copy.deepcopy(model) shares the group (a ProcessGroup cannot be copied)
    and pickling drops it; it is not part of the state_dict."""

    @property
    def process_group(self):
        ref = self.__dict__.get("_process_group_ref")
        return None if ref is None else ref.group

    @process_group.setter
    def process_group(self, group):
        _dist.check_process_group(type(self).__name__, group)
        self.__dict__["_process_group_ref"] = _dist.GroupRef(group)

    def _forward_prologue(self, input: Tensor, running_second: Optional[Tensor]):
        """torch's _BatchNorm.forward up to the kernel call, for a layer whose second running statistic
        is `running_second` (running_var, or running_norm): checks the input rank, counts the batch in
        training, and returns (factor, running_mean, running_second, use_batch_stats):
            factor           the momentum of this step's running update; momentum=None: 1 / batches
                             tracked, a cumulative moving average, as in torch
            running_*        the buffers to read (eval) or update (training); None in training
                             without track_running_stats
            use_batch_stats  training, or eval without running statistics"""
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and running_second is None)
        if self.training and not self.track_running_stats:
            return factor, None, None, use_batch_stats
        return factor, self.running_mean, running_second, use_batch_stats


class _FusedBatchNormMixin(_NormLayerMixin):
    """torch's _BatchNorm with forward() routed to bnext.batch_norm (or bnext.distributed's
    synchronized version in training with a process group), ``activation="relu"`` fused into it."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias: bool = True, activation: Optional[str] = None,
                 process_group=None):
        # Keywords, not positions: torch's SyncBatchNorm takes process_group where the others take device.
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **_bias_kwargs(bias))
        _drop_bias_if_unsupported(self, bias)
        if activation not in (None, "relu"):
            raise ValueError(f"{type(self).__name__}: activation must be None or 'relu', got {activation!r}")
        self.activation = activation
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        factor, running_mean, running_var, use_batch_stats = self._forward_prologue(input, self.running_var)
        if _dist.is_synchronized(self.process_group, self.training):
            return _dist.sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, factor, self.eps,
                                         self.activation, self.process_group)
        return batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor,
                          self.eps, activation=self.activation)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", activation={self.activation!r}" if self.activation else "")


class BatchNorm1d(_FusedBatchNormMixin, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on bnext kernels, (N, C) or (N, C, L) input; ``activation="relu"`` fuses a ReLU."""


class BatchNorm2d(_FusedBatchNormMixin, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on bnext kernels, (N, C, H, W) input; ``activation="relu"`` fuses a ReLU."""


class BatchNorm3d(_FusedBatchNormMixin, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on bnext kernels, (N, C, D, H, W) input; ``activation="relu"`` fuses a ReLU."""


class SyncBatchNorm(_FusedBatchNormMixin, torch.nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm on bnext kernels: the same constructor, state and repr, input (N, C, *)
    of any rank >= 2, ``activation="relu"`` fuses a ReLU. What convert() makes of a torch
    SyncBatchNorm.

    process_group follows bnext's rule (bnext.distributed), not torch's: None means LOCAL statistics,
    where torch's SyncBatchNorm takes None to mean the default group at call time; convert() gives a
    converted layer the group torch would have used."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, bias: bool = True,
                 activation: Optional[str] = None):
        # torch.nn.SyncBatchNorm's order of arguments: process_group before device and dtype.
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         activation=activation, process_group=process_group)


class _NoisyBatchNormMixin(_NormLayerMixin):
    """Noisy BatchNorm (the paper's Algorithm 1, bnext/experiments/PROTOCOL.md, section 'Noisy
    BatchNorm') on top of torch's _BatchNorm state: torch's arguments, parameters and state_dict,
    plus noise_mean, noise_std, noise_mean_spread, noise_std_spread (see bnext.noisy_batch_norm), an
    optional torch.Generator for the noise seeds, and process_group (synchronized statistics across
    ranks in training, see bnext.distributed; None: local). In training, bnext.noisy_batch_norm
    (batch statistics, affine, then s * a + m with fresh noise per call); in eval, plain BatchNorm
    (no noise)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias: bool = True, noise_mean=0.5, noise_std=1.25,
                 noise_mean_spread=0.1, noise_std_spread=0.1, generator: Optional[torch.Generator] = None,
                 process_group=None):
        # Keywords, not positions: torch's SyncBatchNorm takes process_group where the others take device.
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **_bias_kwargs(bias))
        _drop_bias_if_unsupported(self, bias)
        self.process_group = process_group
        _check_noise_args(type(self).__name__, noise_mean, noise_std, noise_mean_spread, noise_std_spread)
        self.noise_mean, self.noise_std = float(noise_mean), float(noise_std)
        self.noise_mean_spread, self.noise_std_spread = float(noise_mean_spread), float(noise_std_spread)
        self.generator = generator

    def forward(self, input: Tensor) -> Tensor:
        factor, running_mean, running_var, use_batch_stats = self._forward_prologue(input, self.running_var)
        if not self.training:
            return batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor,
                              self.eps)
        if _dist.is_synchronized(self.process_group, True):
            return _dist.sync_noisy_batch_norm(
                input, running_mean, running_var, self.weight, self.bias, factor, self.eps,
                [self.noise_mean, self.noise_std, self.noise_mean_spread, self.noise_std_spread],
                self.generator, self.process_group)
        return noisy_batch_norm(
            input, running_mean, running_var, self.weight, self.bias, True, factor, self.eps, self.noise_mean,
            self.noise_std, self.noise_mean_spread, self.noise_std_spread, self.generator)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", noise_mean={self.noise_mean}, noise_std={self.noise_std}, "
                f"noise_mean_spread={self.noise_mean_spread}, noise_std_spread={self.noise_std_spread}")


class NoisyBatchNorm1d(_NoisyBatchNormMixin, torch.nn.BatchNorm1d):
    """Noisy BatchNorm (bnext.noisy_batch_norm) of (N, C) or (N, C, L) input: torch.nn.BatchNorm1d's
    arguments and state, plus the noise (noise_mean, noise_std, noise_mean_spread, noise_std_spread,
    generator) and process_group."""


class NoisyBatchNorm2d(_NoisyBatchNormMixin, torch.nn.BatchNorm2d):
    """Noisy BatchNorm (bnext.noisy_batch_norm) of (N, C, H, W) input: torch.nn.BatchNorm2d's
    arguments and state, plus the noise (noise_mean, noise_std, noise_mean_spread, noise_std_spread,
    generator) and process_group."""


class NoisyBatchNorm3d(_NoisyBatchNormMixin, torch.nn.BatchNorm3d):
    """Noisy BatchNorm (bnext.noisy_batch_norm) of (N, C, D, H, W) input: torch.nn.BatchNorm3d's
    arguments and state, plus the noise (noise_mean, noise_std, noise_mean_spread, noise_std_spread,
    generator) and process_group."""


class NoisySyncBatchNorm(_NoisyBatchNormMixin, torch.nn.SyncBatchNorm):
    """Noisy BatchNorm (bnext.noisy_batch_norm) of (N, C, *) input of any rank >= 2, like
    torch.nn.SyncBatchNorm: what convert(to="noisy_bn") makes of one. torch.nn.SyncBatchNorm's state;
    the arguments of the other NoisyBatchNorm layers (process_group is keyword-only, after the noise)."""


class _LpNorm(_NormLayerMixin, torch.nn.Module):
    """l_p normalization per channel (bnext.lp_norm), p in {1, 2, inf}: like a BatchNorm module
    (weight, bias, running_mean, num_batches_tracked, momentum=None for a cumulative average,
    track_running_stats), with running_norm (init 1) in place of running_var. A subclass names the
    input ranks it takes (_ranks) and how its error message says them (_expected)."""

    _ranks, _expected = (), ""

    def __init__(self, num_features: int, p, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True, process_group=None):
        super().__init__()
        name = type(self).__name__
        self.p = check_p(name, p)
        self.process_group = process_group
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = torch.nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = torch.nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_norm", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_norm", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_norm.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            torch.nn.init.ones_(self.weight)
            if self.bias is not None:
                torch.nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor):
        if input.dim() not in self._ranks:
            raise ValueError(f"{type(self).__name__}: expected {self._expected} input, got {input.dim()}D input")

    def forward(self, input: Tensor) -> Tensor:
        factor, running_mean, running_norm, use_batch_stats = self._forward_prologue(input, self.running_norm)
        if _dist.is_synchronized(self.process_group, self.training):
            return _dist.sync_lp_norm(input, self.p, running_mean, running_norm, self.weight, self.bias, factor,
                                      self.eps, self.process_group)
        return lp_norm(input, self.p, running_mean, running_norm, self.weight, self.bias, use_batch_stats, factor,
                       self.eps)

    def extra_repr(self) -> str:
        p = "inf" if math.isinf(self.p) else int(self.p)
        bias = f"bias={self.bias is not None}, " if _TORCH_TAKES_BIAS else ""
        return (f"{self.num_features}, p={p}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"{bias}track_running_stats={self.track_running_stats}")


class LpNorm1d(_LpNorm):
    """l_p normalization of (N, C) or (N, C, L) input (bnext.lp_norm)."""
    _ranks, _expected = (2, 3), "2D or 3D"


class LpNorm2d(_LpNorm):
    """l_p normalization of (N, C, H, W) input (bnext.lp_norm)."""
    _ranks, _expected = (4,), "4D"


class LpNorm3d(_LpNorm):
    """l_p normalization of (N, C, D, H, W) input (bnext.lp_norm)."""
    _ranks, _expected = (5,), "5D"


class SyncLpNorm(_LpNorm):
    """l_p normalization of (N, C, *) input of any rank >= 2, like torch.nn.SyncBatchNorm: what
    convert(to="l1"/"l2"/"linf") makes of one (process_group None: local statistics)."""
    _ranks, _expected = range(2, sys.maxsize), "at least 2D"


# Layers of torch.nn.SyncBatchNorm's kind take input of any rank >= 2; the others fix 1d/2d/3d.
_ANY_RANK = "any rank"
_TORCH_BN = {torch.nn.BatchNorm1d: 1, torch.nn.BatchNorm2d: 2, torch.nn.BatchNorm3d: 3,
             torch.nn.SyncBatchNorm: _ANY_RANK}
_BNEXT_BN = {BatchNorm1d: 1, BatchNorm2d: 2, BatchNorm3d: 3, SyncBatchNorm: _ANY_RANK}
_NOISY = {NoisyBatchNorm1d: 1, NoisyBatchNorm2d: 2, NoisyBatchNorm3d: 3, NoisySyncBatchNorm: _ANY_RANK}
_LP = {LpNorm1d: 1, LpNorm2d: 2, LpNorm3d: 3, SyncLpNorm: _ANY_RANK}
_TARGETS = {"bn": {v: k for k, v in _BNEXT_BN.items()},
            "torch": {v: k for k, v in _TORCH_BN.items()},
            "noisy_bn": {v: k for k, v in _NOISY.items()},
            **{k: {v: c for c, v in _LP.items()} for k in ("l1", "l2", "linf")}}
_TARGET_P = {"l1": 1.0, "l2": 2.0, "linf": math.inf}
_ALL_TARGETS = sorted(list(_TARGETS) + ["none"])


class _CannotConvert(ValueError):
    pass


def _refuse(where: str, module, why: str):
    raise _CannotConvert(f"bnext.nn.convert: cannot convert {where} ({type(module).__name__}): {why}")


def _spatial_dims(module, where: str):
    """1, 2, 3 or _ANY_RANK for a normalization layer convert() replaces, None for any other module;
    raises for a BatchNorm it cannot convert."""
    if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin) and \
            isinstance(module, torch.nn.modules.batchnorm._NormBase):
        _refuse(where, module, "a lazy layer is not materialized yet (num_features is unknown until its first "
                "forward); run the model once on an example batch, then convert (it is then a "
                f"{module.cls_to_become.__name__})")
    # bnext classes first (they subclass torch's), then anything that subclasses torch's BatchNorm.
    for table in (_NOISY, _LP, _BNEXT_BN, _TORCH_BN):
        if type(module) in table:
            return table[type(module)]
    for cls, dims in _TORCH_BN.items():
        if isinstance(module, cls):
            return dims
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        _refuse(where, module, "a BatchNorm subclass that is none of torch.nn.BatchNorm1d/2d/3d or SyncBatchNorm, so "
                "the input rank its replacement must check is unknown")
    return None


def _group_kept(module):
    """The group a layer of SyncBatchNorm's kind synchronizes over now: a bnext layer's own (None:
    local); torch's SyncBatchNorm takes None to mean the default group, if torch.distributed is
    initialized."""
    if isinstance(module, _NormLayerMixin) or module.process_group is not None:
        return module.process_group
    dist = torch.distributed
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def _convert_one(module, to: str, process_group, where: str):
    if to == "none" and isinstance(module, torch.nn.modules.batchnorm._NormBase) and \
            isinstance(module, torch.nn.modules.lazy.LazyModuleMixin):
        return torch.nn.Identity()  # nothing of a lazy layer's state survives removal anyway
    dims = _spatial_dims(module, where)
    if dims is None:
        return None
    activation = getattr(module, "activation", None)
    if to == "none":  # the unnormalized network; a fused ReLU stays a ReLU
        return torch.nn.ReLU() if activation == "relu" else torch.nn.Identity()
    cls = _TARGETS[to][dims]
    if activation is not None and not issubclass(cls, _FusedBatchNormMixin):
        _refuse(where, module, f"activation={activation!r} is fused into it and {cls.__name__} has no fused "
                "activation; convert a model with the ReLU as its own module")
    group = process_group
    if dims == _ANY_RANK and process_group is None:
        group = _group_kept(module)
    p = _TARGET_P.get(to)
    if type(module) is cls and (p is None or module.p == p):
        if to != "torch":
            module.process_group = group
        return module
    ref = module.weight if module.weight is not None else module.running_mean
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    args = dict(eps=module.eps, momentum=module.momentum, affine=module.affine,
                track_running_stats=module.track_running_stats, **factory)
    if module.affine:
        args.update(_bias_kwargs(module.bias is not None) if cls in _TORCH_BN else {"bias": module.bias is not None})
    if to != "torch" or dims == _ANY_RANK:
        args["process_group"] = group
    if activation is not None:
        args["activation"] = activation
    new = cls(module.num_features, p, **args) if p is not None else cls(module.num_features, **args)
    if cls in _TORCH_BN:
        _drop_bias_if_unsupported(new, module.bias is not None)
    # Keep the state that maps: affine parameters, running mean, batch count, and the second running
    # statistic only between layers of the same kind (variance, or an l_p norm of the same p).
    old_state, state = module.state_dict(), new.state_dict()
    same_second = (isinstance(module, _LpNorm) == isinstance(new, _LpNorm)) and getattr(module, "p", None) == p
    for key in state:
        if key in ("running_var", "running_norm") and not same_second:
            continue
        if key in old_state and old_state[key].shape == state[key].shape:
            state[key] = old_state[key]
    new.load_state_dict(state)
    new.train(module.training)
    for name in ("weight", "bias"):
        old_p, new_p = getattr(module, name), getattr(new, name)
        if old_p is not None and new_p is not None:
            new_p.requires_grad_(old_p.requires_grad)
    return new


def convert(model: torch.nn.Module, to: str = "bn", process_group=None) -> torch.nn.Module:
    """Returns `model` with every normalization layer replaced: torch's BatchNorm1d/2d/3d and
    SyncBatchNorm (and subclasses), and bnext's BatchNorm, NoisyBatchNorm and LpNorm layers.

    to="bn":       bnext.nn.BatchNorm1d/2d/3d, SyncBatchNorm
    to="torch":    torch.nn.BatchNorm1d/2d/3d, SyncBatchNorm
    to="noisy_bn": bnext.nn.NoisyBatchNorm1d/2d/3d, NoisySyncBatchNorm (paper's noise constants)
    to="l1" / "l2" / "linf": bnext.nn.LpNorm1d/2d/3d, SyncLpNorm with p = 1, 2, inf
    to="none":     torch.nn.Identity (the unnormalized network; torch.nn.ReLU for a layer with a fused ReLU)
    A layer keeps its rank: 1d/2d/3d stay 1d/2d/3d, and torch.nn.SyncBatchNorm (any input rank >= 2)
    becomes the Sync* layer of the target kind, and back.
    Kept where it maps: weight and bias (also an affine weight without a bias, bias=False), running_mean,
    num_batches_tracked, eps, momentum (None included), affine, track_running_stats, train/eval mode,
    requires_grad, a fused activation (only bnext's BatchNorm has one); running_var is kept between
    BatchNorm kinds and running_norm between l_p layers of the same p (otherwise they start at 1).
    The model is changed in place (and returned); a model that is itself a normalization layer is
    returned as a new module (or itself when it is already of the target kind).
    process_group: every bnext layer of the result gets it (like
    torch.nn.SyncBatchNorm.convert_sync_batchnorm): in training, with a group of world size > 1, the
    statistics are those of the global batch (bnext.distributed). None (default) makes the 1d/2d/3d
    layers local and lets a layer of SyncBatchNorm's kind keep the group it synchronizes over now (for
    torch's SyncBatchNorm with process_group=None: the default group if torch.distributed is
    initialized at conversion, else none); to="torch" gives a SyncBatchNorm back its group. A group
    cannot be given with to="torch" or "none".
    Raises ValueError naming the layer for what it cannot convert: a lazy BatchNorm before its first
    forward (to="none" excepted), a fused ReLU into a target without one, a BatchNorm subclass of
    unknown rank. Other normalizations (LayerNorm, GroupNorm, InstanceNorm) are not BatchNorm and are
    left as they are.
    """
    if to not in _ALL_TARGETS:
        raise ValueError(f"bnext.nn.convert: to must be one of {_ALL_TARGETS}, got {to!r}")
    _dist.check_process_group("bnext.nn.convert", process_group)
    if process_group is not None and to in ("torch", "none"):
        raise ValueError(f"bnext.nn.convert: process_group must be None with to={to!r} (only bnext layers "
                         "synchronize; use torch.nn.SyncBatchNorm.convert_sync_batchnorm for torch's)")
    return _convert(model, to, process_group, "the model")


def _convert(model, to, process_group, where):
    replaced = _convert_one(model, to, process_group, where)
    if replaced is not None:
        return replaced
    for name, child in model.named_children():
        path = name if where == "the model" else f"{where[1:-1]}.{name}"
        new = _convert(child, to, process_group, f"'{path}'")
        if new is not child:
            setattr(model, name, new)
    return model
