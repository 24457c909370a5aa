"""What differs between the pipeline classes that pipeline-native rendering (:mod:`.render`) supports:
their kind (SD3, Flux, SD), denoiser, default image size, latent layout (Flux's packed 2×2 patches)
and the keyword arguments that carry CFG."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from flowdistill.errors import ConfigError
from flowdistill.integrations.diffusers.adapters import pack_latents, unpack_latents

#: pipeline class name -> kind (how latents are laid out and guidance is passed)
PIPELINE_KINDS = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "StableDiffusionPipeline": "sd",
}


def pipeline_kind(pipe: Any) -> str:
    """``"sd3"``, ``"flux"`` or ``"sd"`` for a pipeline instance (ConfigError naming the supported
    classes otherwise)."""
    name = type(pipe).__name__
    if name not in PIPELINE_KINDS:
        raise ConfigError(f"pipeline-native sampling supports {', '.join(sorted(PIPELINE_KINDS))}; "
                          f"got {name}")
    return PIPELINE_KINDS[name]


def denoiser(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoising network (``transformer`` or ``unet``)."""
    net = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if net is None:
        raise ConfigError(f"{type(pipe).__name__} has neither a transformer nor a unet")
    return net


def default_size(pipe: Any) -> tuple[int, int]:
    """The pipeline's default image ``(height, width)`` in pixels (what it renders when given none)."""
    if pipeline_kind(pipe) == "sd":
        s = pipe.unet.config.sample_size
        s = s if isinstance(s, int) else s[0]
        return s * pipe.vae_scale_factor, s * pipe.vae_scale_factor
    s = int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
    return s, s


def latent_shape(pipe: Any, height: int, width: int) -> tuple[int, int, int]:
    """The unpacked latent shape ``(C, h, w)`` the pipeline denoises for an image of ``height × width``
    (Flux: ``C = in_channels / 4`` and ``h, w`` rounded down to even, as its ``prepare_latents``)."""
    kind = pipeline_kind(pipe)
    f = int(pipe.vae_scale_factor)
    if kind == "flux":
        c = int(pipe.transformer.config.in_channels) // 4
        return c, 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2))
    c = int(denoiser(pipe).config.in_channels)
    return c, int(height) // f, int(width) // f


def to_pipeline_latents(pipe: Any, noise: Tensor) -> Tensor:
    """``noise [B, C, h, w]`` as the pipeline's ``latents=`` argument (packed for Flux)."""
    return pack_latents(noise) if pipeline_kind(pipe) == "flux" else noise


def from_pipeline_latents(pipe: Any, latents: Tensor, shape: Sequence[int]) -> Tensor:
    """A pipeline's ``output_type="latent"`` output as unpacked ``[B, C, h, w]`` latents."""
    if pipeline_kind(pipe) == "flux":
        return unpack_latents(latents, int(shape[1]), int(shape[2]))
    return latents


def guidance_kwargs(pipe: Any, scale: float = 1.0, flux_guidance: float | None = None) -> dict[str, Any]:
    """The pipeline keyword arguments for CFG scale ``w = scale`` with the empty negative prompt
    (:mod:`.render`'s docstring); ``flux_guidance`` is Flux's distilled-guidance embedding value."""
    kind = pipeline_kind(pipe)
    w = float(scale)
    if kind == "flux":
        kw: dict[str, Any] = {"true_cfg_scale": w}
        if w > 1.0:
            kw["negative_prompt"] = ""
        if flux_guidance is not None:
            kw["guidance_scale"] = float(flux_guidance)
        return kw
    return {"guidance_scale": w}
