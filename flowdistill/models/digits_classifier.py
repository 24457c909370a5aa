"""A small CNN digits classifier whose penultimate layer is the feature of an FID-style digits metric.

The classifier accepts images in [-1, 1] of any size (the supported digits sizes are 8, 16 and 32),
1 or 3 channels (3 channels are averaged to gray), and resizes them to ``INTERNAL_SIZE = 16`` with
antialiased bilinear interpolation before the convolutions. Its 64-dimensional penultimate layer
(the pre-activation of the last hidden layer, so no unit is ever constantly zero) times a fixed
``feature_scale`` is the ``"penultimate"`` feature used for FID / KID / precision-recall; the
scale is set at training time so that the mean squared feature on the train split is 1, which
keeps KID's cubic kernel ``(f·g/64 + 1)^3`` well conditioned. The 10 class logits are the
``"logits"`` feature.

Weights live in ``assets/digits_classifier.safetensors`` (written by
``scripts/train_digits_classifier.py``) and are loaded with safetensors only.

This module holds the network only (torch + safetensors). The torch-fidelity feature extractor
built on it lives in :mod:`flowdistill.eval.digits_features`; the ``"digits"`` perceptual distance
in :mod:`flowdistill.models.perceptual`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from flowdistill.resources import assets_dir

INTERNAL_SIZE = 16
FEATURE_DIM = 64
NUM_CLASSES = 10
DEFAULT_WEIGHTS = assets_dir() / "digits_classifier.safetensors"  # shipped (flowdistill.resources)


class DigitsClassifier(nn.Module):
    """Two conv blocks (32 and 64 channels, each pooled ×2), a 64-d hidden layer and a linear head."""

    def __init__(self) -> None:
        """Build the layers (random init; load weights with ``load_digits_classifier``)."""
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 -> 8
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 -> 4
        )
        self.fc = nn.Linear(64 * (INTERNAL_SIZE // 4) ** 2, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.register_buffer("feature_scale", torch.ones(()))

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        """Map ``[B, 1|3, H, W]`` images in [-1, 1] to the network input ``[B, 1, 16, 16]``."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"digits classifier expects [B, 1|3, H, W] images, got shape {tuple(x.shape)}")
        x = x.to(torch.float32)
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (INTERNAL_SIZE, INTERNAL_SIZE):
            x = F.interpolate(
                x, size=(INTERNAL_SIZE, INTERNAL_SIZE), mode="bilinear", align_corners=False, antialias=True
            )
        return x

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(penultimate [B, 64], logits [B, 10])`` for images in [-1, 1]."""
        pre = self.fc(self.conv(self.prepare(x)).flatten(1))
        logits = self.head(self.dropout(F.relu(pre)))
        return pre * self.feature_scale, logits

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[B, 10]`` for images ``[B, 1|3, H, W]`` in [-1, 1]."""
        return self.features(x)[1]


def resolve_weights_path(path: str | os.PathLike | None) -> Path:
    """The weights path (default asset when None); a one-line ValueError if it is missing."""
    p = DEFAULT_WEIGHTS if path is None else Path(path)
    if not p.is_file():
        hint = " (run scripts/train_digits_classifier.py to create it)" if path is None else ""
        raise ValueError(f"digits classifier weights file {str(p)!r} not found{hint}")
    return p


def load_digits_classifier(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> DigitsClassifier:
    """A ``DigitsClassifier`` in eval mode, weights from a safetensors file (default: bundled asset)."""
    p = resolve_weights_path(path)
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(p), device="cpu"))
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Fraction of images ``x`` (in [-1, 1]) whose argmax class equals ``y``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i : i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, x.shape[0])


__all__ = [
    "DEFAULT_WEIGHTS",
    "FEATURE_DIM",
    "INTERNAL_SIZE",
    "NUM_CLASSES",
    "DigitsClassifier",
    "classifier_accuracy",
    "load_digits_classifier",
    "resolve_weights_path",
]
