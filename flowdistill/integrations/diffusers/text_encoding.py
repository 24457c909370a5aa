"""A diffusers pipeline's own text encoding, per pipeline family, and its latent geometry.

``encode_text(pipe, prompts)`` calls the pipeline's ``encode_prompt`` without guidance and keeps
what the denoiser consumes:

- SD3 (``StableDiffusion3Pipeline``): ``prompt_embeds`` [n, 77 + T5 length, D] (the two CLIP
  encoders' penultimate states, concatenated, zero-padded to T5's width, then the T5 states) and
  ``pooled_prompt_embeds`` [n, P] (the two CLIP projections concatenated);
- Flux (``FluxPipeline``): ``prompt_embeds`` [n, T5 length, D] (T5) and ``pooled_prompt_embeds``
  [n, P] (CLIP's pooled output); the text position ids are rebuilt by the pipeline;
- Stable Diffusion (``StableDiffusionPipeline``, UNet2DCondition): ``prompt_embeds`` [n, 77, D].

:func:`latent_shape` gives the denoiser's latent ``[C, h, w]`` for an image size, from the VAE and
transformer/UNet configs (Flux latents unpacked: ``C`` = ``in_channels / 4``);
:func:`cache_header` the settings a prompt or latent cache records (and a resume must match).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowdistill.data.couplings import state_sha256
from flowdistill.errors import ConfigError
from flowdistill.integrations.diffusers.embedding_store import fields_of

#: Pipeline class → family; subclasses are matched through their MRO.
PIPELINE_FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux",
                     "StableDiffusionPipeline": "sd"}
#: Text-encoder components of each family (their weights make the cache's identity).
TEXT_ENCODERS = {"sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
                 "flux": ("text_encoder", "text_encoder_2"), "sd": ("text_encoder",)}


def pipeline_family(pipe: Any) -> str:
    """``"sd3"``, ``"flux"`` or ``"sd"`` for a pipeline (or a subclass); a ``ConfigError`` naming
    the supported classes otherwise."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in PIPELINE_FAMILIES:
            return PIPELINE_FAMILIES[cls.__name__]
    raise ConfigError(f"embed: pipeline class {type(pipe).__name__} is not supported; supported: "
                      f"{', '.join(PIPELINE_FAMILIES)}")


@torch.no_grad()
def encode_text(pipe: Any, prompts: list[str], max_sequence_length: int | None = None) -> dict[str, Tensor]:
    """The pipeline's ``encode_prompt`` output for ``prompts`` (no guidance), as CPU tensors
    ``{"prompt_embeds"[, "pooled_prompt_embeds"]}``; ``max_sequence_length`` (T5 tokens; SD3 and
    Flux only) defaults to the pipeline's own default."""
    family = pipeline_family(pipe)
    kw = {} if max_sequence_length is None or family == "sd" else {"max_sequence_length": max_sequence_length}
    if family == "sd3":
        pe, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, **kw)
        out = {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
    elif family == "flux":
        pe, pooled, _ = pipe.encode_prompt(prompts, None, **kw)
        out = {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
    else:
        pe, _ = pipe.encode_prompt(prompts, pipe._execution_device, 1, False)
        out = {"prompt_embeds": pe}
    return {k: v.detach().cpu() for k, v in out.items()}


def denoiser_config(pipe: Any) -> dict:
    """The transformer's or UNet's config, from the loaded module or, when the pipeline was loaded
    without it (``transformer=None``), from ``<pipeline dir>/<transformer|unet>/config.json``."""
    for name in ("transformer", "unet"):
        module = getattr(pipe, name, None)
        if module is not None:
            return dict(module.config)
    src = Path(str(pipe.config.get("_name_or_path", "")))
    for name in ("transformer", "unet"):
        if (src / name / "config.json").is_file():
            return json.loads((src / name / "config.json").read_text())
    raise ConfigError(f"embed: the pipeline has no transformer or unet config (looked in {src})")


def vae_scale(pipe: Any) -> int:
    """Pixels per latent cell: ``2 ** (len(vae.block_out_channels) − 1)`` as the pipelines compute it."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1) if getattr(pipe, "vae", None) else 8


def latent_shape(pipe: Any, resolution: int | None = None) -> list[int]:
    """``[C, h, w]`` of the denoiser's latent for a square ``resolution``-pixel image (default: the
    pipeline's default size). Flux: the unpacked latent (``in_channels / 4`` channels)."""
    cfg, family, f = denoiser_config(pipe), pipeline_family(pipe), vae_scale(pipe)
    if resolution is None:  # the pipelines' defaults: Flux 128 · factor, the others sample_size · factor
        resolution = 128 * f if family == "flux" else int(cfg["sample_size"]) * f
    if resolution % (2 * f if family == "flux" else f):
        raise ConfigError(f"embed: resolution {resolution} must be a multiple of "
                          f"{2 * f if family == 'flux' else f} for this pipeline")
    channels = int(cfg["in_channels"]) // 4 if family == "flux" else int(cfg["in_channels"])
    return [channels, resolution // f, resolution // f]


def modules_sha256(pipe: Any, names: tuple[str, ...]) -> str:
    """Content digest of the named components' weights (names, dtypes, shapes, bytes): the identity
    of the encoders a cache was made with (hashing a T5-XXL takes tens of seconds, once per run)."""
    h = hashlib.sha256()
    for name in names:
        module = getattr(pipe, name, None)
        h.update(f"{name}:{state_sha256(module) if module is not None else 'none'}\n".encode())
    return h.hexdigest()


def list_sha256(values: list) -> str:
    """sha256 of a JSON list (prompts, or image records): what a resume must find again."""
    return hashlib.sha256(json.dumps(values, ensure_ascii=False).encode()).hexdigest()


def cache_header(pipe: Any, fmt: str, *, negative: dict, negative_prompt: str, shard_size: int,
                 batch_size: int, max_sequence_length: int | None, resolution: int | None) -> dict:
    """The settings part of a prompt or latent cache's manifest (the item list's sha and the
    fields are added by the caller)."""
    if batch_size <= 0 or shard_size <= 0:
        raise ConfigError(f"embed: --batch-size and --shard-size must be positive, got {batch_size}, "
                          f"{shard_size}")
    family, shape = pipeline_family(pipe), latent_shape(pipe, resolution)
    return {"format": fmt, "pipeline": str(pipe.config.get("_name_or_path", "")),
            "pipeline_class": type(pipe).__name__, "family": family,
            "text_encoders_sha256": modules_sha256(pipe, TEXT_ENCODERS[family]),
            "negative_prompt": negative_prompt, "shard_size": int(shard_size), "batch_size": int(batch_size),
            "max_sequence_length": max_sequence_length, "resolution": shape[1] * vae_scale(pipe),
            "latent_shape": shape, "fields": fields_of(negative)}


__all__ = ["PIPELINE_FAMILIES", "TEXT_ENCODERS", "cache_header", "denoiser_config", "encode_text",
           "latent_shape", "list_sha256",
           "modules_sha256", "pipeline_family", "vae_scale"]
