"""TSCD's low-step extras: Hyper-SD's one-step terms and PCM's adversarial term (METHODS.md §3).

Options of :class:`flowdistill.distillers.tscd.TSCD` (and so of ``lcm`` and ``pcm``), split out of
``tscd.py``: their config keys live on :class:`~flowdistill.distillers.tscd.TSCDConfig` (checked by
:func:`validate_extras`), their code in the mixin :class:`LowStepExtras`. Same convention as TSCD
(``t`` = noise level, ``x_t = (1 − t)·x + t·ε``, flow map ``X(x, t, s) = x + (s − t)·u(x, t, s)``);
``L`` is TSCD's consistency loss.

Each is off by default and, when on, added to the student's loss ``L``, which is unchanged bit
for bit when they are off:

- *One-step distribution matching* (``dmd_weight > 0``; Hyper-SD; the helper shared with FreeFlow,
  :mod:`flowdistill.core.dmd`). The one-step sample ``x̂ = X_θ(ε, 1, 0)`` (fresh ``ε``, the batch's
  labels), re-noised to ``x_r = (1 − r)·sg(x̂) + r·n`` with ``r`` from ``dmd_r_sampler``, gives
  ``g = λ(r)·(v_real(x_r, r) − v_ψ(x_r, r))`` (DMD's normaliser ``λ = 1/mean|x̂ − x̂0_real|`` with
  ``dm_normalize``), and ``L_dmd = ½‖x̂ − sg(x̂ − g)‖²`` (mean over elements and batch), whose
  gradient at ``x̂`` is ``g/(B·D)``. ``ψ`` is a trainable copy of the teacher's bare net learning the
  student's one-step samples by flow matching, ``L_ψ = ‖v_ψ(x_r, r) − (n − sg(x̂))‖²``, in its own
  optimiser group ``"fake"`` (``fake_repeats`` updates per step, lr × ``fake_lr_scale``), before the
  student's.
- *Reward* (``reward: NAME``, ``reward_weight > 0``; Hyper-SD's human-feedback terms, pluggable):
  ``L_R = mean relu(m − R(x̂, c))`` on the same one-step sample, ``m = reward_margin``, ``R`` a
  frozen reward of :data:`flowdistill.models.rewards.REWARDS` built with ``reward_params``. Zero
  for samples whose reward clears the margin.
- *Adversarial* (``adv_weight > 0``; PCM, weight 0.1, discriminator lr ``adv_lr`` 1e-5). The
  discriminator is the frozen teacher's features (:mod:`flowdistill.models.discriminator`) plus
  small trainable heads. Per sample the edge prediction ``pred = X_θ(x_t, t, e)`` and its target are
  both re-noised from ``e`` to one random time ``r ~ U(e, e⁺)`` inside the phase (``e⁺`` the phase's
  upper edge, ``1`` for the top one) with the same noise ``z`` (the path's forward transition);
  the heads train on the hinge loss ``relu(1 − D(target_r)) + relu(1 + D(pred_r))`` in their own
  group ``"disc"`` (on its own batch), and the student adds ``adv_weight·(−mean D(pred_r))``:
  D and G steps alternate, one each per training step (groups run ``"fake"``, ``"disc"``,
  ``"student"``). PCM warns it can hurt FID at NFE ≥ 4.

``ψ`` and the heads are attributes of the distiller (``fake``, ``disc``), so they are saved and
restored with its checkpoint; neither is part of the exported student. The target EMA steps only
after the student's optimiser step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from flowdistill.core.dmd import dm_gradient_at, dm_surrogate_loss, fake_velocity_loss, make_fake_velocity_net
from flowdistill.core.flowmap import flow_map_jump
from flowdistill.core.guidance import unguided
from flowdistill.core.registry import UnknownNameError
from flowdistill.core.rng import StepRNG
from flowdistill.core.timesteps import TimeSamplerConfig
from flowdistill.distillers.base import OptimGroup
from flowdistill.errors import ConfigError
from flowdistill.models.discriminator import (
    FeatureHeads,
    discriminate,
    has_features,
    hinge_d_loss,
    hinge_g_loss,
)
from flowdistill.models.rewards import REWARDS, LazyReward, margin_loss

if TYPE_CHECKING:
    from flowdistill.distillers.tscd import TSCDConfig


def dmd_r_sampler_default() -> TimeSamplerConfig:
    """The DMD term's re-noising time sampler by default: ``r ~ U[0.02, 0.98]``."""
    return TimeSamplerConfig(name="uniform", t_min=0.02, t_max=0.98)


