"""Premetrics ``d(pred, target)`` returning a per-sample loss ``[B]``."""

from __future__ import annotations

import math

from torch import Tensor

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


def ict_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber constant ``0.00054·√D``."""
    return 0.00054 * math.sqrt(dim)


def premetric(name: str):
    """A registered premetric by name (``l2``, ``pseudo_huber``, ...)."""
    return PREMETRICS.get(name)
