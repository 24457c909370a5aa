"""Building a job's distiller: the student (from the teacher's architecture and weights, or from the
dataset's shapes), the guided teacher, and the checks between them (:func:`build_distiller_for`,
re-exported by :mod:`flowdistill.api`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowdistill.config import JobConfig
from flowdistill.core.registry import UnknownNameError
from flowdistill.data.registry import sample_shape_of
from flowdistill.distillers import DISTILLERS, Distiller
from flowdistill.errors import ConfigError
from flowdistill.models import MODELS, build_model, init_from
from flowdistill.models.loading import find_model_dir, load_model_dir
from flowdistill.models.teachers import flow_map_teacher, guidance_for, guide, is_flow_map_net


def _default_params(cfg: JobConfig, num_classes: int, two_time: bool) -> dict[str, Any]:
    params = dict(cfg.model.params)
    shape = sample_shape_of(cfg.data)
    if cfg.model.name == "mlp":
        params.setdefault("data_dim", shape[0])
    else:  # images [C, H, W]; video clips [F, C, H, W] (channels after the frame axis)
        params.setdefault("in_channels", shape[1] if len(shape) == 4 else shape[0])
        params.setdefault("sample_size", shape[-1])
    if _model_takes(cfg.model.name, "num_classes"):  # a tokenizer is unconditional and one-time
        params.setdefault("num_classes", num_classes)
    if _model_takes(cfg.model.name, "two_time") or two_time:
        params["two_time"] = two_time
    return params


def _model_takes(name: str, key: str) -> bool:
    """Whether the registered model ``name``'s constructor has the argument ``key``."""
    import inspect

    return key in inspect.signature(MODELS.get(name).__init__).parameters


# -- building -----------------------------------------------------------------------------
def build_distiller_for(cfg: JobConfig, source=None) -> Distiller:
    """Student (and teacher, when the method needs one) and the distiller around them.

    A distilled student is built with the teacher's architecture and sizes (``model.params``
    override single values) and starts from its weights. A teacher of another architecture than
    ``model.name``, a size change that the teacher's weights cannot fill, or data the nets cannot
    take is a :class:`~flowdistill.errors.ConfigError` saying what the teacher is.

    The teacher is frozen and guided once here, as the job's ``guidance:`` section says
    (:func:`flowdistill.models.teachers.guide` → :func:`flowdistill.core.guidance.build_guidance`), after
    the architecture checks have run on the bare net; the distiller receives the ready field. A
    flow-matching student (a teacher-to-be) gets the same guidance for sampling
    (:attr:`~flowdistill.distillers.base.Distiller.guided_sampling`).

    A teacher that is itself a distilled two-time flow map (an earlier stage's student, Hyper-SD's
    previous stage as teacher) is wrapped in :class:`~flowdistill.models.teachers.FlowMapTeacher`
    (its solver step is its jump) when the method declares ``accepts_flow_map_teacher``, and is a
    one-line ConfigError otherwise (:func:`~flowdistill.models.teachers.flow_map_teacher`).
    """
    cls = DISTILLERS.get(cfg.distiller.name)
    _check_guidance_use(cfg, cls)
    two_time = bool(getattr(cls, "student_two_time", False))
    torch.manual_seed(cfg.train.seed)  # same initial weights in every process and every run
    teacher = None
    if cls.needs_teacher:
        if not cfg.teacher:
            raise ConfigError(f"distiller {cls.name!r} needs a teacher: set teacher=PATH "
                              f"(a run's student/ directory)")
        teacher_dir = find_model_dir(cfg.teacher, "teacher")
        try:
            teacher = load_model_dir(teacher_dir)
        except UnknownNameError as e:
            raise ConfigError(f"teacher {teacher_dir}: {e} (a model of your own registers when its "
                              f"module is imported: --plugin MODULE)") from None
        flow_map = is_flow_map_net(teacher)
        if flow_map:  # refuse early, before any student is built
            flow_map_teacher(teacher, cfg.teacher, f"distiller {cls.name!r}",
                             getattr(cls, "accepts_flow_map_teacher", False), cfg.guidance)
        _check_architecture(teacher, teacher_dir, cfg)
        params = {**dict(teacher.config), **dict(cfg.model.params), "two_time": two_time}
        params = {k: v for k, v in params.items() if not k.startswith("_")}
        student = build_model(cfg.model.name, **params)
        _check_compatible(student, teacher, cfg)
        try:
            init_from(student, teacher)  # same-named tensors; a shape mismatch is a ValueError
        except (RuntimeError, ValueError) as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0].removeprefix("init_from: ")
            if "mismatch" not in msg:
                raise ConfigError(f"the student cannot start from teacher {teacher_dir}: {msg}") from None
            changed = {k: v for k, v in dict(cfg.model.params).items() if teacher.config.get(k, v) != v}
            what = (", ".join(f"model.params.{k}={v!r} (teacher: {teacher.config[k]!r})"
                              for k, v in changed.items()) or "the student's sizes")
            raise ConfigError(f"the student cannot start from teacher {teacher_dir}: {what} change its "
                              f"tensor sizes (size mismatch: {msg})") from None
        if flow_map:
            teacher = flow_map_teacher(teacher, cfg.teacher, f"distiller {cls.name!r}", True, cfg.guidance)
        else:
            teacher = guide(cfg.guidance, teacher, "teacher", sample_shape_of(cfg.data))
    else:
        num_classes = source.num_classes if source is not None else 0
        student = build_model(cfg.model.name, **_default_params(cfg, num_classes, two_time))
    if cfg.init:
        _init_student(student, cfg.init)
    distiller = cls(cfg.distiller, student, teacher)
    distiller.sample_guidance = _sampling_guidance(cfg, cls, student)
    return distiller


