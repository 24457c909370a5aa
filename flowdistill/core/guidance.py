"""Guidance: turn a conditional velocity field into a guided VelocityField, once, where the
teacher is built (DESIGN.md §1, §3). Distillers never special-case guidance: a guided teacher is
just another field.

Every guided field here has the form

    v_w(x, t, c) = v_lo(x, t, c) + w(t)·(v_hi(x, t, c) − v_lo(x, t, c))

- **Classifier-free guidance** (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"):
  ``v_lo = v(x, t, ∅)`` (the null label, ``num_classes`` by this project's convention) and
  ``v_hi = v(x, t, c)``: :class:`CFGField`. ``w = 1`` is the plain conditional field, ``w = 0``
  the unconditional one.
- **Autoguidance** (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
  Itself"): ``v_lo = v_bad(x, t, c)``, a weaker model of the same task and conditioning (smaller
  or less trained), ``v_hi = v_good(x, t, c)``: :class:`AutoGuidedField`. It needs no null label,
  so it also guides an unconditional model.
- **Guidance interval** (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval
  Improves Sample and Distribution Quality in Diffusion Models"): ``w(t) = w`` for
  ``t ∈ [t_lo, t_hi]`` and ``w(t) = 1`` (the unguided ``v_hi``) outside it. ``t`` is the noise
  level (``t = 1`` noise), so the paper's "high noise levels off" is ``t_hi < 1``.
- **Per-sample scales** (LCM, Luo et al. 2023; Hyper-SD, Ren et al. 2024): a field stores
  ``scale_range = (w_min, w_max)``; a distiller that trains a ``w``-conditioned student draws
  ``w ~ U[w_min, w_max]`` per sample with :func:`sample_guidance_scale` and passes
  ``field(x, t, c, w=w)`` (a ``[B]`` tensor). Without ``w=`` the stored ``scale`` is used.

:func:`build_guidance` is the one constructor; :class:`GuidanceSpec` is the ``guidance:`` section
of a job config and :meth:`GuidanceSpec.build` applies it. The fused Euler update of a guided field,
``x + h·(v_lo + w·(v_hi − v_lo))``, is one kernel pass (:meth:`GuidedField.branches`, used by
the ``euler`` solver through ``kernels.guided_euler_step``).
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as _field

import torch
from torch import Tensor, nn

from flowdistill import kernels
from flowdistill.core.rng import StepRNG

Scale = float | Tensor


def drop_condition(cond: Tensor, p: float, null_label: int, u: Tensor) -> Tensor:
    """Replace labels by ``null_label`` where ``u < p`` (condition dropout for CFG training)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"condition dropout must be in [0, 1], got {p}")
    return torch.where(u.to(cond.device) < p, torch.full_like(cond, null_label), cond)


def _pair(v, what: str) -> tuple[float, float] | None:
    if v is None or (not isinstance(v, Tensor) and len(v) == 0):
        return None
    lo, hi = (float(a) for a in v)
    if not lo <= hi:
        raise ValueError(f"{what} needs lo <= hi, got [{lo}, {hi}]")
    return lo, hi


