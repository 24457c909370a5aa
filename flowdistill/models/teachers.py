"""A job's teacher field: its ``guidance:`` section applied once, where the teacher is built.

The maths lives in :mod:`flowdistill.core.guidance` (CFG, guidance interval, autoguidance,
per-sample scales; :func:`~flowdistill.core.guidance.build_guidance`). This module does what the
core cannot: it loads the weaker model that autoguidance names (a saved model directory or a run
directory), checks it and the teacher against the settings, and turns every problem into a
one-line :class:`~flowdistill.errors.ConfigError` naming the key. It serves every place a
velocity teacher is built — a distillation job's teacher (``api.build_distiller_for``), coupling
generation (``api.couple``) and sampling a flow-matching run (``api.load_run``) — so
they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

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
