"""Distribution-matching gradient (DMD-style), shared by FreeFlow's correction, Hyper-SD's
one-step term and MDT-dist's velocity distillation.

For generated samples ``x̂`` re-noised to ``x_r = (1 − r)·x̂ + r·n``, the difference of the
teacher ("real") and fake velocities, ``v_real − v_fake = (E_fake[x0|x_r] − E_real[x0|x_r]) / r``,
points from the real marginal's denoised estimate toward the fake one; moving ``x̂`` along
``−g``, ``g = λ(r)·(v_real − v_fake)``, lowers the KL between the two. It is applied through the
surrogate ``½‖x̂ − sg(x̂ − g)‖²``, whose gradient with respect to ``x̂`` is exactly ``g``.
``λ`` is DMD's per-sample normaliser ``1 / mean|x̂ − x̂0_real|`` (Yin et al. 2024).

The fake-velocity net ``ψ`` (a trainable copy of the teacher's bare net, :func:`make_fake_velocity_net`)
learns the generator's own noising flow by flow matching on ``sg(x̂)``,
``L_ψ = ‖v_ψ(x_r, r) − (n − sg(x̂))‖²`` (:func:`fake_velocity_loss`); :func:`dm_gradient_at` evaluates
``g`` from the teacher and ``ψ`` at fresh ``(r, n)``. Each method owns its ``ψ`` (as an attribute,
so it is checkpointed) and its optimiser group; these helpers are the computation they share.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from flowdistill.core.broadcast import bcast
from flowdistill.core.guidance import unguided
from flowdistill.core.paths import LinearPath


def _per_sample_mean_abs(d: Tensor) -> Tensor:
    return bcast(d.abs().reshape(d.shape[0], -1).mean(dim=1), d)


def dm_gradient(x_hat: Tensor, x_r: Tensor, r: Tensor, v_real: Tensor, v_fake: Tensor,
                normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """``g = λ(r)·(v_real − v_fake)`` (detached), ``λ = 1/mean|x̂ − x̂0_real|`` when normalising."""
    g = (v_real - v_fake).detach()
    if normalize:
        x0_real = LinearPath().velocity_to_x0(x_r, v_real, r).detach()
        g = g / (_per_sample_mean_abs(x_hat.detach() - x0_real) + eps)
    return g


def dm_surrogate_loss(x_hat: Tensor, g: Tensor) -> Tensor:
    """Per-sample ``½‖x̂ − sg(x̂ − g)‖²`` (mean over elements); ``∇_x̂`` is ``g / D``."""
    target = (x_hat - g).detach()
    return 0.5 * (x_hat - target).pow(2).reshape(x_hat.shape[0], -1).mean(dim=1)


def renoise(x_hat: Tensor, r: Tensor, n: Tensor) -> Tensor:
    """``x_r = (1 − r)·x̂ + r·n`` on the linear path."""
    rb = bcast(r, x_hat)
    return (1 - rb) * x_hat + rb * n


@torch.no_grad()
def fake_velocity_target(x_hat: Tensor, n: Tensor) -> Tensor:
    """Flow-matching target of the fake-velocity net on ``sg(x̂)``: ``n − x̂``."""
    return n - x_hat.detach()


def make_fake_velocity_net(teacher: nn.Module) -> nn.Module:
    """``ψ``: a trainable copy of the teacher's *bare* net (not of its guided field: ``ψ`` learns the
    generator's conditional flow, unguided), in train mode."""
    return copy.deepcopy(unguided(teacher)).requires_grad_(True).train()


def fake_velocity_loss(fake: nn.Module, x_hat: Tensor, r: Tensor, n: Tensor,
                       cond: Tensor | None = None) -> Tensor:
    """``L_ψ = mean ‖v_ψ(x_r, r) − (n − sg(x̂))‖²`` with ``x_r = (1 − r)·sg(x̂) + r·n`` (flow
    matching of ``ψ`` on the generator's samples; ``fake`` is the net to call, e.g. an engine wrapper)."""
    x_hat = x_hat.detach()
    v = fake(renoise(x_hat, r, n), r, cond=cond)
    return (v - fake_velocity_target(x_hat, n)).pow(2).mean()


@torch.no_grad()
def dm_gradient_at(x_hat: Tensor, r: Tensor, n: Tensor, real: nn.Module, fake: nn.Module,
                   cond: Tensor | None = None, normalize: bool = True) -> Tensor:
    """``g`` of :func:`dm_gradient` at ``x_r = (1 − r)·sg(x̂) + r·n``, with ``v_real = real(x_r, r)``
    (the guided teacher) and ``v_fake = fake(x_r, r)`` (``ψ``), both without gradient."""
    x_r = renoise(x_hat.detach(), r, n)
    v_real = real(x_r, r, cond=cond)
    v_fake = fake(x_r, r, cond=cond)
    return dm_gradient(x_hat, x_r, r, v_real, v_fake, normalize=normalize)
