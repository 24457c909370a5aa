"""A job's teacher field: its ``guidance:`` section applied once, where the teacher is built.

The maths lives in :mod:`flowdistill.core.guidance` (CFG, guidance interval, autoguidance,
per-sample scales; :func:`~flowdistill.core.guidance.build_guidance`). This module does what the
core cannot: it loads the weaker model that autoguidance names (a saved model directory or a run
directory), checks it and the teacher against the settings, and turns every problem into a
one-line :class:`~flowdistill.errors.ConfigError` naming the key. It serves every place a
velocity teacher is built — a distillation job's teacher (``api.build_distiller_for``), coupling
generation (``api.couple``) and sampling a flow-matching run (``api.load_run``) — so
they cannot disagree.

A *distilled* two-time student ``u(x, t, s)`` is not a velocity field. :class:`FlowMapTeacher`
makes it a teacher whose solver step ``t → s`` is its own jump (Hyper-SD's previous stage as the
next stage's teacher), for the methods that declare they take one
(``Distiller.accepts_flow_map_teacher``); :func:`flow_map_teacher` is the one check every loader
calls, a one-line :class:`~flowdistill.errors.ConfigError` for any other method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from flowdistill.core.flowmap import flow_map_jump
from flowdistill.core.guidance import GuidanceSpec
from flowdistill.core.registry import UnknownNameError
from flowdistill.errors import CheckpointError, ConfigError, FlowDistillError


def num_classes_of(net: nn.Module) -> int:
    """Classes a saved net is conditioned on (``config.num_classes``; ``0``: unconditional)."""
    return int(getattr(getattr(net, "config", None), "num_classes", 0) or 0)


@dataclass
class TeacherGuidance:
    """A job's guidance, ready to apply: ``guide(net)`` is the guided field of ``net``.

    ``bad`` is the loaded weaker model (autoguidance) or ``None``; ``null_label`` the label of the
    unconditional branch (``num_classes``) or ``None`` for an unconditional net.
    """

    spec: GuidanceSpec
    null_label: int | None
    bad: nn.Module | None = None

    def __call__(self, net: nn.Module) -> nn.Module:
        """``net`` guided (:meth:`GuidanceSpec.build`): a new wrapper around it, nothing copied."""
        return self.spec.build(net, null_label=self.null_label, bad=self.bad)


def _weak_model_dir(path: str) -> Path:
    from flowdistill.models.loading import find_model_dir

    try:
        return find_model_dir(path, "guidance.autoguidance")
    except CheckpointError as e:
        raise ConfigError(f"{e} (name a weaker model of the same task: a saved model directory or a "
                          f"run directory)") from None


def load_weak_model(spec: GuidanceSpec, net: nn.Module, role: str = "teacher",
                    sample_shape: tuple[int, ...] | None = None) -> nn.Module | None:
    """The frozen weaker model ``guidance.autoguidance`` names (``None`` when it names none).

    It must take the same conditions as ``net`` and, given ``sample_shape``, map a batch of that
    shape to itself; anything else is a :class:`~flowdistill.errors.ConfigError` naming the key.
    """
    if not spec.autoguidance:
        return None
    from flowdistill.models.loading import load_model_dir  # models import the registries

    d = _weak_model_dir(spec.autoguidance)
    try:
        bad = load_model_dir(d)
    except (FlowDistillError, UnknownNameError, KeyError, ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"guidance.autoguidance: {d} cannot be loaded: {msg}") from None
    nb, ng = num_classes_of(bad), num_classes_of(net)
    if nb != ng:
        raise ConfigError(f"guidance.autoguidance: the weaker model in {d} has num_classes={nb}, the {role} "
                          f"{ng}; autoguidance needs a model of the same task and conditioning")
    if sample_shape is not None:
        x = torch.zeros(2, *sample_shape)
        try:
            with torch.no_grad():
                y = bad(x, torch.full((2,), 0.5))
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"guidance.autoguidance: the weaker model in {d} does not accept data of shape "
                              f"{list(sample_shape)}: {msg}") from None
        if y.shape != x.shape:
            raise ConfigError(f"guidance.autoguidance: the weaker model in {d} maps {list(x.shape)} to "
                              f"{list(y.shape)}; shapes must match")
    return bad.requires_grad_(False).eval()


def guidance_for(spec: GuidanceSpec | None, net: nn.Module, role: str = "teacher",
                 sample_shape: tuple[int, ...] | None = None) -> TeacherGuidance | None:
    """``net``'s guidance as ``spec`` (a job's ``guidance:`` section) says, or ``None`` when it asks
    for none. Classifier-free guidance of an unconditional ``net`` and a bad weaker model are
    :class:`~flowdistill.errors.ConfigError`\\ s naming the key; ``role`` names ``net`` in them."""
    if spec is None or not spec.active:
        return None
    nc = num_classes_of(net)
    if nc == 0 and not spec.autoguidance:
        value = spec.scale if spec.key == "guidance.scale" else list(spec.scale_range)
        raise ConfigError(f"{spec.key}={value}: classifier-free guidance needs a class-conditional {role} "
                          f"(num_classes > 0) and this one is unconditional; guide it with "
                          f"guidance.autoguidance=PATH (a weaker model) instead")
    return TeacherGuidance(spec, nc if nc > 0 else None, load_weak_model(spec, net, role, sample_shape))


def guide(spec: GuidanceSpec | None, net: nn.Module, role: str = "teacher",
          sample_shape: tuple[int, ...] | None = None) -> nn.Module:
    """``net`` guided once as ``spec`` says (``net`` itself when it asks for no guidance)."""
    g = guidance_for(spec, net, role, sample_shape)
    return net if g is None else g(net)


# -- a distilled flow map as a teacher -----------------------------------------------------------
def is_flow_map_net(net: nn.Module) -> bool:
    """Whether a saved net is a two-time flow-map network ``u(x, t, s)`` (``config.two_time``)."""
    return bool(getattr(getattr(net, "config", None), "two_time", False))


class FlowMapTeacher(nn.Module):
    """A distilled two-time student used as a teacher: its step ``t → s`` is its own jump.

    With ``u`` the wrapped average-velocity net, the flow map is

        X(x, t, s) = x + (s − t)·u(x, t, s)

    and :meth:`jump` returns it; :func:`flowdistill.core.solvers.step` dispatches to :meth:`jump`
    (:class:`~flowdistill.core.solvers.JumpField`), so a consistency loss's "teacher solver step
    ``t → t'``" becomes the previous student's ``X_prev(x_t, t, t')`` — exact for the jumps that
    student was trained on (Hyper-SD's progressive schedule, previous stage as teacher).
    Calling it as a field gives the flow map's instantaneous velocity ``u(x, t, t) = ∂_s X(x, t, s)|_{s=t}``
    (its tangent), so the diagonal stays available (e.g. a reference ODE), but the jobs that need a
    velocity teacher refuse it at load time (:func:`flow_map_teacher`).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def config(self):
        """The wrapped net's saved config (``num_classes``, ``two_time`` …)."""
        return self.net.config

    def jump(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        """``X(x, t, s) = x + (s − t)·u(x, t, s)`` for per-sample times ``t, s [B]``."""
        return flow_map_jump(self.net, x, t, s, cond)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The instantaneous velocity ``u(x, t, t)``."""
        return self.net(x, t, t, cond=cond)


def flow_map_teacher(net: nn.Module, where: str | Path, method: str, accepts: bool,
                     guidance: GuidanceSpec | None = None) -> FlowMapTeacher:
    """``net`` (a two-time flow map loaded from ``where``) as the teacher of ``method`` (words for the
    message, e.g. ``distiller 'tscd'``).

    ``accepts`` is the method's ``accepts_flow_map_teacher``; a method that needs a velocity teacher
    and a ``guidance:`` section (a flow map's guided jump is not defined here) are one-line
    :class:`~flowdistill.errors.ConfigError`\\ s naming the key.
    """
    if not accepts:
        raise ConfigError(f"teacher={where} is a two-time flow map u(x, t, s) (a distilled student), not a "
                          f"velocity field; {method} needs a velocity teacher v(x, t): name a flow-matching "
                          f"teacher (a flow-map teacher serves methods that take its jumps, e.g. tscd)")
    if guidance is not None and guidance.active:
        raise ConfigError(f"{guidance.key}: teacher={where} is a two-time flow map (a distilled student, "
                          f"already guided when it was trained); a flow-map teacher is used unguided")
    return FlowMapTeacher(net.requires_grad_(False).eval())
