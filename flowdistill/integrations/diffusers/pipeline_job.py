"""Distil a diffusers pipeline from a job config: ``teacher: {diffusers: PATH, ...}``.

The job puts together the teacher (:mod:`.pipeline_teacher`: the pipeline's denoiser, adapted and
guided), the data (:mod:`.pipeline_data`: prompt / latent caches at the run's latent shape) and the
student (:mod:`.pipeline_student`: LoRA or full copy of the denoiser, its export) with the
distiller (:func:`build_pipeline_job`), trains and exports it (:func:`train_pipeline`), generates
couplings (:func:`couple_pipeline`) and loads a trained run (:func:`load_pipeline_run`). The jobs
layer reaches this module through :func:`flowdistill.api.register_job_kind` (``api.train`` /
``api.load_run`` on such a config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from flowdistill.api import LoadedRun, register_job_kind
from flowdistill.config import JobConfig, diffusers_teacher, load_config, to_yaml
from flowdistill.distillers import DISTILLERS, Distiller
from flowdistill.errors import CheckpointError, ConfigError
from flowdistill.integrations.diffusers.pipeline_data import (
    PromptIndexed,
    PromptSource,
    build_source,
    check_data_name,
    job_latent_shape,
    open_store,
)
from flowdistill.integrations.diffusers.pipeline_student import (
    META_FORMAT,
    build_student,
    denoiser_of,
    export_pipeline_student,
    frozen_student_keys,
    student_params,
)
from flowdistill.integrations.diffusers.pipeline_teacher import (
    PipelineTeacher,
    load_pipeline_teacher,
    teacher_field,
)
from flowdistill.runs import check_run_dir, prepare_run_dir, read_meta
from flowdistill.training.loop import Trainer


# -- the job ----------------------------------------------------------------------------------
@dataclass
class PipelineJob:
    """Everything a pipeline job trains with (built by :func:`build_pipeline_job`)."""

    cfg: JobConfig
    teacher: PipelineTeacher
    distiller: Distiller
    source: PromptSource | None
    latent_shape: tuple[int, int, int]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def time_shift(self) -> float:
        """The pipeline's own sampling-grid shift at the run's latent size."""
        return self.teacher.time_shift(self.latent_shape)


def _wrap_segment_student(student: nn.Module, cfg: JobConfig, two_time: bool) -> nn.Module:
    """TSCD-family methods read a one-time student (``model.params.two_time=false``: a plain LoRA,
    as LCM/PCM ship) as jumps to its segment's edge (:mod:`.segment_student`)."""
    if two_time or not hasattr(cfg.distiller, "trained_segments"):
        return student
    from flowdistill.integrations.diffusers.segment_student import one_time_student

    return one_time_student(student, cfg.distiller)


def _honour_shift(cfg: JobConfig, shift: float) -> None:
    """A teacher grid on the ``shifted`` family takes the pipeline's own shift: TSCD/LCM/PCM's
    ``distiller.shift`` (with ``distiller.grid=shifted``) is set to it, so the segment edges are the
    pipeline scheduler's sigmas. (``sample_grid`` names fix their shift: uniform 1, shifted 3.)"""
    d = cfg.distiller
    if getattr(d, "grid", None) == "shifted" and hasattr(d, "shift"):
        d.shift = float(round(shift, 6))


