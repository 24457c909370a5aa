"""Affine probability paths ``x_t = α(t)·x + σ(t)·ε`` with ``t`` the noise level.

``α(0) = 1, σ(0) = 0`` (data) and ``α(1) = 0, σ(1) = 1`` (noise). A path owns α, σ, their
time derivatives and the conversions between velocity, data (x0) and noise (ε) predictions:

    v  = α'·x0 + σ'·ε
    x0 = (σ'·x_t − σ·v) / (σ'·α − σ·α')
    ε  = (α·v − α'·x_t) / (σ'·α − σ·α')

A discrete DDPM/VP teacher is not a path here: its adapter
(:class:`flowdistill.integrations.diffusers.adapters.DDPMUNetAdapter`) maps it onto the linear
path exactly by the change of variables ``x_lin = x_vp/(α_k + σ_k)``, ``t = σ_k/(α_k + σ_k)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowdistill import kernels
from flowdistill.core.broadcast import bcast
from flowdistill.core.registry import Registry


class AffinePath:
    """Base class: subclasses define ``alpha``, ``sigma``, ``d_alpha`` and ``d_sigma`` on ``t [B]``."""

    name = "affine"

    def alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Data coefficient α(t)."""
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Noise coefficient σ(t)."""
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        """dα/dt."""
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        """dσ/dt."""
        raise NotImplementedError

    def sample_and_target(self, x: Tensor, eps: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_t, v)`` with ``x_t = α x + σ ε`` and the conditional velocity ``v = α' x + σ' ε``."""
        return kernels.affine_sample_and_target(
            x, eps, self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)
        )

    def sample(self, x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``x_t = α(t)·x + σ(t)·ε``."""
        return bcast(self.alpha(t), x) * x + bcast(self.sigma(t), x) * eps

    def forward_transition(self, x_s: Tensor, s: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """Re-noise a state at the lower level ``s`` up to ``t ≥ s`` with fresh noise ``z``:

            x_t = (α_t/α_s)·x_s + √(σ_t² − (α_t·σ_s/α_s)²)·z,

        the Gaussian transition ``q(x_t | x_s)`` of the path (for ``x_s = α_s x + σ_s ε`` it gives
        ``x_t = α_t x + σ_t ε'`` with ``ε'`` standard normal, so the marginals are kept). TCD's
        stochastic sampler (γ) and LCM's multistep sampler (γ = 1, ``s = 0``) use it. ``s = t``
        returns ``x_s`` unchanged; ``s [B]`` must be ``≤ t [B]`` and ``α_s > 0``.
        """
        if bool((s > t).any()):
            raise ValueError("forward_transition re-noises upward only: s must be <= t")
        a_s, a_t, sg_s, sg_t = self.alpha(s), self.alpha(t), self.sigma(s), self.sigma(t)
        ratio = a_t / a_s
        var = (sg_t.pow(2) - (ratio * sg_s).pow(2)).clamp_min(0.0)
        return bcast(ratio, x_s) * x_s + bcast(var.sqrt(), x_s) * z

    def _det(self, t: Tensor) -> Tensor:
        return self.d_sigma(t) * self.alpha(t) - self.sigma(t) * self.d_alpha(t)

    def velocity_to_x0(self, x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
        """Data prediction from a velocity."""
        det = self._det(t)
        return bcast(self.d_sigma(t) / det, x_t) * x_t - bcast(self.sigma(t) / det, x_t) * v

    def velocity_to_eps(self, x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
        """Noise prediction from a velocity."""
        det = self._det(t)
        return bcast(self.alpha(t) / det, x_t) * v - bcast(self.d_alpha(t) / det, x_t) * x_t

    def x0_to_velocity(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """Velocity from a data prediction (``ε = (x_t − α x0)/σ``)."""
        a, s = bcast(self.alpha(t), x_t), bcast(self.sigma(t), x_t)
        eps = (x_t - a * x0) / s
        return bcast(self.d_alpha(t), x_t) * x0 + bcast(self.d_sigma(t), x_t) * eps

    def eps_to_velocity(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Velocity from a noise prediction (``x0 = (x_t − σ ε)/α``)."""
        a, s = bcast(self.alpha(t), x_t), bcast(self.sigma(t), x_t)
        x0 = (x_t - s * eps) / a
        return bcast(self.d_alpha(t), x_t) * x0 + bcast(self.d_sigma(t), x_t) * eps

    def vpred_to_velocity(self, x_t: Tensor, vp: Tensor, t: Tensor) -> Tensor:
        """Velocity from a diffusion "v-prediction" ``α ε − σ x0`` (for α² + σ² = 1 paths)."""
        a, s = bcast(self.alpha(t), x_t), bcast(self.sigma(t), x_t)
        x0 = a * x_t - s * vp
        eps = s * x_t + a * vp
        return bcast(self.d_alpha(t), x_t) * x0 + bcast(self.d_sigma(t), x_t) * eps


class LinearPath(AffinePath):
    """Rectified path ``x_t = (1 − t)·x + t·ε``, ``v = ε − x``."""

    name = "linear"

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def d_alpha(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sample_and_target(self, x: Tensor, eps: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_t, ε − x)`` in one fused pass."""
        return kernels.linear_sample_and_target(x, eps, t)


class CosinePath(AffinePath):
    """Trigonometric path ``α = cos(πt/2)``, ``σ = sin(πt/2)``."""

    name = "cosine"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)


PATHS: Registry = Registry("path")
PATHS.register("linear")(LinearPath)
PATHS.register("cosine")(CosinePath)
