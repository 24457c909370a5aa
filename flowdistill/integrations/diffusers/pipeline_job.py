"""Distil a diffusers pipeline from a job config: ``teacher: {diffusers: PATH, ...}``.

The chain (issue 15): the pipeline's denoiser (``transformer/`` or ``unet/``) is loaded from the
directory (:func:`load_pipeline_teacher`; local files only unless the user names a hub id), the
adapter is chosen from its class (:func:`~.adapters.adapt_teacher`: SD3 / Flux / DDPM UNets, our
convention ``x_t = (1 − t)·x + t·ε``), the pipeline's scheduler config gives the prediction type
and DDPM schedule (UNets) and the time shift (flow models: a constant ``shift``, or Flux/SD3's
resolution-dependent ``μ`` at the run's latent size, ``shift = e^μ``), and the job's
``guidance.scale`` guides the teacher with the prompt cache's negative embedding
(:class:`~.adapters.TextCFGField`; a guidance-distilled Flux takes it as its embedded guidance).

Batches come from the prompt-embedding cache (``data: {name: prompts, root: CACHE}``: condition-only
items, the loop adds the prior noise of the latent shape for data-free methods) or the latent cache
(``data.name=latents``: ``x`` and ``cond``). The latent shape is the VAE's downsampling of
``data.image_size`` pixels with the denoiser's channels (Flux: unpacked, ``in_channels/4``);
``data.image_size=0`` takes the shape the cache recorded (:func:`job_latent_shape`). Reflow and
InstaFlow train on couplings the guided teacher generates (:func:`couple_pipeline`): each pair keeps
its prompt as an index into the cache, and :class:`PromptIndexed` looks the embeddings up.

Students (``model.name``): ``diffusers_lora`` (peft LoRA on a copy of the denoiser,
``model.params.{rank, alpha, target_modules}``) or ``diffusers_full`` (every weight of the copy
trains); ``two_time`` adds the zero-initialised second time embedding
(:func:`~.two_time.add_second_time`, ``u(x, t, s) = v(x, t)`` at step 0) for flow-map methods;
``gradient_checkpointing`` turns on diffusers' checkpointing. The weights' dtype is the teacher's
(``teacher.dtype``); a LoRA student's trainable weights (adapters, second time) are float32. The
run directory's format is :func:`export_pipeline_student` / :func:`load_pipeline_run`; the jobs
layer reaches this module through :func:`flowdistill.api.register_job_kind` (``api.train`` /
``api.load_run`` on such a config).
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from flowdistill.api import LoadedRun, register_job_kind
from flowdistill.config import DiffusersTeacherSpec, JobConfig, diffusers_teacher, load_config, to_yaml
from flowdistill.data.registry import register_dataset
from flowdistill.data.sources import IndexedSource
from flowdistill.distillers import DISTILLERS, Distiller
from flowdistill.errors import CheckpointError, ConfigError
from flowdistill.integrations.diffusers.adapters import (
    _CLASS_TO_ADAPTER,
    TextCFGField,
    adapt_teacher,
    calculate_shift,
)
from flowdistill.runs import check_run_dir, prepare_run_dir, read_meta
from flowdistill.training.loop import Trainer

#: Student kinds of a pipeline job (``model.name``).
STUDENT_KINDS = ("diffusers_lora", "diffusers_full")
#: ``model.params`` keys a pipeline student takes, with their defaults.
STUDENT_PARAMS: dict[str, Any] = {"rank": 8, "alpha": None, "target_modules": None, "two_time": None,
                                  "gradient_checkpointing": False, "delta_time_scale": 1000.0}
#: The pipeline class whose ``load_lora_weights`` takes a LoRA of each denoiser class.
PIPELINE_OF = {"SD3Transformer2DModel": "StableDiffusion3Pipeline", "FluxTransformer2DModel": "FluxPipeline",
               "UNet2DConditionModel": "StableDiffusionPipeline", "UNet2DModel": "DDPMPipeline"}
META_FORMAT = "flowdistill-pipeline-student-v1"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# -- the teacher ------------------------------------------------------------------------------
@dataclass
class PipelineTeacher:
    """A pipeline's denoiser and what the job needs to know of the pipeline around it."""

    root: str  # the pipeline directory (or hub id)
    local: bool  # read from disk only (False: a hub id the user named)
    subfolder: str  # "transformer" | "unet"
    class_name: str  # the denoiser's diffusers class
    model: nn.Module
    model_index: dict[str, Any]
    scheduler_config: dict[str, Any]
    vae_scale: int  # pixels per latent cell (2 ** (VAE levels − 1))

    @property
    def pipeline_class(self) -> str:
        """The pipeline class named in ``model_index.json``."""
        return str(self.model_index.get("_class_name", PIPELINE_OF.get(self.class_name, "")))

    @property
    def flow_matching(self) -> bool:
        """Whether the denoiser is a flow-matching transformer (SD3, Flux)."""
        return self.class_name in ("SD3Transformer2DModel", "FluxTransformer2DModel")

    def adapter_kwargs(self, guidance_scale: float | None = None) -> dict[str, Any]:
        """Keywords for :func:`~.adapters.adapt_teacher` from the scheduler config."""
        if self.class_name == "SD3Transformer2DModel":
            return {"num_train_timesteps": int(self.scheduler_config.get("num_train_timesteps", 1000))}
        if self.class_name == "FluxTransformer2DModel":
            return {"guidance_scale": 3.5 if guidance_scale is None else float(guidance_scale)}
        return {"scheduler_config": dict(self.scheduler_config)}

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents of ``image_size`` pixels (the pipelines' own rounding)."""
        conf, vs = self.model.config, self.vae_scale
        if self.class_name == "FluxTransformer2DModel":
            if image_size % (2 * vs):
                raise ConfigError(f"data.image_size={image_size}: Flux needs a multiple of {2 * vs} pixels "
                                  f"(VAE factor {vs} × 2×2 packing)")
            h = image_size // vs
            return int(conf.in_channels) // 4, h, h
        if image_size % vs:
            raise ConfigError(f"data.image_size={image_size} is not a multiple of the VAE factor {vs}")
        h = image_size // vs
        patch = int(getattr(conf, "patch_size", 1) or 1)
        if h % patch:
            raise ConfigError(f"data.image_size={image_size}: {h} latent cells are not a multiple of the "
                              f"transformer's patch size {patch}")
        return int(conf.in_channels), h, h

    def time_shift(self, latent_shape: tuple[int, ...]) -> float:
        """The time shift ``k`` of the pipeline's sampling grid at ``latent_shape``
        (``σ = k·u/(1 + (k − 1)·u)`` on a uniform ``u``): ``shift``, or with dynamic shifting
        ``e^μ`` (``μ`` linear in the token count, :func:`~.adapters.calculate_shift`; linear shift
        type: ``μ``); ``1`` for DDPM schedules."""
        sc = self.scheduler_config
        if not self.flow_matching:
            return 1.0
        if not sc.get("use_dynamic_shifting", False):
            return float(sc.get("shift", 1.0))
        _, h, w = latent_shape
        flux = self.class_name == "FluxTransformer2DModel"
        patch = 2 if flux else int(getattr(self.model.config, "patch_size", 1))
        seq = (h // patch) * (w // patch)
        mu = calculate_shift(seq, sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                             sc.get("base_shift", 0.5), sc.get("max_shift", 1.15))
        return math.exp(mu) if sc.get("time_shift_type", "exponential") == "exponential" else float(mu)


def _locate(spec: DiffusersTeacherSpec) -> tuple[str, bool]:
    """``(root, local)``: an existing directory (local files only), or a hub id the user named."""
    p = Path(spec.diffusers).expanduser()
    if p.is_dir():
        return str(p), True
    if p.exists():
        raise ConfigError(f"teacher.diffusers={spec.diffusers}: a file, not a diffusers pipeline directory")
    if _HUB_ID.match(spec.diffusers) and not spec.diffusers.startswith((".", "~")):
        return spec.diffusers, False
    raise ConfigError(f"teacher.diffusers={spec.diffusers}: no such directory (a diffusers pipeline saved "
                      f"with save_pretrained, or a hub id 'org/name')")


def _load_config(cls: Any, root: str, local: bool, subfolder: str | None = None) -> dict[str, Any]:
    """``cls.load_config(root, subfolder=...)`` as a dict (a one-line ConfigError when missing)."""
    try:
        return dict(cls.load_config(root, subfolder=subfolder, local_files_only=local))
    except (OSError, ValueError) as e:
        where = f"{root}/{subfolder}" if subfolder else root
        raise ConfigError(f"teacher.diffusers={root}: cannot read the config of {where}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_pipeline_teacher(spec: DiffusersTeacherSpec) -> PipelineTeacher:
    """Load the denoiser of the pipeline ``spec`` names, frozen, in ``teacher.dtype``.

    The denoiser's class must be one of the supported ones (SD3, Flux, UNet2DCondition, UNet2D);
    any other is a one-line :class:`~flowdistill.errors.ConfigError` naming them."""
    import diffusers

    root, local = _locate(spec)
    index = _load_config(diffusers.DiffusionPipeline, root, local)
    if spec.subfolder:
        sub = spec.subfolder
        if sub not in index:
            raise ConfigError(f"teacher.subfolder={sub}: the pipeline {root} has no {sub!r} component "
                              f"(it has {', '.join(k for k in index if not k.startswith('_'))})")
    else:
        sub = next((s for s in ("transformer", "unet") if s in index), "")
        if not sub:
            raise ConfigError(f"teacher.diffusers={root}: the pipeline has neither a transformer nor a unet "
                              f"(components: {', '.join(k for k in index if not k.startswith('_'))})")
    entry = index[sub]
    class_name = str(entry[1]) if isinstance(entry, (list, tuple)) and len(entry) > 1 else ""
    if class_name not in _CLASS_TO_ADAPTER:
        what = class_name or "component of no known class"
        raise ConfigError(f"teacher.diffusers={root}: {sub}/ holds a {what}; "
                          f"supported denoisers: {', '.join(sorted(_CLASS_TO_ADAPTER))}")
    cls = getattr(diffusers, class_name)
    try:
        model = cls.from_pretrained(root, subfolder=sub, variant=spec.variant or None,
                                    torch_dtype=_DTYPES[spec.dtype], local_files_only=local)
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher.diffusers={root}: cannot load {sub}/ ({class_name}"
                          f"{', variant ' + spec.variant if spec.variant else ''}): "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    model = model.eval().requires_grad_(False)
    sched_entry = index.get("scheduler")
    sched: dict[str, Any] = {}
    if isinstance(sched_entry, (list, tuple)) and len(sched_entry) > 1 and sched_entry[1]:
        sched = _load_config(getattr(diffusers, str(sched_entry[1])), root, local, "scheduler")
    elif class_name.startswith("UNet"):
        raise ConfigError(f"teacher.diffusers={root}: a UNet teacher needs the pipeline's scheduler "
                          f"(its beta schedule and prediction type); the pipeline has none")
    vae_scale = 8
    vae_entry = index.get("vae")
    if isinstance(vae_entry, (list, tuple)) and len(vae_entry) > 1 and vae_entry[1]:
        vae_conf = _load_config(getattr(diffusers, str(vae_entry[1])), root, local, "vae")
        vae_scale = 2 ** (len(vae_conf.get("block_out_channels", [0] * 4)) - 1)
    elif class_name == "UNet2DModel":
        vae_scale = 1  # a pixel-space DDPM pipeline
    return PipelineTeacher(root, local, sub, class_name, model, index, sched, vae_scale)


def _teacher_field(teacher: PipelineTeacher, cfg: JobConfig, negative: dict[str, Tensor] | None) -> nn.Module:
    """The ready teacher field: the adapter, guided as the job's ``guidance:`` says (a text CFG with
    the negative prompt's embeddings; Flux with guidance embeddings takes the scale as its input)."""
    g = cfg.guidance
    if g.autoguidance:
        raise ConfigError("guidance.autoguidance is not supported for diffusers pipeline teachers; use "
                          "guidance.scale (CFG with the negative prompt)")
    distilled_flux = teacher.class_name == "FluxTransformer2DModel" and teacher.model.config.guidance_embeds
    adapter = adapt_teacher(teacher.model, **teacher.adapter_kwargs(g.scale if distilled_flux else None))
    if distilled_flux or (g.scale == 1.0 and not g.scale_range):
        if g.scale_range:
            raise ConfigError("guidance.scale_range: a guidance-distilled Flux takes one embedded guidance "
                              "value (guidance.scale)")
        return adapter
    if negative is None:
        raise ConfigError(f"guidance.scale={g.scale}: CFG needs the negative prompt's embeddings "
                          f"(the prompt cache's negative.safetensors)")
    return TextCFGField(adapter, g.scale, negative, interval=tuple(g.interval) or None,
                        scale_range=tuple(g.scale_range) or None)


# -- data -------------------------------------------------------------------------------------
def _open_store(root: str, latents: bool = False):
    """The prompt (or latent) cache at ``root`` (:mod:`.prompt_cache`); a one-line error when absent."""
    from flowdistill.integrations.diffusers.prompt_cache import LatentStore, PromptEmbeddingStore

    if not str(root or "").strip():
        raise ConfigError(f"data.name={'latents' if latents else 'prompts'} needs data.root=CACHE "
                          f"(written by `flowdistill embed`)")
    if not Path(root).is_dir():
        raise ConfigError(f"data.root={root}: no such cache directory (write it with `flowdistill embed`)")
    try:
        return (LatentStore if latents else PromptEmbeddingStore)(root)
    except (OSError, ValueError, KeyError) as e:  # (the cache's own errors pass through as they are)
        raise ConfigError(f"data.root={root}: not a readable {'latent' if latents else 'prompt'} cache: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


_COND_KEYS = ("prompt_embeds", "pooled_prompt_embeds")


class PromptSource(IndexedSource):
    """Condition-only items from a prompt-embedding cache: ``{"cond": {"prompt_embeds",
    "pooled_prompt_embeds"}}``. ``sample_shape`` is the latent shape the prior noise takes; a
    data-free method's prior batch gets these conditions (:class:`~flowdistill.training.loop.Trainer`)."""

    condition_only = True

    def __init__(self, store: Any, sample_shape: tuple[int, ...]):
        self.store, self.sample_shape = store, tuple(sample_shape)
        if len(store) == 0:
            raise ConfigError("data.root: the prompt cache is empty")

    def __len__(self) -> int:
        """Number of cached prompts."""
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Item ``i`` (unbatched)."""
        return {"cond": {k: v[0] for k, v in self.get_many(torch.tensor([i]))["cond"].items()}}

    def get_many(self, idx: Tensor) -> dict[str, Any]:
        """One read of the store for the batch ``idx``."""
        got = self.store.get_many(idx.long())
        return {"cond": {k: got[k] for k in _COND_KEYS if k in got}}


class LatentSource(PromptSource):
    """Items ``{"x": latents, "cond": {...}}`` of a latent cache (data-based methods)."""

    condition_only = False

    def get_many(self, idx: Tensor) -> dict[str, Any]:
        """Latents and their captions' embeddings for the batch ``idx``."""
        got = self.store.get_many(idx.long())
        x = got["latents"]
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ConfigError(f"data.root: cached latents have shape {list(x.shape[1:])}, the teacher at "
                              f"data.image_size takes {list(self.sample_shape)}")
        return {"x": x.float(), "cond": {k: got[k] for k in _COND_KEYS if k in got}}


def _cache_shape(spec: Any) -> tuple[int, ...]:
    """Latent shape of a cache named without a job teacher: ``data.image_size`` on the manifest's
    pipeline when positive, else the manifest's recorded ``latent_shape``."""
    store = _open_store(spec.root, spec.name == "latents")
    man = store.manifest or {}
    if int(spec.image_size) <= 0 and man.get("latent_shape"):
        return tuple(int(v) for v in man["latent_shape"])
    pipe = man.get("pipeline")
    if not pipe:
        raise ConfigError(f"data.root={spec.root}: the manifest names no pipeline; give teacher.diffusers")
    return load_pipeline_teacher(DiffusersTeacherSpec(diffusers=str(pipe))).latent_shape(spec.image_size)


@register_dataset("prompts", sample_shape=_cache_shape)
def _prompts(spec: Any, split: str) -> PromptSource:
    """Condition-only batches from the prompt cache at ``data.root`` (a pipeline job's data-free methods)."""
    return PromptSource(_open_store(spec.root), _cache_shape(spec))


@register_dataset("latents", sample_shape=_cache_shape)
def _latents(spec: Any, split: str) -> LatentSource:
    """Latent + caption batches from the latent cache at ``data.root`` (data-based methods)."""
    return LatentSource(_open_store(spec.root, True), _cache_shape(spec))


def _check_data_name(cfg: JobConfig) -> None:
    if cfg.data.name not in ("prompts", "latents"):
        raise ConfigError(f"data.name={cfg.data.name!r}: a diffusers pipeline job reads 'prompts' (a prompt "
                          f"cache) or 'latents' (a latent cache)")


def build_source(cfg: JobConfig, shape: tuple[int, ...], store: Any = None) -> PromptSource:
    """The job's batch source at the teacher's latent ``shape`` (``store``: the cache, if open)."""
    _check_data_name(cfg)
    latents = cfg.data.name == "latents"
    store = store if store is not None else _open_store(cfg.data.root, latents)
    return (LatentSource if latents else PromptSource)(store, shape)


def job_latent_shape(teacher: PipelineTeacher, cfg: JobConfig, store: Any = None) -> tuple[int, int, int]:
    """The latent shape the job trains at: ``data.image_size`` pixels when it is positive; with
    ``data.image_size=0`` the cache's recorded ``latent_shape`` (the resolution it was embedded at),
    else the pipeline's default size (the denoiser's ``sample_size`` × the VAE factor)."""
    size = int(cfg.data.image_size)
    if size > 0:
        return teacher.latent_shape(size)
    rec = (getattr(store, "manifest", None) or {}).get("latent_shape") if store is not None else None
    if rec:
        shape = tuple(int(v) for v in rec)
        want = teacher.latent_shape(shape[-1] * teacher.vae_scale)
        if shape != want:
            raise ConfigError(f"data.root: the cache's latent_shape {list(shape)} is not the teacher's "
                              f"{list(want)}; set data.image_size=PIXELS")
        return want
    sample = getattr(teacher.model.config, "sample_size", None)
    if teacher.class_name == "FluxTransformer2DModel":
        sample = 128  # FluxPipeline.default_sample_size (latent cells: 1024 px with the usual VAE)
    if not isinstance(sample, int) or sample <= 0:
        raise ConfigError("data.image_size=0 and neither the cache nor the denoiser gives a size; "
                          "set data.image_size=PIXELS")
    return teacher.latent_shape(sample * teacher.vae_scale)


class PromptIndexed(nn.Module):
    """``net`` taking a prompt cache's row indices as its condition: a coupling store keeps the
    prompt of each pair as an index (its class label; the null label ``len(store)`` is the negative
    prompt, the unconditional branch), and this wrapper looks the embeddings up before calling
    ``net(x, t, s, cond=...)``. A dict or :class:`~.adapters.TextCondition` condition passes as it is."""

    def __init__(self, net: nn.Module, store: Any):
        super().__init__()
        self.net = net
        self.__dict__["store"] = store  # out of the module tree (not a tensor container)

    def lookup(self, idx: Tensor) -> dict[str, Tensor]:
        """The embeddings of rows ``idx`` (``len(store)``: the negative prompt's)."""
        n = len(self.store)
        i = idx.detach().to("cpu", torch.long).reshape(-1)
        if int(i.min()) < 0 or int(i.max()) > n:
            raise IndexError(f"prompt index out of range [0, {n}]")
        rows = self.store.get_many(i.clamp(max=n - 1))
        null = i == n
        if bool(null.any()):
            neg = self.store.negative()
            rows = {k: torch.where(null.reshape(-1, *[1] * (v.ndim - 1)), neg[k].to(v.dtype).expand_as(v), v)
                    for k, v in rows.items()}
        return {k: rows[k].to(idx.device) for k in _COND_KEYS if k in rows}

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, cond: Any = None, **kw: Any) -> Tensor:
        """``net`` with index conditions replaced by the cached embeddings."""
        if isinstance(cond, Tensor) and not cond.is_floating_point():
            cond = self.lookup(cond)
        return self.net(x, t, s, cond=cond, **kw)


# -- the student ------------------------------------------------------------------------------
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
    _check_data_name(cfg)
    teacher = load_pipeline_teacher(spec)
    store = _open_store(cfg.data.root, cfg.data.name == "latents") if with_teacher else None
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
        field_ = _teacher_field(teacher, cfg, negative)
        if coupled:
            field_ = PromptIndexed(field_, source.store)
        distiller = cls(cfg.distiller, student, field_)
    else:
        distiller = cls.for_inference(cfg.distiller, student)
    return PipelineJob(cfg, teacher, distiller, source, shape, params)


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
    student = trainer.eval_student()
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