def build_pipeline_job(cfg: JobConfig, with_teacher: bool = True,
                       latent_shape: tuple[int, ...] | None = None) -> PipelineJob:
    """Teacher, student, distiller and data of a pipeline job (nothing written).

    ``with_teacher=False`` builds the student for sampling only (no teacher field, no cache opened);
    ``latent_shape`` then gives the shape the run trained at (its ``flowdistill.json``)."""
    spec = diffusers_teacher(cfg)
    if spec is None:
        raise ConfigError("teacher: a pipeline job needs teacher.diffusers=PATH")
    cls = DISTILLERS.get(cfg.distiller.name)
    if cls.name == "flow_matching":
        raise ConfigError("distiller.name=flow_matching trains a teacher from scratch; a diffusers pipeline "
                          "is distilled with freeflow, reflow/instaflow, tscd/lcm/pcm or mdt")
    params = student_params(cfg, bool(getattr(cls, "student_two_time", False)))
    check_data_name(cfg)
    teacher = load_pipeline_teacher(spec)
    store = open_store(cfg.data.root, cfg.data.name == "latents") if with_teacher else None
    shape = tuple(latent_shape) if latent_shape else job_latent_shape(teacher, cfg, store)
    _honour_shift(cfg, teacher.time_shift(shape))
    torch.manual_seed(cfg.train.seed)  # the same initial extra weights in every process and run
    source = build_source(cfg, shape, store) if with_teacher else None
    distilled_flux = teacher.class_name == "FluxTransformer2DModel" and teacher.model.config.guidance_embeds
    student = build_student(teacher, cfg, params, cfg.guidance.scale if distilled_flux else None)
    student = _wrap_segment_student(student, cfg, bool(params["two_time"]))
    coupled = hasattr(cfg.distiller, "couplings")
    if coupled and source is not None:  # pairs carry their prompt as an index into the cache
        student = PromptIndexed(student, source.store)
    field_ = None
    if with_teacher:
        negative = source.store.negative() if source is not None and cfg.guidance.scale != 1.0 else None
        field_ = teacher_field(teacher, cfg, negative)
        if coupled:
            field_ = PromptIndexed(field_, source.store)
        distiller = cls(cfg.distiller, student, field_)
    else:
        distiller = cls.for_inference(cfg.distiller, student)
    return PipelineJob(cfg, teacher, distiller, source, shape, params)


def train_pipeline(cfg: JobConfig, resume: bool = False, overwrite: bool = False,
                   on_plot: Any = None) -> Path:
    """:func:`flowdistill.api.train` for a diffusers pipeline teacher: build, train, export."""
    run_dir = Path(cfg.out_dir)
    job = build_pipeline_job(cfg)  # reads only; may set distiller.shift from the pipeline (recorded)
    config_yaml = to_yaml(cfg)
    check_run_dir(run_dir, config_yaml, resume=resume, overwrite=overwrite)
    trainer = Trainer(job.distiller, cfg.train, run_dir, source=job.source, sample_shape=job.latent_shape,
                      on_plot=on_plot, tracker_config=OmegaConf.to_container(OmegaConf.structured(cfg)),
                      constant_keys=frozen_student_keys(job))
    if resume:
        trainer.resume()
    if trainer.is_main:
        prepare_run_dir(run_dir, config_yaml, resume=resume, overwrite=overwrite)
    trainer.acc.wait_for_everyone()
    trainer.fit()
    # under FSDP rank 0 gathers the student into a fresh unsharded one, rebuilt as for sampling
    def fresh() -> nn.Module:
        return build_pipeline_job(cfg, with_teacher=False, latent_shape=job.latent_shape).distiller.student

    student = trainer.eval_student(fresh=fresh)
    if trainer.is_main:
        export_pipeline_student(student, run_dir, job, trainer.step)
    trainer.acc.wait_for_everyone()
    return run_dir


def couple_pipeline(cfg: JobConfig, resume: bool = False, overwrite: bool = False,
                    progress: bool = True) -> Path:
    """:func:`flowdistill.api.couple` for a diffusers teacher: ``distiller.couple.n_pairs`` pairs
    (noise, the guided teacher's ODE solution) with the prompt of each pair drawn from the prompt
    cache (``data.root``) and stored as its index (``distiller.couple.uncond_share`` of them the
    negative prompt), written to ``distiller.couplings``; reflow / InstaFlow then train on them."""
    from flowdistill.data.coupling_generation import generate_couplings
    from flowdistill.data.couplings import state_sha256

    spec, root = getattr(cfg.distiller, "couple", None), getattr(cfg.distiller, "couplings", None)
    if spec is None or not root:
        raise ConfigError(f"distiller {cfg.distiller.name!r} does not train on couplings; "
                          f"`flowdistill couple` needs distiller.name=reflow or instaflow")
    if cfg.data.name != "prompts":
        raise ConfigError("data.name: couplings of a diffusers teacher draw their prompts from a prompt "
                          "cache (data.name=prompts, data.root=CACHE)")
    job = build_pipeline_job(cfg)
    field_ = job.distiller.teacher
    identity = {"teacher": job.teacher.root, "teacher_sha256": "",
                "teacher_state_sha256": state_sha256(field_),
                "guidance": cfg.guidance.header()}
    return generate_couplings(field_, root, spec, job.latent_shape, len(job.source.store), identity,
                              resume=resume, overwrite=overwrite, progress=progress)


