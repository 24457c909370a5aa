"""Guidance wrappers: turn a conditional field into a guided VelocityField.

Distillers never special-case guidance: a guided teacher is just another field.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowdistill import kernels


def drop_condition(cond: Tensor, p: float, null_label: int, u: Tensor) -> Tensor:
    """Replace labels by ``null_label`` where ``u < p`` (condition dropout for CFG training)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"condition dropout must be in [0, 1], got {p}")
    return torch.where(u.to(cond.device) < p, torch.full_like(cond, null_label), cond)


class CFGField(nn.Module):
    """Classifier-free guidance ``v_u + w·(v_c − v_u)``, optionally only for ``t`` in an interval.

    Outside ``[t_lo, t_hi]`` (the guidance interval, Kynkäänniemi et al. 2024) the conditional
    velocity is used unguided (``w = 1``). Both branches run as one batched call.
    """

    def __init__(self, field: nn.Module, scale: float, null_label: int,
                 interval: tuple[float, float] | None = None):
        super().__init__()
        self.field, self.scale, self.null_label = field, float(scale), int(null_label)
        self.interval = interval

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """Guided velocity; with ``cond=None`` the unconditional velocity."""
        if cond is None:
            return self.field(x, t, cond=None)
        if self.scale == 1.0 and self.interval is None:
            return self.field(x, t, cond=cond)
        null = torch.full_like(cond, self.null_label)
        v = self.field(torch.cat([x, x]), torch.cat([t, t]), cond=torch.cat([null, cond]))
        v_u, v_c = v.chunk(2)
        w: Tensor | float = self.scale
        if self.interval is not None:
            lo, hi = self.interval
            inside = (t >= lo) & (t <= hi)
            w = torch.where(inside, torch.full_like(t, self.scale), torch.ones_like(t))
        return kernels.cfg_combine(v_u, v_c, w)


class AutoGuidedField(nn.Module):
    """Autoguidance ``v_bad + w·(v_good − v_bad)`` with a weaker model of the same task
    (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself")."""

    def __init__(self, good: nn.Module, bad: nn.Module, scale: float):
        super().__init__()
        self.good, self.bad, self.scale = good, bad, float(scale)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """Guided velocity."""
        return kernels.cfg_combine(self.bad(x, t, cond=cond), self.good(x, t, cond=cond),
                                   self.scale)
