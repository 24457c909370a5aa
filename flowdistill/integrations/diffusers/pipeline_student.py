"""The student of a pipeline job: its parameters, how it is built, and its export.

Students (``model.name``): ``diffusers_lora`` (peft LoRA on a copy of the denoiser,
``model.params.{rank, alpha, target_modules}``) or ``diffusers_full`` (every weight of the copy
trains); ``two_time`` adds the zero-initialised second time embedding
(:func:`~.two_time.add_second_time`, ``u(x, t, s) = v(x, t)`` at step 0) for flow-map methods;
``gradient_checkpointing`` turns on diffusers' checkpointing. The weights' dtype is the teacher's
(``teacher.dtype``); a LoRA student's trainable weights (adapters, second time) are float32. The
run directory's format is :func:`export_pipeline_student` / :func:`~.pipeline_job.load_pipeline_run`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from flowdistill.config import JobConfig
from flowdistill.errors import ConfigError
from flowdistill.integrations.diffusers.adapters import _CLASS_TO_ADAPTER, adapt_teacher
from flowdistill.integrations.diffusers.pipeline_teacher import PipelineTeacher

if TYPE_CHECKING:
    from flowdistill.integrations.diffusers.pipeline_job import PipelineJob

#: Student kinds of a pipeline job (``model.name``).
STUDENT_KINDS = ("diffusers_lora", "diffusers_full")
#: ``model.params`` keys a pipeline student takes, with their defaults.
STUDENT_PARAMS: dict[str, Any] = {"rank": 8, "alpha": None, "target_modules": None, "two_time": None,
                                  "gradient_checkpointing": False, "delta_time_scale": 1000.0}
META_FORMAT = "flowdistill-pipeline-student-v1"


def student_params(cfg: JobConfig, two_time_method: bool) -> dict[str, Any]:
    """``model.params`` with defaults; unknown keys and a student the method cannot train are errors."""
    if cfg.model.name not in STUDENT_KINDS:
        raise ConfigError(f"model.name={cfg.model.name!r}: a diffusers pipeline student is "
                          f"{' or '.join(STUDENT_KINDS)}")
    given = dict(cfg.model.params)
    unknown = sorted(set(given) - set(STUDENT_PARAMS))
    if unknown:
        raise ConfigError(f"model.params.{unknown[0]}: unknown for {cfg.model.name} (takes "
                          f"{', '.join(STUDENT_PARAMS)})")
    p = {**STUDENT_PARAMS, **given}
    if p["two_time"] is None:
        p["two_time"] = two_time_method
    segmented = hasattr(cfg.distiller, "trained_segments")  # TSCD/LCM/PCM: one-time via segment_student
    if bool(p["two_time"]) != two_time_method and not (segmented and not p["two_time"]):
        need = "a two-time (flow-map)" if two_time_method else "a one-time"
        raise ConfigError(f"model.params.two_time={p['two_time']}: distiller {cfg.distiller.name!r} trains "
                          f"{need} student")
    if cfg.model.name == "diffusers_lora" and not int(p["rank"]) >= 1:
        raise ConfigError(f"model.params.rank must be >= 1, got {p['rank']}")
    return p


def build_student(teacher: PipelineTeacher, cfg: JobConfig, params: dict[str, Any],
                  guidance_scale: float | None) -> nn.Module:
    """A copy of the teacher's denoiser with LoRA (or all weights trainable), checkpointing and the
    second time embedding as ``params`` say, behind its adapter (our call signature)."""
    model = copy.deepcopy(teacher.model)
    if cfg.model.name == "diffusers_lora":
        from flowdistill.integrations.diffusers.lora import DEFAULT_TARGETS, add_lora

        targets = params["target_modules"] or DEFAULT_TARGETS
        try:
            model = add_lora(model, rank=int(params["rank"]), alpha=params["alpha"],
                             target_modules=list(targets))
        except ValueError as e:
            raise ConfigError(f"model.params: {e}") from None
    else:
        model.requires_grad_(True)
    if params["gradient_checkpointing"]:
        model.enable_gradient_checkpointing()
    model.train()
    kw = teacher.adapter_kwargs(guidance_scale)
    if params["two_time"]:
        from flowdistill.integrations.diffusers.two_time import add_second_time

        student = add_second_time(model, float(params["delta_time_scale"]), **kw)
    else:
        student = adapt_teacher(model, **kw)
    if cfg.model.name == "diffusers_lora":
        _float32_trainables(model)
    return student


def _float32_trainables(model: nn.Module) -> None:
    """LoRA adapters and the second time embedding train in float32 over bf16/fp16 base weights
    (diffusers' training scripts' ``cast_training_params``): AdamW steps on half-precision weights
    round small updates away. peft and the second-time hook cast activations at the boundary."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()


