"""A tiny stand-in image tokenizer for the latent-cache and chain tests (AutoencoderKL's interface:
``encode(x).latent_dist`` with ``mode()``/``sample(generator)``, ``decode(z).sample``), registered
as model ``stub_tokenizer`` so a saved one loads like any flowdistill model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from flowdistill.models import MODELS


class StubTokenizer(ModelMixin, ConfigMixin):
    """Patchify conv encoder to a diagonal Gaussian, transposed-conv decoder."""

    @register_to_config
    def __init__(self, in_channels: int = 1, latent_channels: int = 4, patch_size: int = 4,
                 scaling_factor: float = 1.0, shift_factor: float = 0.0):
        super().__init__()
        self.enc = nn.Conv2d(in_channels, 2 * latent_channels, patch_size, stride=patch_size)
        self.dec = nn.ConvTranspose2d(latent_channels, in_channels, patch_size, stride=patch_size)

    def encode(self, x, mask_ratio: float = 0.0, generator=None):
        """``latent_dist`` of ``x``: mean and log-variance from one strided conv."""
        return SimpleNamespace(latent_dist=DiagonalGaussianDistribution(self.enc(x)))

    def decode(self, z, ids_restore=None, mask=None):
        """Images from latents (``.sample``)."""
        return SimpleNamespace(sample=torch.tanh(self.dec(z)))


if "stub_tokenizer" not in MODELS.names():
    MODELS.register("stub_tokenizer")(StubTokenizer)


def save_stub(path: Path, latent_channels: int = 4, seed: int = 0, scaling_factor: float = 1.5,
              shift_factor: float = 0.1) -> Path:
    """A seeded stub tokenizer saved at ``path`` (``save_pretrained``); returns ``path``."""
    torch.manual_seed(seed)
    StubTokenizer(latent_channels=latent_channels, scaling_factor=scaling_factor,
                  shift_factor=shift_factor).save_pretrained(str(path))
    return path