class GuidedField(nn.Module):
    """Base of the guided fields: ``v_lo + w(t)·(v_hi − v_lo)`` (module docstring).

    Subclasses implement :meth:`_velocities`; the interval, the per-sample scale and the combine
    live here. ``base`` is the guided (conditional, "good") net itself — e.g. what a fake-velocity
    net is copied from; :func:`unguided` returns it.
    """

    def __init__(self, scale: Scale, interval: tuple[float, float] | None = None,
                 scale_range: tuple[float, float] | None = None):
        super().__init__()
        self.scale: Scale = scale if isinstance(scale, Tensor) else float(scale)
        self.interval = _pair(interval, "guidance interval")
        self.scale_range = _pair(scale_range, "guidance scale range")

    @property
    def base(self) -> nn.Module:
        """The guided net (CFG: the conditional net; autoguidance: the good model)."""
        raise NotImplementedError

    def _velocities(self, x: Tensor, t: Tensor, cond, scale: Scale) -> tuple[Tensor, Tensor]:
        """``(v_lo, v_hi)``; the same tensor twice when ``scale`` needs no combination."""
        raise NotImplementedError

    def _scale(self, w: Scale | None, b: int) -> Scale:
        scale = self.scale if w is None else w
        if isinstance(scale, Tensor) and scale.ndim != 0 and scale.shape != (b,):
            raise ValueError(f"per-sample guidance scale must be [{b}], got {tuple(scale.shape)}")
        return scale

    def weight(self, scale: Scale, t: Tensor) -> Scale:
        """``w(t)``: ``scale`` inside the interval, ``1`` outside (``scale`` unchanged without one)."""
        if self.interval is None:
            return scale.to(t.device) if isinstance(scale, Tensor) else scale
        lo, hi = self.interval
        inside = (t >= lo) & (t <= hi)
        ws = scale.to(t) if isinstance(scale, Tensor) else torch.full_like(t, scale)
        return torch.where(inside, ws.expand_as(t), torch.ones_like(t))

    def branches(self, x: Tensor, t: Tensor, cond=None, w: Scale | None = None
                 ) -> tuple[Tensor, Tensor, Scale]:
        """``(v_lo, v_hi, w(t))`` with ``field(x, t, cond, w) = v_lo + w(t)·(v_hi − v_lo)``.

        When no combination is needed (``v_lo is v_hi``, ``w = 1``) both are the same tensor, so
        a caller fusing the combine into its update (the Euler solver) can skip it."""
        scale = self._scale(w, x.shape[0])
        v_lo, v_hi = self._velocities(x, t, cond, scale)
        if v_lo is v_hi:
            return v_hi, v_hi, 1.0
        return v_lo, v_hi, self.weight(scale, t)

    def forward(self, x: Tensor, t: Tensor, cond=None, w: Scale | None = None) -> Tensor:
        """The guided velocity (``w``, a float or ``[B]``, overrides the stored scale for this call)."""
        v_lo, v_hi, wt = self.branches(x, t, cond, w)
        return v_hi if v_lo is v_hi else kernels.cfg_combine(v_lo, v_hi, wt)


class CFGField(GuidedField):
    """Classifier-free guidance ``v(x, t, ∅) + w(t)·(v(x, t, c) − v(x, t, ∅))`` (module docstring).

    Both branches run as one batched call. With ``cond=None`` the field is the unconditional
    velocity; with a float scale of ``1`` the conditional one (one call, no combine).
    """

    def __init__(self, field: nn.Module, scale: Scale, null_label: int,
                 interval: tuple[float, float] | None = None,
                 scale_range: tuple[float, float] | None = None):
        super().__init__(scale, interval, scale_range)
        self.field, self.null_label = field, int(null_label)

    @property
    def base(self) -> nn.Module:
        return self.field

    def _velocities(self, x, t, cond, scale):
        if cond is None or (not isinstance(scale, Tensor) and scale == 1.0):
            v = self.field(x, t, cond=cond)
            return v, v
        null = torch.full_like(cond, self.null_label)
        v = self.field(torch.cat([x, x]), torch.cat([t, t]), cond=torch.cat([null, cond]))
        v_u, v_c = v.chunk(2)
        return v_u, v_c


class AutoGuidedField(GuidedField):
    """Autoguidance ``v_bad(x, t, c) + w(t)·(v_good(x, t, c) − v_bad(x, t, c))`` with a weaker model
    of the same task (Karras et al. 2024; module docstring). Works with or without ``cond``."""

    def __init__(self, good: nn.Module, bad: nn.Module, scale: Scale,
                 interval: tuple[float, float] | None = None,
                 scale_range: tuple[float, float] | None = None):
        super().__init__(scale, interval, scale_range)
        self.good, self.bad = good, bad

    @property
    def base(self) -> nn.Module:
        return self.good

    def _velocities(self, x, t, cond, scale):
        if not isinstance(scale, Tensor) and scale == 1.0:
            v = self.good(x, t, cond=cond)
            return v, v
        return self.bad(x, t, cond=cond), self.good(x, t, cond=cond)


