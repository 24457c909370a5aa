"""One-time TSCD students: a diffusers transformer (e.g. with a LoRA) read as the average velocity to
the lower edge of its sample's segment.

A LoRA student of a diffusers transformer keeps the transformer's call: one time, ``u_θ(x, t)``,
no target time. TSCD (METHODS.md §3, :mod:`flowdistill.distillers.tscd`) trains a flow map
``X_θ(x_t, t, e)`` that jumps to ``e``, the lower edge of the sample's segment. For **one fixed
segmentation** (``k`` segments of the teacher's ``N``-step grid, edges ``e_0 < … < e_{k−1}``) that
edge is a function of ``t`` alone,

    e_k(t) = max{ e_j : e_j < t }      (a grid time on an edge jumps to the edge below),

so ``u_θ(x, t) := u(x, t, e_k(t))`` is well-defined (PCM's one-time LoRA students: the phase is
implied by ``t``), and the flow-map jump is ``X(x, t, e_k(t)) = x + (e_k(t) − t)·u_θ(x, t)``. In the
TSCD loss every call asks for exactly that jump (``pred`` jumps ``t → e(t')`` with ``t' = t_n`` the
grid point below ``t = t_{n+1}``, and ``e(t') = e_k(t)``; the target's jump ``t' → e`` has length
0 when ``t'`` is the edge). :class:`OneTimeSegmentStudent` wraps the one-time net into the two-time
call TSCD makes and **refuses any other jump** (a clear ``ValueError``) rather than silently
extrapolating ``x + (s − t)·u`` to a time it never trained.

Which samplers are then exact (each jump one the student was trained for):

- ``k > 1`` (PCM): ``nfe = k``, deterministic (``γ = 0``): the sampler's times are the ``k`` edges.
  Other ``nfe`` (even multiples of ``k``: from ``t = 1`` the student knows only the jump to
  ``e_{k−1}``) and ``γ > 0`` are refused.
- ``k = 1`` (LCM): ``e_1(t) = t_0 = 0`` for every ``t``: ``u_θ(x, t) = u(x, t, 0)``, the
  consistency function. Sampled with ``γ = 1`` (jump to 0, re-noise to the next time: LCM's
  multistep sampler, TCD with γ = 1) every jump at **every** ``nfe`` is the trained one.

**One LoRA for all step counts** (Hyper-SD's unified LoRA). The two-time unified student draws
``k ∈ {1, 2, 4, 8}`` per sample (``distiller.segment_choices``); for a one-time net this is *not*
well-defined: at ``t = 0.9`` (uniform grid) the four segmentations ask for jumps to 0, 0.5, 0.75 and
0.875 from the same ``(x, t)``, a one-time net can give only one velocity, and trained on the
mixture it regresses to a loss-weighted compromise that is the trained jump of no ``k``.
:func:`one_time_student` refuses it (``ConfigError`` naming ``distiller.segment_choices``). The
one segmentation shared by all step counts is ``k = 1``, so the one-time student for all step
counts is the ``k = 1`` consistency student sampled with ``γ = 1`` — what we build. TCD's
``γ < 1`` (a jump to ``(1 − γ)·s``) needs the target time as an input: TCD itself reads its
one-time net as ``x + (s − t)·u(x, t)`` for any ``s`` (its DDIM-style parameterisation), which is
the exact flow map only where trajectories are straight; a two-time student (a second time
embedding, issue 15) makes the multi-``k`` unified student exact instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from flowdistill.core.segments import segment_edges
from flowdistill.errors import ConfigError


class OneTimeSegmentStudent(nn.Module):
    """A one-time net ``u_θ(x, t)`` as the two-time flow-map student ``u(x, t, e_k(t))`` of a fixed
    ``k``-segment split (module docstring); calls for any other target time raise.

    ``net`` is called ``net(x, t, cond=cond)`` (a teacher adapter around a diffusers transformer,
    e.g. :class:`~flowdistill.integrations.diffusers.adapters.SD3Adapter`, or any one-time field);
    ``edges`` are the ascending segment edges ``e_0 < … < e_{k−1}`` on the teacher grid.
    """

    def __init__(self, net: nn.Module, edges: Tensor):
        super().__init__()
        if edges.ndim != 1 or edges.numel() < 1 or bool((edges[1:] <= edges[:-1]).any()):
            raise ValueError("edges must be a 1-D strictly ascending tensor of segment edges")
        self.net = net
        self.register_buffer("edges", edges.detach().to(torch.float64).clone(), persistent=False)

    @property
    def segments(self) -> int:
        """``k``: the number of segments the student jumps across."""
        return int(self.edges.numel())

    def implied_edge(self, t: Tensor) -> Tensor:
        """``e_k(t) = max{e_j : e_j < t}`` per sample (``t [B]``), in ``t``'s dtype; ``e_0`` for
        ``t ≤ e_0`` (nothing lies below: only the jump of length 0 from ``t = e_0`` is asked there)."""
        e = self.edges.to(device=t.device, dtype=t.dtype)
        i = (torch.searchsorted(e, t.contiguous(), right=False) - 1).clamp_min(0)
        return e[i]

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, cond: Any = None) -> Tensor:
        """``u_θ(x, t)``, the average velocity to ``e_k(t)``; ``s`` (if given) must be that edge, or
        ``t`` itself (a jump of length 0, whatever the velocity)."""
        if s is not None:
            s = s.to(t.dtype)
            ok = (s == t) | torch.isclose(s, self.implied_edge(t), rtol=0.0, atol=1e-6)
            if not bool(ok.all()):
                j = int((~ok).nonzero()[0, 0])
                k = self.segments
                how = f"nfe={k} with gamma=0" + (", or any nfe with gamma=1" if k == 1 else "")
                raise ValueError(
                    f"a one-time student trained for k={k} segment(s) jumps from t={float(t[j]):.6g} only "
                    f"to its segment's lower edge {float(self.implied_edge(t)[j]):.6g}, not to "
                    f"s={float(s[j]):.6g}: sample it with {how}")
        return self.net(x, t, cond=cond)


def one_time_student(net: nn.Module, cfg) -> OneTimeSegmentStudent:
    """Wrap a one-time ``net`` for a TSCD config ``cfg`` (:class:`~flowdistill.distillers.tscd.TSCDConfig`):
    its single ``segments = k`` split of the teacher grid. Several ``segment_choices`` (a unified
    student) are a :class:`~flowdistill.errors.ConfigError`: not well-defined for one time input."""
    ks = cfg.trained_segments
    if len(set(ks)) > 1:
        raise ConfigError(f"distiller.segment_choices={list(ks)}: a one-time student cannot tell which "
                          f"segmentation's edge to jump to (one velocity per (x, t)); for one student "
                          f"serving every step count use distiller.segments=1 and sample with gamma=1")
    return OneTimeSegmentStudent(net, segment_edges(cfg.teacher_grid(dtype=torch.float64), ks[0]))


def one_time_scheduler_config(distiller, student: OneTimeSegmentStudent) -> dict[str, Any]:
    """``FlowDistillScheduler`` keys for a pipeline sampling ``student``: the distiller's own
    (:meth:`~flowdistill.distillers.base.Distiller.scheduler_config`: the segment edges of its
    teacher grid, shift) with the one γ its jumps allow — 1 for ``k = 1`` (every ``nfe``), 0 for
    ``k > 1`` (``nfe = k`` only)."""
    keys = distiller.scheduler_config()
    if keys is None or "segment_steps" not in keys:
        raise ValueError(f"distiller {distiller.name!r} does not sample on segment edges")
    keys = dict(keys)
    keys["gamma"] = 1.0 if student.segments == 1 else 0.0
    return keys