def validate_extras(cfg: TSCDConfig) -> None:
    """The extras' keys of a TSCD config: weights ≥ 0, a reward named when weighted, and so on;
    each error a one-line :class:`~flowdistill.errors.ConfigError` naming its key."""
    for key in ("dmd_weight", "reward_weight", "adv_weight"):
        v = getattr(cfg, key)
        if not v >= 0:
            raise ConfigError(f"distiller.{key} must be >= 0, got {v}")
    if not isinstance(cfg.fake_repeats, int) or cfg.fake_repeats < 1:
        raise ConfigError(f"distiller.fake_repeats must be an integer >= 1, got {cfg.fake_repeats!r}")
    for key in ("fake_lr_scale", "adv_lr"):
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"distiller.{key} must be positive, got {getattr(cfg, key)}")
    if not isinstance(cfg.adv_hidden, int) or cfg.adv_hidden < 1:
        raise ConfigError(f"distiller.adv_hidden must be a positive integer, got {cfg.adv_hidden!r}")
    try:
        cfg.dmd_r_sampler.build()
    except (ValueError, UnknownNameError) as e:
        raise ConfigError(f"distiller.dmd_r_sampler: {e}") from None
    if cfg.reward_weight > 0 and not cfg.reward:
        raise ConfigError("distiller.reward_weight > 0 needs distiller.reward (a registered reward: "
                          f"{', '.join(REWARDS.names())})")
    if cfg.reward:
        if cfg.reward not in REWARDS:
            raise ConfigError(f"distiller.reward: unknown reward {cfg.reward!r}; available: "
                              f"{', '.join(REWARDS.names())}")
        if cfg.reward_weight == 0:
            raise ConfigError(f"distiller.reward={cfg.reward!r} has distiller.reward_weight=0 "
                              f"(set a positive weight, or reward='')")


def one_step(eps: Tensor, cond: Tensor | None, net: nn.Module) -> Tensor:
    """The one-step sample ``X(ε, 1, 0)`` through the flow-map ``net`` (with gradient when enabled)."""
    ones = torch.ones(eps.shape[0], device=eps.device, dtype=eps.dtype)
    return flow_map_jump(net, eps, ones, torch.zeros_like(ones), cond)


