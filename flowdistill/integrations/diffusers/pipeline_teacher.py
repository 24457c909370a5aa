"""The teacher of a pipeline job: a diffusers pipeline's denoiser and its guided field.

The chain (issue 15): the pipeline's denoiser (``transformer/`` or ``unet/``) is loaded from the
directory (:func:`load_pipeline_teacher`; local files only unless the user names a hub id), the
adapter is chosen from its class (:func:`~.adapters.adapt_teacher`: SD3 / Flux / DDPM UNets, our
convention ``x_t = (1 − t)·x + t·ε``), the pipeline's scheduler config gives the prediction type
and DDPM schedule (UNets) and the time shift (flow models: a constant ``shift``, or Flux/SD3's
resolution-dependent ``μ`` at the run's latent size, ``shift = e^μ``), and the job's
``guidance.scale`` guides the teacher with the prompt cache's negative embedding
(:class:`~.adapters.TextCFGField`; a guidance-distilled Flux takes it as its embedded guidance:
:func:`teacher_field`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowdistill.config import DiffusersTeacherSpec, JobConfig
from flowdistill.errors import ConfigError
from flowdistill.integrations.diffusers.adapters import (
    _CLASS_TO_ADAPTER,
    TextCFGField,
    adapt_teacher,
    calculate_shift,
)

#: The pipeline class whose ``load_lora_weights`` takes a LoRA of each denoiser class.
PIPELINE_OF = {"SD3Transformer2DModel": "StableDiffusion3Pipeline", "FluxTransformer2DModel": "FluxPipeline",
               "UNet2DConditionModel": "StableDiffusionPipeline", "UNet2DModel": "DDPMPipeline"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


def teacher_field(teacher: PipelineTeacher, cfg: JobConfig, negative: dict[str, Tensor] | None) -> nn.Module:
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