def _check_guidance_use(cfg: JobConfig, cls: type[Distiller]) -> None:
    """A ``guidance:`` setting that nothing would use is a :class:`~flowdistill.errors.ConfigError`."""
    g = cfg.guidance
    if g.active and not cls.needs_teacher and not cls.guided_sampling:
        raise ConfigError(f"{g.key}: distiller {cls.name!r} has no teacher to guide and samples unguided")
    if g.scale_range and not cls.draws_guidance_scale:
        raise ConfigError(f"guidance.scale_range={list(g.scale_range)}: distiller {cls.name!r} does not draw "
                          f"per-sample guidance scales; set guidance.scale")


def _sampling_guidance(cfg: JobConfig, cls: type[Distiller], student: nn.Module):
    """The run's guidance for sampling its student (``None`` unless the method has
    :attr:`~flowdistill.distillers.base.Distiller.guided_sampling`): one
    :class:`~flowdistill.models.teachers.TeacherGuidance`, the weaker model loaded once."""
    if not cls.guided_sampling:
        return None
    return guidance_for(cfg.guidance, student, "model", sample_shape_of(cfg.data))


def _inference_distiller(cfg: JobConfig, student: nn.Module) -> Distiller:
    """``for_inference`` of the run's distiller, with the run's guidance for sampling."""
    cls = DISTILLERS.get(cfg.distiller.name)
    return cls.for_inference(cfg.distiller, student, guidance=_sampling_guidance(cfg, cls, student))


#: Config entries that say what a saved net is, in the order they are reported.
_KEY_PARAMS = ("data_dim", "in_channels", "sample_size", "patch_size", "hidden", "depth", "heads",
               "base_channels", "channel_mults", "num_res_blocks", "num_classes", "two_time")


def _describe_model(model: nn.Module) -> str:
    """``name=value`` of a saved net's key config entries (all of them, up to 8, for an unknown net)."""
    conf = {k: v for k, v in dict(getattr(model, "config", {}) or {}).items() if not k.startswith("_")}
    keys = [k for k in _KEY_PARAMS if k in conf] or sorted(conf)[:8]
    return ", ".join(f"{k}={conf[k]}" for k in keys)


def _check_architecture(teacher: nn.Module, teacher_dir: Path, cfg: JobConfig) -> None:
    """The student is built with the teacher's architecture: ``model.name`` must name it."""
    wanted = MODELS.get(cfg.model.name)  # an unknown name lists the registered ones
    if isinstance(teacher, wanted):
        return
    tname = next((n for n in MODELS.names() if MODELS.get(n) is type(teacher)), None)
    registered = f"; registered as model {tname!r}" if tname else ""
    fix = f"set model.name={tname}" if tname else "set model.name to the teacher's architecture"
    raise ConfigError(
        f"teacher {teacher_dir} holds a {type(teacher).__name__} (config.json _class_name{registered}) "
        f"with {_describe_model(teacher)}; the config asks for model.name={cfg.model.name!r} "
        f"({wanted.__name__}), but the student takes the teacher's architecture: {fix}")


def _check_compatible(student: nn.Module, teacher: nn.Module, cfg: JobConfig) -> None:
    """Teacher and student take the dataset's sample shape, map it to itself and agree on classes."""
    shape = sample_shape_of(cfg.data)
    for name, m in (("teacher", teacher), ("student", student)):
        x = torch.zeros(2, *shape)
        t = torch.full((2,), 0.5)
        try:
            with torch.no_grad():
                y = m(x, t)
        except Exception as e:
            desc = f" ({type(m).__name__}: {_describe_model(m)})" if name == "teacher" else ""
            raise ConfigError(f"{name}{desc} does not accept data of shape {list(shape)} "
                              f"(dataset {cfg.data.name!r}): {str(e).splitlines()[0]}") from None
        if y.shape != x.shape:
            raise ConfigError(f"{name} maps {list(x.shape)} to {list(y.shape)}; shapes must match")
    tc = getattr(teacher.config, "num_classes", 0)
    sc = getattr(student.config, "num_classes", 0)
    if tc != sc:
        raise ConfigError(f"conditioning mismatch: teacher has num_classes={tc}, student {sc}")


def _init_student(student: nn.Module, path: str) -> None:
    """Start ``student`` from the saved model ``init`` names (a recipe's earlier stage, e.g. the
    previous segment count of a progressive schedule) instead of from the teacher: same-named
    tensors are copied (:func:`flowdistill.models.init_from`); a shape mismatch is a ConfigError."""
    init_dir = find_model_dir(path, "init")
    src = load_model_dir(init_dir)
    try:
        init_from(student, src)
    except ValueError as e:
        raise ConfigError(f"init={path}: the student cannot start from {init_dir}: "
                          f"{str(e).removeprefix('init_from: ')}") from None