class LowStepExtras:
    """Mixin of the extras for :class:`~flowdistill.distillers.tscd.TSCD` (module docstring).

    It uses the distiller's ``cfg``, ``student``, ``teacher``, ``path``, ``net(name)`` and, for the
    discriminator's batch, TSCD's own draws (``_draw``) and target (``consistency_target``).
    """

    fake: nn.Module | None
    disc: nn.Module | None

    def _init_extras(self, cfg: TSCDConfig, teacher: nn.Module | None) -> None:
        """Build what the switched-on extras need: ψ and the heads only when training (a teacher)."""
        self.dmd_r_sampler = cfg.dmd_r_sampler.build()
        self._reward = LazyReward(cfg.reward, dict(cfg.reward_params)) if cfg.reward else None
        #: ψ, the fake-velocity net of the DMD term (core.dmd, as FreeFlow's)
        self.fake = None
        #: the discriminator's trainable heads on the frozen teacher's features
        self.disc = None
        if teacher is not None and cfg.dmd_weight > 0:
            self.fake = make_fake_velocity_net(teacher)
        if teacher is not None and cfg.adv_weight > 0:
            backbone = unguided(teacher)
            if not has_features(backbone):
                raise ConfigError(f"distiller.adv_weight > 0 needs a teacher net with a feature hook "
                                  f"(features(), feature_channels); {type(backbone).__name__} has none")
            self.disc = FeatureHeads(list(backbone.feature_channels), cfg.adv_hidden)

    def extra_nets(self) -> dict[str, nn.Module]:
        """ψ (``fake``) and the discriminator heads (``disc``), those that are on."""
        nets = {}
        if self.fake is not None:
            nets["fake"] = self.fake
        if self.disc is not None:
            nets["disc"] = self.disc
        return nets

    def extra_groups(self, lr: float) -> list[OptimGroup]:
        """``"fake"`` (ψ, lr × ``fake_lr_scale``, ``fake_repeats`` updates), then ``"disc"``
        (lr ``adv_lr``)."""
        groups = []
        if self.fake is not None:
            groups.append(OptimGroup.trainable("fake", self.fake, lr * self.cfg.fake_lr_scale,
                                               repeats=self.cfg.fake_repeats))
        if self.disc is not None:
            groups.append(OptimGroup("disc", list(self.disc.parameters()), self.cfg.adv_lr))
        return groups

    def extra_student_terms(self, x: Tensor, cond: Tensor | None, pred: Tensor, target: Tensor,
                            e: Tensor, e_hi: Tensor, rng: StepRNG, out: dict[str, Tensor]) -> None:
        """Add the switched-on extras to ``out["loss"]`` (TSCD's ``L``), in the draw order
        DMD/reward (one one-step sample), then the adversarial G term; logs into ``out``."""
        if self.fake is not None or self._reward is not None:
            out["loss"] = out["loss"] + self._one_step_terms(x, cond, rng, out)
        if self.disc is not None:
            pred_r, _, r = self._renoised_pair(pred, target, e, e_hi, rng)
            g_adv = hinge_g_loss(discriminate(self.net("disc"), unguided(self.teacher), pred_r, r, cond))
            out["adv_g"] = g_adv.detach()
            out["loss"] = out["loss"] + self.cfg.adv_weight * g_adv

    def _one_step_terms(self, x: Tensor, cond: Tensor | None, rng: StepRNG,
                        out: dict[str, Tensor]) -> Tensor:
        """``dmd_weight·L_dmd + reward_weight·L_R`` on one one-step sample ``x̂ = X_θ(ε, 1, 0)``
        (fresh ``ε``; logs into ``out``)."""
        b = x.shape[0]
        x_hat = one_step(rng.randn(b, *x.shape[1:]).to(x.device, x.dtype), cond, self.net("student"))
        total = x.new_zeros(())
        if self.fake is not None:
            r = rng.times(self.dmd_r_sampler, b).to(x.device, x.dtype)
            n = rng.randn(b, *x.shape[1:]).to(x.device, x.dtype)
            g = dm_gradient_at(x_hat, r, n, self.teacher, self.fake, cond, normalize=self.cfg.dm_normalize)
            l_dmd = dm_surrogate_loss(x_hat, g).mean()
            out["dmd"] = l_dmd.detach()
            total = total + self.cfg.dmd_weight * l_dmd
        if self._reward is not None:
            reward = self._reward(x.device)(x_hat, cond)
            l_r = margin_loss(reward, self.cfg.reward_margin).mean()
            out["reward"], out["reward_loss"] = reward.detach().mean(), l_r.detach()
            total = total + self.cfg.reward_weight * l_r
        return total

    def _fake_loss(self, batch: dict[str, Tensor], rng: StepRNG) -> dict[str, Tensor]:
        """``L_ψ`` on the student's current one-step samples (no gradient into the student)."""
        if self.fake is None:
            raise RuntimeError(f"{self.name}: no fake-velocity net (dmd_weight = 0 or inference-only)")
        x, cond = batch["x"], batch.get("cond")
        b = x.shape[0]
        with torch.no_grad():
            x_hat = one_step(rng.randn(b, *x.shape[1:]).to(x.device, x.dtype), cond, self.student)
        r = rng.times(self.dmd_r_sampler, b).to(x.device, x.dtype)
        n = rng.randn(b, *x.shape[1:]).to(x.device, x.dtype)
        return {"loss": fake_velocity_loss(self.net("fake"), x_hat, r, n, cond)}

    def _renoised_pair(self, pred: Tensor, target: Tensor, e: Tensor, e_hi: Tensor,
                       rng: StepRNG) -> tuple[Tensor, Tensor, Tensor]:
        """``(pred_r, target_r, r)``: both moved from the edge ``e`` to one ``r ~ U(e, e⁺)`` per sample
        with the same fresh noise (the path's forward transition)."""
        u = rng.rand(pred.shape[0]).to(pred.device, e.dtype)
        r = e + u * (e_hi - e)
        z = rng.randn(pred.shape[0], *pred.shape[1:]).to(pred.device, pred.dtype)
        return (self.path.forward_transition(pred, e, r, z),
                self.path.forward_transition(target.detach(), e, r, z), r)

    def _disc_loss(self, batch: dict[str, Tensor], rng: StepRNG) -> dict[str, Tensor]:
        """The heads' hinge loss ``mean relu(1 − D(target_r)) + mean relu(1 + D(pred_r))`` on the
        phase-re-noised edge prediction and target of this group's own batch (no student gradient)."""
        if self.disc is None:
            raise RuntimeError(f"{self.name}: no discriminator (adv_weight = 0 or inference-only)")
        cond = batch.get("cond")
        x_t, t, t_prev, e, e_hi = self._draw(batch, rng)
        with torch.no_grad():
            _, target = self.consistency_target(x_t, t, t_prev, e, cond)
            pred = flow_map_jump(self.student, x_t, t, e, cond)
            pred_r, target_r, r = self._renoised_pair(pred, target, e, e_hi, rng)
        backbone, heads = unguided(self.teacher), self.net("disc")
        d_real = discriminate(heads, backbone, target_r, r, cond)
        d_fake = discriminate(heads, backbone, pred_r, r, cond)
        return {"loss": hinge_d_loss(d_real, d_fake), "d_real": d_real.detach().mean(),
                "d_fake": d_fake.detach().mean()}
