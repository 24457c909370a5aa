"""Guidance wrappers: turn a conditional field into a guided VelocityField.

Distillers never special-case guidance: a guided teacher is just another field.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowdistill import kernels
from flowdistill.core.rng import StepRNG


def drop_condition(cond: Tensor, p: float, null_label: int, u: Tensor) -> Tensor:
    """Replace labels by ``null_label`` where ``u < p`` (condition dropout for CFG training)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"condition dropout must be in [0, 1], got {p}")
    return torch.where(u.to(cond.device) < p, torch.full_like(cond, null_label), cond)


class CFGField(nn.Module):
    """Classifier-free guidance ``v_u + w·(v_c − v_u)``, optionally only for ``t`` in an interval.

    Outside ``[t_lo, t_hi]`` (the guidance interval, Kynkäänniemi et al. 2024) the conditional
    velocity is used unguided (``w = 1``). Both branches run as one batched call.

    The scale is a float, or a per-sample ``[B]`` tensor (LCM / Hyper-SD draw ``w ~ U[w_min, w_max]``
    per sample); ``forward(..., w=)`` overrides the stored scale for one call.
    """

    def __init__(self, field: nn.Module, scale: float | Tensor, null_label: int,
                 interval: tuple[float, float] | None = None):
        super().__init__()
        self.field, self.null_label = field, int(null_label)
        self.scale: float | Tensor = scale if isinstance(scale, Tensor) else float(scale)
        self.interval = interval

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None,
                w: float | Tensor | None = None) -> Tensor:
        """Guided velocity ``v_u + w·(v_c − v_u)`` (``w`` a float or ``[B]``); with ``cond=None`` the
        unconditional velocity."""
        if cond is None:
            return self.field(x, t, cond=None)
        scale = self.scale if w is None else w
        if not isinstance(scale, Tensor):
            scale = float(scale)
            if scale == 1.0 and self.interval is None:
                return self.field(x, t, cond=cond)
        elif scale.ndim != 0 and scale.shape != (x.shape[0],):
            raise ValueError(f"per-sample guidance scale must be [{x.shape[0]}], got {tuple(scale.shape)}")
        else:
            scale = scale.to(x.device)
        null = torch.full_like(cond, self.null_label)
        v = self.field(torch.cat([x, x]), torch.cat([t, t]), cond=torch.cat([null, cond]))
        v_u, v_c = v.chunk(2)
        wt: Tensor | float = scale
        if self.interval is not None:
            lo, hi = self.interval
            inside = (t >= lo) & (t <= hi)
            ws = scale.to(t) if isinstance(scale, Tensor) else torch.full_like(t, scale)
            wt = torch.where(inside, ws.expand_as(t), torch.ones_like(t))
        return kernels.cfg_combine(v_u, v_c, wt)


class AutoGuidedField(nn.Module):
    """Autoguidance ``v_bad + w·(v_good − v_bad)`` with a weaker model of the same task
    (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself")."""

    def __init__(self, good: nn.Module, bad: nn.Module, scale: float):
        super().__init__()
        self.good, self.bad, self.scale = good, bad, float(scale)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None,
                w: float | Tensor | None = None) -> Tensor:
        """Guided velocity (``w``, a float or ``[B]``, overrides the stored scale)."""
        return kernels.cfg_combine(self.bad(x, t, cond=cond), self.good(x, t, cond=cond),
                                   self.scale if w is None else w)


def sample_guidance_scale(rng: torch.Generator | StepRNG | None, batch: int, w_min: float, w_max: float,
                          device=None) -> Tensor:
    """Per-sample guidance scales ``w ~ U[w_min, w_max]`` of shape ``[batch]`` (LCM: ``U[5, 15]``;
    PCM-SD1.5: ``U[4, 5]``; METHODS.md §3). ``rng`` is a ``torch.Generator`` or a
    :class:`~flowdistill.core.rng.StepRNG` (then ``batch`` is the local batch, drawn from the global one,
    on the StepRNG's device); ``device`` moves the result (default: where it was drawn)."""
    if not w_min <= w_max:
        raise ValueError(f"guidance scale range needs w_min <= w_max, got {w_min}, {w_max}")
    if isinstance(rng, StepRNG):
        u = rng.rand(batch)
    else:
        u = torch.rand(batch, generator=rng, device=rng.device if rng is not None else None)
    w = w_min + (w_max - w_min) * u
    return w if device is None else w.to(device)
