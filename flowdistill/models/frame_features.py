"""A small CNN on 32×32 bouncing-digit frames whose penultimate layer is the feature of frame FID.

Trained (``scripts/train_frame_features.py``) on frames of the exact generator
(:mod:`flowdistill.data.bouncing_digits`, train-split digits) for a supervised multi-label task the
generator answers exactly: which of the 10 digit classes are present (10 logits) and which cells of
a 4×4 grid hold a digit centre (16 logits), both with binary cross-entropy. The features therefore
see digit identity, shape and placement — what a per-frame quality metric should compare.

Input: ``[B, 1|3, H, W]`` in [-1, 1] (3 channels averaged, other sizes resized to 32 bilinearly).
Feature: the 64-d pre-activation of the hidden layer times a fixed ``feature_scale`` (set at training
so the mean squared feature on train frames is 1, which keeps KID's cubic kernel well conditioned).
Weights: ``assets/frame_features.safetensors`` (< 1 MB), loaded with safetensors only.
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

FRAME_SIZE = 32
FEATURE_DIM = 64
NUM_CLASSES = 10
GRID = 4
NUM_OUTPUTS = NUM_CLASSES + GRID * GRID
DEFAULT_WEIGHTS = assets_dir() / "frame_features.safetensors"


class FrameFeatureNet(nn.Module):
    """Conv stages of 16, 32, 64 channels (each pooled ×2: 32 → 4), a 64-d hidden layer, 26 logits."""

    def __init__(self) -> None:
        """Build the layers (random init; load weights with :func:`load_frame_features`)."""
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 32 -> 16
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 16 -> 8
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8 -> 4
        )
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, NUM_OUTPUTS)
        self.register_buffer("feature_scale", torch.ones(()))

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        """``[B, 1|3, H, W]`` in [-1, 1] → ``[B, 1, 32, 32]`` float32."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"frame feature net expects [B, 1|3, H, W] frames, got shape {tuple(x.shape)}")
        x = x.to(torch.float32)
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (FRAME_SIZE, FRAME_SIZE):
            x = F.interpolate(x, size=(FRAME_SIZE, FRAME_SIZE), mode="bilinear", align_corners=False,
                              antialias=True)
        return x

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(feature [B, 64], logits [B, 26])``: 10 class-presence then 16 grid-cell logits."""
        pre = self.fc(self.conv(self.prepare(x)).flatten(1))
        return pre * self.feature_scale, self.head(F.relu(pre))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, 26]``."""
        return self.features(x)[1]


def frame_targets(labels: Tensor, positions: Tensor, size: int = FRAME_SIZE) -> Tensor:
    """Multi-hot targets ``[B, 26]`` from labels ``[B, D]`` (−1 absent) and centres ``[B, D, 2]`` (px).

    Class part: 1 for every present label. Grid part: 1 for cell ``(⌊y·4/size⌋, ⌊x·4/size⌋)`` of
    every present digit's centre (row-major).
    """
    b = labels.shape[0]
    out = torch.zeros(b, NUM_OUTPUTS)
    present = labels >= 0
    rows, cols = present.nonzero(as_tuple=True)
    out[rows, labels[rows, cols]] = 1.0
    cell = (positions[rows, cols] * GRID / size).floor().clamp(0, GRID - 1).long()
    out[rows, NUM_CLASSES + cell[:, 1] * GRID + cell[:, 0]] = 1.0
    return out


def resolve_frame_weights(path: str | os.PathLike | None) -> Path:
    """The weights path (default asset when None); a one-line ValueError if it is missing."""
    p = DEFAULT_WEIGHTS if path is None else Path(path)
    if not p.is_file():
        hint = " (run scripts/train_frame_features.py to create it)" if path is None else ""
        raise ValueError(f"frame feature weights file {str(p)!r} not found{hint}")
    return p


def load_frame_features(path: str | os.PathLike | None = None,
                        device: str | torch.device = "cpu") -> FrameFeatureNet:
    """A :class:`FrameFeatureNet` in eval mode with weights from a safetensors file (default: asset)."""
    model = FrameFeatureNet()
    model.load_state_dict(load_file(str(resolve_frame_weights(path)), device="cpu"))
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def frame_accuracy(model: FrameFeatureNet, frames: Tensor, targets: Tensor,
                   batch_size: int = 512) -> dict[str, float]:
    """Held-out accuracy: ``set`` (the exact set of present classes), ``label`` (per class bit),
    ``cells`` (the exact set of occupied grid cells), thresholding the logits at 0."""
    was = model.training
    model.eval()
    pred = torch.cat([model(frames[i:i + batch_size]) for i in range(0, frames.shape[0], batch_size)]) > 0
    model.train(was)
    tgt = targets > 0.5
    cls, cell = slice(0, NUM_CLASSES), slice(NUM_CLASSES, NUM_OUTPUTS)
    return {
        "set": float((pred[:, cls] == tgt[:, cls]).all(1).float().mean()),
        "label": float((pred[:, cls] == tgt[:, cls]).float().mean()),
        "cells": float((pred[:, cell] == tgt[:, cell]).all(1).float().mean()),
    }


__all__ = ["DEFAULT_WEIGHTS", "FEATURE_DIM", "FRAME_SIZE", "FrameFeatureNet", "frame_accuracy",
           "frame_targets",
           "load_frame_features", "resolve_frame_weights"]