def denoiser_of(student: nn.Module) -> nn.Module:
    """The diffusers model inside a student (two-time wrapper, segment student, adapter)."""
    for _ in range(5):
        if type(student).__name__ in _CLASS_TO_ADAPTER:
            return student
        inner = next((getattr(student, a) for a in ("adapter", "net", "model")
                      if isinstance(getattr(student, a, None), nn.Module)), None)
        if inner is None:
            break
        student = inner
    raise ValueError(f"no diffusers model inside {type(student).__name__}")


def scheduler_keys(job: PipelineJob) -> dict[str, Any]:
    """The ``FlowDistillScheduler`` config the student samples with: the distiller's own
    (:meth:`~flowdistill.distillers.base.Distiller.scheduler_config`), else the shift of its
    ``sample_grid`` (uniform 1, shifted 3: :func:`~.export.scheduler_kwargs`)."""
    from flowdistill.integrations.diffusers.export import _grid_shift

    own = job.distiller.scheduler_config()
    keys = dict(own) if own is not None else {"shift": _grid_shift(job.cfg.distiller)}
    seg = job.distiller.student
    if type(seg).__name__ == "OneTimeSegmentStudent":
        from flowdistill.integrations.diffusers.segment_student import one_time_scheduler_config

        keys = one_time_scheduler_config(job.distiller, seg)
    return keys


def export_pipeline_student(student: nn.Module, run_dir: Path, job: PipelineJob, steps: int) -> Path:
    """Write ``run_dir/student/`` (see ``/tmp/me/run_format15.md`` and :func:`load_pipeline_run`):
    LoRA weights in ``load_lora_weights`` format (or the full denoiser under ``transformer/`` /
    ``unet/``), ``second_time.safetensors`` for a two-time student, the ``FlowDistillScheduler``
    config and ``flowdistill.json``."""
    from flowdistill.atomic import atomic_dir
    from flowdistill.integrations.diffusers.scheduler import FlowDistillScheduler

    model = denoiser_of(student)
    keys = scheduler_keys(job)
    with atomic_dir(run_dir / "student") as tmp:
        if job.cfg.model.name == "diffusers_lora":
            from flowdistill.integrations.diffusers.lora import save_lora

            save_lora(model, tmp, scheduler=keys)
        else:
            from flowdistill.integrations.diffusers.two_time import ATTR

            extra = model._modules.pop(ATTR, None)  # the second time saves on its own
            try:
                model.save_pretrained(str(tmp / job.teacher.subfolder), safe_serialization=True)
            finally:
                if extra is not None:
                    model._modules[ATTR] = extra
            FlowDistillScheduler(**keys).save_config(str(tmp))
        if job.params.get("two_time"):
            from flowdistill.integrations.diffusers.two_time import save_second_time

            save_second_time(model, tmp)
        meta = {"format": META_FORMAT, "distiller": job.cfg.distiller.name, "steps": int(steps),
                "student": job.cfg.model.name, "two_time": bool(job.params.get("two_time")),
                "pipeline": job.teacher.root, "pipeline_class": job.teacher.pipeline_class,
                "denoiser_class": job.teacher.class_name, "subfolder": job.teacher.subfolder,
                "latent_shape": list(job.latent_shape), "teacher_time_shift": job.time_shift,
                "scheduler": keys}
        (tmp / "flowdistill.json").write_text(json.dumps(meta, indent=2))
    return run_dir / "student"


def frozen_student_keys(job: PipelineJob) -> frozenset[str]:
    """A LoRA student's frozen base weights and buffers (``student.…`` keys: every tensor of the student
    but its trainable parameters): copies of the teacher's that never change (the denoisers keep no
    running statistics), left out of checkpoints — a SD3-medium checkpoint is then its adapters and
    second time embedding, not 4 GB."""
    if job.cfg.model.name != "diffusers_lora":
        return frozenset()
    student = job.distiller.student
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    return frozenset(f"student.{k}" for k in student.state_dict() if k not in trained)

