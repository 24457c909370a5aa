"""Premetrics ``d(pred, target)`` returning a per-sample loss ``[B]``.

Perceptual premetrics (``perceptual``, ``lpips_huber``) take a frozen perceptual distance
``net(a, b) -> [B]`` as an argument (``net=``); the networks themselves (``lpips``, ``digits``,
``random_conv``) live above the core, in :mod:`flowdistill.models.perceptual`
(:data:`~flowdistill.models.perceptual.PERCEPTUAL_NETS`,
:func:`~flowdistill.models.perceptual.build_perceptual`).
"""

from __future__ import annotations

from torch import Tensor, nn

from flowdistill.core.broadcast import bcast
from flowdistill.core.registry import Registry

PREMETRICS: Registry = Registry("loss")


def _flat(d: Tensor) -> Tensor:
    return d.reshape(d.shape[0], -1)


@PREMETRICS.register("l2")
def l2(pred: Tensor, target: Tensor, **_) -> Tensor:
    """Mean squared error per sample: ``‖pred − target‖² / D``."""
    return _flat(pred - target).pow(2).mean(dim=1)


@PREMETRICS.register("pseudo_huber")
def pseudo_huber(pred: Tensor, target: Tensor, c: float | None = None, **_) -> Tensor:
    """Pseudo-Huber ``(√(‖d‖² + c²) − c) / D`` per sample, ``c = 0.00054·D`` by default.

    This is the form of rfpp's released code ("Improving the Training of Rectified Flows",
    arXiv 2405.20320); iCT's consistency loss uses ``c = 0.00054·√D`` instead (pass ``c``).
    For small ``‖d‖`` it is ``‖d‖²/(2cD)``; for large, ``‖d‖/D``.
    """
    d = _flat(pred - target)
    D = d.shape[1]
    c = 0.00054 * D if c is None else c
    return (d.pow(2).sum(dim=1) + c * c).sqrt().sub(c) / D


@PREMETRICS.register("pseudo_huber_elementwise")
def pseudo_huber_elementwise(pred: Tensor, target: Tensor, c: float | None = None, **_) -> Tensor:
    """Elementwise pseudo-Huber ``mean_i(√((pred_i − target_i)² + c²) − c)`` per sample,
    ``c = 0.001`` by default.

    The form of PCM's and LCM's released training code (METHODS.md §3): each element is robustified
    on its own, unlike :func:`pseudo_huber` (rfpp), which takes the norm of the whole sample first.
    For ``|d_i| ≪ c`` it is ``d_i²/(2c)`` per element; for ``|d_i| ≫ c``, ``|d_i|`` (an L1 loss).
    """
    c = 0.001 if c is None else float(c)
    if not c > 0:
        raise ValueError(f"pseudo_huber_elementwise needs c > 0, got {c}")
    d = _flat(pred - target)
    return (d.pow(2) + c * c).sqrt().sub(c).mean(dim=1)


@PREMETRICS.register("perceptual")
def perceptual(pred: Tensor, target: Tensor, net: nn.Module | None = None, **_) -> Tensor:
    """Perceptual distance ``P(pred, target)`` of two data-space samples (``net`` from
    :func:`flowdistill.models.perceptual.build_perceptual`); InstaFlow's "LPIPS" stage with a
    pluggable network."""
    if net is None:
        raise ValueError("loss 'perceptual' needs a perceptual net (net=build_perceptual(...))")
    return net(pred, target)


@PREMETRICS.register("lpips_huber")
def lpips_huber(pred: Tensor, target: Tensor, x_t: Tensor | None = None, t: Tensor | None = None,
                net: nn.Module | None = None, c: float | None = None, **_) -> Tensor:
    """rfpp's LPIPS-Huber loss on a velocity prediction (arXiv 2405.20320, §"Improved training"):

        (1 − t)·PseudoHuber(v_θ, ε − x) + P(x̂, x),     x̂ = x_t − t·v_θ,

    where ``pred = v_θ(x_t, t)``, ``target = ε − x`` and ``P`` is a perceptual distance (LPIPS in
    the paper; any :data:`flowdistill.models.perceptual.PERCEPTUAL_NETS` entry here). The clean
    sample is recovered from the target, ``x = x_t − t·(ε − x)`` on the linear path, so only ``x_t``
    and ``t`` are extra.
    (rfpp's CIFAR-10 variant divides the LPIPS term by ``t``; not done here.)
    """
    if x_t is None or t is None or net is None:
        raise ValueError("loss 'lpips_huber' needs x_t, t and a perceptual net (the reflow distiller "
                         "passes them); plain flow matching cannot use it")
    tc = bcast(t, pred)
    x_hat = x_t - tc * pred
    x = x_t - tc * target
    return (1 - t.to(pred.dtype)) * pseudo_huber(pred, target, c=c) + net(x_hat, x)


def premetric(name: str):
    """A registered premetric by name (``l2``, ``pseudo_huber``, ...)."""
    return PREMETRICS.get(name)