def build_guidance(field: nn.Module, *, scale: float = 1.0, scale_range=None, interval=None,
                   bad: nn.Module | None = None, null_label: int | None = None) -> nn.Module:
    """The guided VelocityField of ``field`` — the one place guidance is applied (DESIGN.md §1).

    - ``bad`` given: autoguidance ``v_bad + w·(v_good − v_bad)`` (:class:`AutoGuidedField`);
    - else ``scale != 1`` or a ``scale_range``: CFG with ``null_label`` (:class:`CFGField`);
      ``null_label=None`` (an unconditional field) is a ``ValueError``;
    - else ``field`` itself (``w = 1`` everywhere; an ``interval`` alone changes nothing).

    ``interval = (t_lo, t_hi)`` limits guidance to those noise levels; ``scale_range =
    (w_min, w_max)`` is stored for a distiller that draws per-sample scales
    (:func:`sample_guidance_scale`, then ``field(..., w=w)``).
    """
    interval, scale_range = _pair(interval, "guidance interval"), _pair(scale_range, "guidance scale range")
    if bad is not None:
        return AutoGuidedField(field, bad, scale, interval, scale_range)
    if float(scale) == 1.0 and scale_range is None:
        return field
    if null_label is None:
        raise ValueError("classifier-free guidance needs a class-conditional field (a null label); "
                         "an unconditional one can be autoguided")
    return CFGField(field, scale, null_label, interval, scale_range)


def unguided(field: nn.Module) -> nn.Module:
    """The net under a guided field (:attr:`GuidedField.base`), or ``field`` itself."""
    return field.base if isinstance(field, GuidedField) else field


@dataclass
class GuidanceSpec:
    """The ``guidance:`` section of a job config: how the teacher's velocity is guided.

    Applied once when the teacher is built (and when a flow-matching run — a teacher — is
    sampled); distillers receive the guided field. ``scale`` is ``w`` (1 = off); ``scale_range``
    ``[w_min, w_max]`` is stored on the field for methods that draw per-sample scales;
    ``interval`` ``[t_lo, t_hi]`` limits guidance to those noise levels; ``autoguidance`` names a
    weaker model of the same task (a saved model directory or a run directory) to guide with
    instead of the null label.
    """

    scale: float = 1.0
    scale_range: list[float] = _field(default_factory=list)
    interval: list[float] = _field(default_factory=list)
    autoguidance: str = ""

    def validate(self) -> None:
        """Values up front; a ``ValueError`` whose message starts with the key (``guidance.…``)."""
        if not self.scale >= 0:
            raise ValueError(f"guidance.scale must be >= 0, got {self.scale}")
        if self.scale_range:
            r = list(self.scale_range)
            if len(r) != 2 or not 0 <= r[0] <= r[1]:
                raise ValueError(f"guidance.scale_range must be [w_min, w_max] with 0 <= w_min <= w_max, "
                                 f"got {r}")
        if self.interval:
            r = list(self.interval)
            if len(r) != 2 or not 0 <= r[0] <= r[1] <= 1:
                raise ValueError(f"guidance.interval must be [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1, "
                                 f"got {r}")

    @property
    def active(self) -> bool:
        """Whether the spec changes the field (``scale != 1``, a scale range, or autoguidance)."""
        return self.scale != 1.0 or bool(self.scale_range) or bool(self.autoguidance)

    @property
    def key(self) -> str:
        """The key that turns guidance on (for messages): ``guidance.autoguidance``, ``.scale`` …"""
        if self.autoguidance:
            return "guidance.autoguidance"
        return "guidance.scale" if self.scale != 1.0 else "guidance.scale_range"

    def build(self, field: nn.Module, null_label: int | None = None, bad: nn.Module | None = None
              ) -> nn.Module:
        """:func:`build_guidance` with this spec's values (``bad``: the loaded ``autoguidance`` model)."""
        return build_guidance(field, scale=self.scale, scale_range=self.scale_range or None,
                              interval=self.interval or None, bad=bad, null_label=null_label)

    def header(self, autoguidance_sha256: str = "") -> dict:
        """The settings as plain values (a coupling store's header); the weaker model is named by
        the content digest ``autoguidance_sha256`` the caller passes (a path says nothing about
        what it holds)."""
        return {"scale": float(self.scale), "scale_range": [float(v) for v in self.scale_range],
                "interval": [float(v) for v in self.interval], "autoguidance": autoguidance_sha256}


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
