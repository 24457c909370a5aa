"""Latent cache: an image-caption folder → VAE latents + caption embeddings, sharded on disk.

Data-based methods (reflow on real pairs, distribution matching with real data) train on
``x`` = the VAE latent of a training image. Encoding every image once, with its caption's
embeddings, keeps the VAE and the text encoders out of training. The folder holds images
(``.png .jpg .jpeg .webp .bmp``) and, for each, a caption ``NAME.txt`` with the same stem;
images are resized (shorter side, bicubic) and centre-cropped to ``resolution``², mapped to
[−1, 1] and encoded with the VAE posterior's **mean** (deterministic, so a resumed or
split cache is bit-identical).

Latents are stored in the **denoiser's input space**, as the pipelines hand them to the
transformer/UNet::

    latents = (mean(E(image)) − shift_factor) · scaling_factor        (shift_factor 0 when absent)

so :func:`decode_latents` inverts it (``D(latents / scaling_factor + shift_factor)``). Flux
latents stay **unpacked** ``[C, h, w]`` (the 2×2 packing into tokens is the adapter's job,
:func:`flowdistill.integrations.diffusers.pack_latents`). Fields: ``latents`` [n, C, h, w] plus the
caption embeddings of :mod:`.prompt_cache` (``prompt_embeds``[, ``pooled_prompt_embeds``]); the same
layout, negative embedding and resume rules (:mod:`.embedding_store`). ``LatentStore`` reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowdistill.data.couplings import file_sha256
from flowdistill.errors import ConfigError
from flowdistill.integrations.diffusers.embedding_store import EmbeddingCache, dtype_name, write_cache
from flowdistill.integrations.diffusers.text_encoding import (
    cache_header,
    encode_text,
    latent_shape,
    list_sha256,
    modules_sha256,
    vae_scale,
)

FORMAT = "flowdistill-latents/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_caption_pairs(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """``(image path, caption)`` for each image of ``folder`` (sorted by name); the caption is the
    stripped text of ``NAME.txt``. A ``ConfigError`` for a missing folder, no images, or an image
    without its caption file."""
    d = Path(folder)
    if not d.is_dir():
        raise ConfigError(f"--images: no folder {d}")
    images = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ConfigError(f"--images: {d} holds no images ({' '.join(IMAGE_SUFFIXES)})")
    pairs = []
    for img in images:
        cap = img.with_suffix(".txt")
        if not cap.is_file():
            raise ConfigError(f"--images: {img.name} has no caption file {cap.name} beside it")
        pairs.append((img, cap.read_text(encoding="utf-8").strip()))
    return pairs


def load_image(path: Path, resolution: int) -> Tensor:
    """An image as ``[3, resolution, resolution]`` in [−1, 1]: RGB, shorter side resized (bicubic)
    to ``resolution``, centre crop."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _factors(vae: Any) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of a VAE config (shift 0 when the VAE has none)."""
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


@torch.no_grad()
def encode_images(pipe: Any, images: Tensor) -> Tensor:
    """Images ``[n, 3, H, W]`` in [−1, 1] → latents in the denoiser's input space,
    ``(mean(E(x)) − shift) · scale`` (module docstring)."""
    vae = pipe.vae
    scale, shift = _factors(vae)
    p = next(vae.parameters())
    z = vae.encode(images.to(p.device, p.dtype)).latent_dist.mean
    return ((z - shift) * scale).cpu()


@torch.no_grad()
def decode_latents(pipe: Any, latents: Tensor) -> Tensor:
    """Cached latents → images ``[n, 3, H, W]`` in [−1, 1]: ``D(latents / scale + shift)``."""
    vae = pipe.vae
    scale, shift = _factors(vae)
    p = next(vae.parameters())
    return vae.decode(latents.to(p.device, p.dtype) / scale + shift).sample.cpu()


def encode_image_folder(pipe: Any, folder: str | os.PathLike, root: str | os.PathLike, *,
                        resolution: int | None = None, batch_size: int = 8, negative_prompt: str = "",
                        rank: int = 0, world: int = 1, resume: bool = False, shard_size: int = 1024,
                        max_sequence_length: int | None = None, progress: bool = True) -> Path:
    """Encode an image-caption folder into a latent cache at ``root`` (module docstring).

    ``resolution``: the square image size (default: the pipeline's default); the other arguments
    as :func:`flowdistill.integrations.diffusers.prompt_cache.encode_prompts`. The item list's
    sha256 covers every image's name, caption and file sha256, so a resume over a changed folder is
    refused. Returns ``root``.
    """
    if getattr(pipe, "vae", None) is None:
        raise ConfigError("embed --images: the pipeline has no VAE")
    pairs = image_caption_pairs(folder)
    shape = latent_shape(pipe, resolution)
    resolution = shape[1] * vae_scale(pipe)  # the pipeline's default when None
    captions = [c for _, c in pairs]
    negative = encode_text(pipe, [negative_prompt], max_sequence_length)
    header = cache_header(pipe, FORMAT, negative=negative, negative_prompt=negative_prompt,
                          shard_size=shard_size, batch_size=batch_size,
                          max_sequence_length=max_sequence_length, resolution=resolution)
    header["vae_sha256"] = modules_sha256(pipe, ("vae",))
    header["vae_factors"] = dict(zip(("scaling_factor", "shift_factor"), _factors(pipe.vae), strict=True))
    vae_dtype = next(pipe.vae.parameters()).dtype
    header["fields"] = {**header["fields"], "latents": {"shape": shape, "dtype": dtype_name(vae_dtype)}}
    header["items_sha256"] = list_sha256([[p.name, c, file_sha256(p)] for p, c in pairs])

    def encode(a: int, b: int) -> dict[str, Tensor]:
        images = torch.stack([load_image(p, resolution) for p, _ in pairs[a:b]])
        text = encode_text(pipe, captions[a:b], max_sequence_length)
        return {"latents": encode_images(pipe, images), **text}

    items = [{"prompt": c, "image": p.name} for p, c in pairs]
    return write_cache(root, header, items, negative, encode, rank=rank, world=world, resume=resume,
                       progress=progress, desc="embed images")


class LatentStore(EmbeddingCache):
    """A complete latent cache: ``get_many(idx)`` → ``{"latents", "prompt_embeds"[,
    "pooled_prompt_embeds"]}``; ``negative()``, ``prompts`` (the captions), ``images`` (file names)."""

    FORMAT = FORMAT

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(C, h, w)`` of the cached latents."""
        return tuple(self.fields["latents"]["shape"])

    @property
    def images(self) -> list[str]:
        """The image file names, in cache order."""
        return [it["image"] for it in self.items]


__all__ = ["FORMAT", "IMAGE_SUFFIXES", "LatentStore", "decode_latents", "encode_image_folder",
           "encode_images", "image_caption_pairs", "load_image"]
