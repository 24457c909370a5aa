"""Load an image tokenizer (encoder + decoder) from a run or model directory, and decode latents.

The one place that decides whether a saved model is a tokenizer: it has ``AutoencoderKL``'s
``encode(x).latent_dist`` and ``decode(z).sample`` (:class:`flowdistill.models.tokenizer.TokenizerModel`,
or any registered model of your own with that interface). Used by the recipe's ``encode`` stage
(encoding a dataset, :mod:`flowdistill.data.latent_cache`) and by image evaluation (decoding a
latent run's samples before FID).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from flowdistill.core.registry import UnknownNameError
from flowdistill.data.latent_cache import LatentDecoding, denormalise
from flowdistill.errors import CheckpointError, ConfigError
from flowdistill.models.loading import find_model_dir, load_model_dir


def is_tokenizer(model: nn.Module) -> bool:
    """Whether ``model`` has a tokenizer's ``encode`` and ``decode`` methods."""
    return callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))


def load_tokenizer(path: str | Path, what: str = "tokenizer") -> nn.Module:
    """The tokenizer saved at ``path`` (a run directory's ``student/`` or a model directory), in
    eval mode with frozen weights. A path that holds no tokenizer — e.g. a flow-matching run — is a
    one-line :class:`~flowdistill.errors.ConfigError` naming ``what`` (the key that gave the path)."""
    try:
        model_dir = find_model_dir(path, what)
        model = load_model_dir(model_dir)
    except (CheckpointError, UnknownNameError) as e:
        raise ConfigError(f"{what}: {e}") from None
    if not is_tokenizer(model):
        raise ConfigError(f"{what}: {path} holds a {type(model).__name__}, not a tokenizer (a model with "
                          f"encode/decode, e.g. a run of `flowdistill distill configs/rectok_digits.yaml`)")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(tokenizer: nn.Module, latents: Tensor, scaling_factor: float, shift_factor: float,
                   batch_size: int = 256) -> Tensor:
    """Normalised latents ``[n, C, h, w]`` → images ``D(latents / scale + shift)`` (CPU, float32),
    decoded in batches of ``batch_size``."""
    p = next(tokenizer.parameters())
    out = []
    for chunk in latents.split(batch_size):
        z = denormalise(chunk.to(p.device, p.dtype), scaling_factor, shift_factor)
        out.append(tokenizer.decode(z).sample.float().cpu())
    return torch.cat(out)


def decoder_for(decoding: LatentDecoding | None, what: str = "data.params.decoder"):
    """A function ``latents -> images`` for a dataset's decoding (``None`` → ``None``: pixel data)."""
    if decoding is None:
        return None
    tok = load_tokenizer(decoding.tokenizer, what)
    return lambda z: decode_latents(tok, z, decoding.scaling_factor, decoding.shift_factor)


__all__ = ["decode_latents", "decoder_for", "is_tokenizer", "load_tokenizer"]