# -- loading ----------------------------------------------------------------------------------
@dataclass
class PipelineRun(LoadedRun):
    """A trained pipeline run: the student (the pipeline's denoiser with the run's LoRA / weights,
    behind its adapter) and its sampler; :meth:`sample` gives latents for given prompt embeddings."""

    teacher: PipelineTeacher | None = None
    latent_shape: tuple[int, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def denoiser(self) -> nn.Module:
        """The student's diffusers model (LoRA merged in peft's layers, second time installed)."""
        return denoiser_of(self.student)

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The ``FlowDistillScheduler`` keys the run samples with."""
        return dict(self.meta.get("scheduler", {}))

    @torch.no_grad()
    def sample(self, n: int, nfe: int, seed: int = 0, cond: Any = None, solver: str | None = None,
               device: str = "cpu", **options: Any) -> Tensor:
        """``n`` latents ``[n, C, h, w]`` at ``nfe`` student evaluations from seeded noise.

        ``cond`` is the prompts' embeddings: a dict (or :class:`~.adapters.TextCondition`) with
        ``prompt_embeds [n or 1, L, D]`` (and ``pooled_prompt_embeds``); the latents are in the
        transformer's input space (decode with the VAE after undoing its scaling/shift)."""
        if n <= 0 or nfe <= 0:
            raise ConfigError(f"n and nfe must be positive, got n={n}, nfe={nfe}")
        if cond is None:
            raise ConfigError("a pipeline student needs cond: the prompts' embeddings (prompt_embeds, ...)")
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(n, *self.latent_shape, generator=g).to(device)
        if isinstance(cond, dict):
            cond = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in cond.items()}
        if solver is not None:
            options["solver"] = solver
        return self.distiller.sample(noise, nfe, cond=cond, model=self.student.to(device), **options)


def load_pipeline_run(run_dir: str | Path, cfg: JobConfig | None = None) -> PipelineRun:
    """Rebuild a pipeline run's student: the teacher pipeline's denoiser (``teacher.diffusers`` of
    the run's config) with the exported LoRA (or full weights) and second time embedding."""
    run_dir = Path(run_dir)
    if run_dir.name == "student" and (run_dir.parent / "config.yaml").is_file():
        run_dir = run_dir.parent
    cfg = cfg if cfg is not None else load_config(run_dir / "config.yaml")
    sdir = run_dir / "student"
    meta = read_meta(sdir)
    if meta.get("format") != META_FORMAT:
        raise CheckpointError(f"{run_dir} has no exported pipeline student (student/flowdistill.json; "
                              f"training unfinished?)")
    job = build_pipeline_job(cfg, with_teacher=False, latent_shape=tuple(meta["latent_shape"]))
    model = denoiser_of(job.distiller.student)
    if cfg.model.name == "diffusers_lora":
        _load_lora_into(model, sdir)
    else:
        import diffusers

        full = getattr(diffusers, job.teacher.class_name).from_pretrained(
            str(sdir / job.teacher.subfolder), torch_dtype=next(model.parameters()).dtype)
        missing, unexpected = model.load_state_dict(full.state_dict(), strict=False)
        if unexpected or [k for k in missing if not k.startswith("flowdistill_second_time")]:
            raise CheckpointError(f"{sdir}: the saved {job.teacher.subfolder} does not match the teacher's")
    if meta.get("two_time"):
        from flowdistill.integrations.diffusers.two_time import load_second_time

        load_second_time(model, sdir)
    student = job.distiller.student.eval()
    return PipelineRun(cfg, student, job.distiller, run_dir, teacher=job.teacher,
                       latent_shape=job.latent_shape, meta=meta)


def _load_lora_into(model: nn.Module, sdir: Path) -> None:
    """Set the peft adapter weights of ``model`` (built with the run's LoRA config) from
    ``pytorch_lora_weights.safetensors`` (keys ``transformer.…`` / ``unet.…`` in diffusers' format)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    f = sdir / "pytorch_lora_weights.safetensors"
    if not f.is_file():
        raise CheckpointError(f"{sdir}: no pytorch_lora_weights.safetensors")
    state = load_file(str(f))
    prefix = next((p for p in ("transformer.", "unet.") if all(k.startswith(p) for k in state)), "")
    state = {k[len(prefix):]: v for k, v in state.items()}
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise CheckpointError(f"{f}: keys that the run's LoRA config does not have: {unexpected[:3]}")


register_job_kind("diffusers", train=train_pipeline, load=load_pipeline_run,
                  build=partial(build_pipeline_job, with_teacher=True), couple=couple_pipeline)
