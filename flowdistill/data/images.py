"""Users' own images from a folder, resized and center-cropped to a square, scaled to [-1, 1].

Two layouts are accepted:

- a plain folder of images (searched recursively); every label is 0;
- a torchvision ``ImageFolder`` layout, ``root/<class>/<image>`` with no images directly in
  ``root``; labels are the indices of the sorted class-folder names (as ``ImageFolder`` assigns them).

Each image is resized so that its shorter side is ``size`` (bicubic, antialiased), center-cropped to
``size×size`` and converted to RGB (``channels=3``) or grayscale (``channels=1``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def find_images(root: str | os.PathLike) -> list[Path]:
    """Sorted image files under ``root`` (recursive); a one-line ValueError if none or no folder."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(
            f"image folder {str(root)!r} contains no images (extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def load_image(path: str | os.PathLike, size: int | None, channels: int = 3) -> Tensor:
    """One image as float32 ``[channels, size, size]`` in [-1, 1] (``size=None`` keeps its own size)."""
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    with Image.open(path) as im:
        im = im.convert(mode)
        if size is not None:
            im = TF.resize(im, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
            im = TF.center_crop(im, [size, size])
        x = TF.pil_to_tensor(im)
    return x.to(torch.float32) / 127.5 - 1.0


class ImageFolderDataset(Dataset):
    """Images under ``root`` as ``(image [C, size, size] in [-1, 1], label)`` pairs (see module doc)."""

    def __init__(self, root: str | os.PathLike, size: int, channels: int = 3):
        """Index the images under ``root``; ValueError if the folder is missing or has none."""
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"image size must be a positive int, got {size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.root, self.size, self.channels = Path(root), size, channels
        self.files = find_images(self.root)
        top_level = [p for p in self.files if p.parent == self.root]
        if top_level:
            self.classes: list[str] = []
            self.labels = [0] * len(self.files)
        else:
            self.classes = sorted({p.relative_to(self.root).parts[0] for p in self.files})
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [index[p.relative_to(self.root).parts[0]] for p in self.files]

    def __len__(self) -> int:
        """Number of images found."""
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        """The ``i``-th ``(image, label)`` pair."""
        x = load_image(self.files[i], self.size, self.channels)
        return x, torch.tensor(self.labels[i], dtype=torch.long)


def image_folder_tensors(
    root: str | os.PathLike, size: int, channels: int = 3, limit: int | None = None
) -> tuple[Tensor, Tensor]:
    """Load (the first ``limit``) images of a folder into memory: ``x [N, C, size, size]``, ``y [N]``."""
    ds = ImageFolderDataset(root, size, channels)
    n = len(ds) if limit is None else min(limit, len(ds))
    xs, ys = zip(*(ds[i] for i in range(n)), strict=True)
    return torch.stack(xs), torch.stack(ys)
