"""scikit-learn's bundled 8×8 digits (1 797 images, no download) as a small real image set.

Conventions (fixed, documented here once):

- Pixels: the raw 0..16 intensities are mapped linearly to ``[-1, 1]`` (``x / 8 - 1``), float32,
  shape ``[1, S, S]``; labels are ``long`` in ``0..9``.
- Split: a *stratified* train/test split with a fixed seed (``SPLIT_SEED = 0``) and
  ``TEST_SIZE = 360`` test images (≈ 20 %), leaving 1 437 for training. Every class keeps its
  proportion in both splits, and the split never changes between runs or machines.
- Size: ``S ∈ {8, 16, 32}``. ``S = 8`` is the native data; larger sizes are upscaled from 8×8 with
  ``torch.nn.functional.interpolate`` — ``"bilinear"`` (``align_corners=False``, the default, smooth
  strokes) or ``"nearest"`` (blocky, exact pixel copies). Upscaled values stay inside ``[-1, 1]``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

SPLITS = ("train", "test", "all")
SIZES = (8, 16, 32)
MODES = ("bilinear", "nearest")
SPLIT_SEED = 0
TEST_SIZE = 360
NUM_CLASSES = 10


def _check_args(split: str, size: int, mode: str) -> None:
    """Raise a one-line ValueError for an unsupported split, size or mode."""
    if split not in SPLITS:
        raise ValueError(f"digits split must be one of {SPLITS}, got {split!r}")
    if size not in SIZES:
        raise ValueError(f"digits size must be one of {SIZES}, got {size!r}")
    if mode not in MODES:
        raise ValueError(f"digits upscaling mode must be one of {MODES}, got {mode!r}")


@functools.lru_cache(maxsize=1)
def _split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices of the fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    idx = np.arange(len(y))
    train, test = train_test_split(idx, test_size=TEST_SIZE, stratify=y, random_state=SPLIT_SEED)
    return np.sort(train), np.sort(test)


@functools.lru_cache(maxsize=16)
def _load(split: str, size: int, mode: str) -> tuple[Tensor, Tensor]:
    """The cached ``(x, y)`` tensors of one split at one size (callers get clones)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0  # [N,1,8,8] in [-1,1]
    y = torch.from_numpy(d.target.astype(np.int64))
    if split != "all":
        train, test = _split_indices()
        sel = torch.from_numpy(train if split == "train" else test)
        x, y = x[sel], y[sel]
    x = upscale_digits(x, size, mode)
    return x.contiguous(), y.contiguous()


def upscale_digits(x: Tensor, size: int, mode: str = "bilinear") -> Tensor:
    """Resize ``[N, C, h, w]`` images to ``size×size`` the way the digits dataset does (no-op if equal)."""
    if mode not in MODES:
        raise ValueError(f"digits upscaling mode must be one of {MODES}, got {mode!r}")
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)


def digits_tensors(split: str = "train", size: int = 8, mode: str = "bilinear") -> tuple[Tensor, Tensor]:
    """All images and labels of a split: ``x`` float32 ``[N, 1, size, size]`` in [-1, 1], ``y`` long ``[N]``.

    ``split`` is ``"train"`` (1 437), ``"test"`` (360) or ``"all"`` (1 797).
    """
    _check_args(split, size, mode)
    x, y = _load(split, size, mode)
    return x.clone(), y.clone()


class DigitsDataset(Dataset):
    """The digits as a map-style dataset of ``(image [1, S, S] in [-1, 1], label)`` pairs."""

    def __init__(self, split: str = "train", size: int = 8, mode: str = "bilinear"):
        """Load ``split`` at ``size×size`` (see the module docstring for the conventions)."""
        _check_args(split, size, mode)
        self.split, self.size, self.mode = split, size, mode
        self.images, self.labels = digits_tensors(split, size, mode)

    def __len__(self) -> int:
        """Number of images in the split."""
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        """The ``i``-th ``(image, label)`` pair."""
        return self.images[i], self.labels[i]

    def __repr__(self) -> str:
        """Split, size, mode and count."""
        return f"DigitsDataset(split={self.split!r}, size={self.size}, mode={self.mode!r}, n={len(self)})"
