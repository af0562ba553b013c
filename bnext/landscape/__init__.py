"""Optimization-landscape measurements of Santurkar et al., "How Does Batch Normalization Help
Optimization?" (NeurIPS 2018), for any torch.nn.Module.

    ics                     internal covariate shift, Definition 2.1 (per layer: ||G - G'||, cos(G, G'))
    line_probe              loss and gradient along -eta * g (Sec. 3.2): loss range, gradient
                            predictiveness, effective beta-smoothness
    hessian_top_eigenvalue  largest-magnitude Hessian eigenvalue (power iteration on HVPs)
    hessian_trace           Hutchinson estimate of tr(H)
    track_bn_gradients,     Theorem 4.1 per BatchNorm channel:
    bn_gradient_identity    ||grad_y L||^2 = (gamma^2/sigma^2)(||g||^2 - <1,g>^2/m - <g,yhat>^2/m)

Conventions shared by every function:
- ``loss_fn(model, batch) -> scalar Tensor`` computes the training loss exactly as the training
  step does (e.g. ``lambda m, b: F.cross_entropy(m(b[0]), b[1])``); ``batch`` is passed through.
  Or, as in PyHessian and loss-landscape: ``criterion=`` (keyword) with ``batch = (inputs, targets)``,
  the loss being ``criterion(model(inputs), targets)``, e.g. ``ics(model, batch=(x, y),
  criterion=F.cross_entropy, lr=0.1)``. Give exactly one; a criterion passed as ``loss_fn`` (a
  torch.nn loss module or a torch.nn.functional function, or one that fails on the model as its
  first argument) raises a TypeError that shows both forms.
- "The parameters" are the model's trainable parameters (``requires_grad``), in
  ``named_parameters()`` order.
- The model is evaluated in its current mode (train mode: BatchNorm uses batch statistics), through
  ``torch.func.functional_call`` with copies of its buffers, so running statistics and
  ``num_batches_tracked`` never change.
- Nothing is left behind: parameters, their ``.grad``, buffers, optimizer state and the random
  number generators (CPU, CUDA, and any ``torch.Generator`` held by a module) are bit-identical
  afterwards, so a training run that measures at every step follows exactly the trajectory of
  one that does not. Random draws inside the forward (dropout, noisy BN) are replayed: every pass
  a measurement makes sees the same draws as the first, i.e. G and G' are gradients of the same
  stochastic function.
"""
# One module per measurement on a small shared core:
#   _core.py            loss conventions, functional evaluation, generators, K points batched or sequential
#   covariate_shift.py  ics (Definition 2.1); _call_tracer.py serves its shared-prefix sweep
#   line_probes.py      line_probe (Sec. 3.2)
#   curvature.py        hessian_top_eigenvalue, hessian_trace
#   theorem41.py        track_bn_gradients, bn_gradient_identity (Theorem 4.1)
from ._core import LossFn
from .covariate_shift import LAYER_TYPES, LayerICS, _shared_prefix_sweep, ics
from .curvature import hessian_top_eigenvalue, hessian_trace
from .line_probes import LineProbe, line_probe
from .theorem41 import BNGradientIdentity, BNGradientTracker, bn_gradient_identity, track_bn_gradients

__all__ = ["LayerICS", "LineProbe", "BNGradientIdentity", "BNGradientTracker", "ics", "line_probe",
           "hessian_top_eigenvalue", "hessian_trace", "track_bn_gradients", "bn_gradient_identity"]
