"""Image tensors, datasets, samplers and folders turned into uint8 inputs for the feature networks.

Every input becomes uint8 ``[N, 3, H, W]`` images in 0..255 before the feature network, exactly
once: float images in [-1, 1] map by ``round((x + 1) · 127.5)`` (values are clamped to [-1, 1]
first; anything beyond ±2, or non-finite, is rejected as a wrong scale), uint8 tensors are taken
as 0..255, and grayscale is replicated to 3 channels. Folders are read the way torch-fidelity
reads them (``png,jpg,jpeg`` files directly in the folder, sorted, converted to RGB), so a folder
of PNGs written by :func:`save_png_folder` gives the same numbers as the tensor it came from.

:func:`resolve_input` turns any accepted source into an :class:`ImageInput`: a dataset of uint8
``[3, H, W]`` images plus a fingerprint (a hash of the uint8 pixels, or of the folder's file names,
sizes and mtimes) used to key reference-feature caches.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.utils import glob_samples_paths

Sampler = Callable[[int, torch.Generator], Tensor]
ImageSource = Sampler | Tensor | Dataset | str | os.PathLike

FOLDER_EXTENSIONS = "png,jpg,jpeg"
RANGE_LIMIT = 2.0  # float images beyond ±RANGE_LIMIT are a wrong scale (e.g. 0..255), not overshoot


# --------------------------------------------------------------------------- image conversion


def to_uint8(images: Tensor, what: str = "images") -> Tensor:
    """Validate ``[N, C, H, W]`` images (C = 1 or 3) and return them as uint8 0..255 on the CPU.

    Float images must be in [-1, 1] (clamped; values beyond ±2 or non-finite raise ValueError);
    uint8 images are returned unchanged.
    """
    if not torch.is_tensor(images):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 1:
        raise ValueError(f"{what} must have shape [N, 1 or 3, H, W] with N >= 1, got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.detach().cpu()
    if not images.is_floating_point():
        raise ValueError(f"{what} must be float in [-1, 1] or uint8 in 0..255, got dtype {images.dtype}")
    x = images.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -RANGE_LIMIT or hi > RANGE_LIMIT:
        raise ValueError(f"{what} must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}] (wrong scale?)")
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def save_png_folder(images: Tensor, folder: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Write images (float [-1, 1] or uint8) as ``folder/<prefix>NNNNNN.png``; returns the paths."""
    x = to_uint8(images)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(x):
        arr = img.permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[:, :, 0]) if arr.shape[2] == 1 else Image.fromarray(arr)
        p = out / f"{prefix}{i:06d}.png"
        pil.save(p)
        paths.append(p)
    return paths


class _UInt8Images(Dataset):
    """uint8 ``[N, C, H, W]`` images served as ``[3, H, W]`` (grayscale replicated)."""

    def __init__(self, images: Tensor):
        """Wrap already validated uint8 images."""
        self.images = images

    def __len__(self) -> int:
        """Number of images."""
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        """Image ``i`` as uint8 ``[3, H, W]``."""
        x = self.images[i]
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x


# --------------------------------------------------------------------------- inputs


@dataclass
class ImageInput:
    """A resolved input: a dataset of uint8 ``[3, H, W]`` images and how to fingerprint it."""

    dataset: Dataset
    n: int
    fingerprint: Callable[[], str]


def _tensor_input(x: Tensor) -> ImageInput:
    """Wrap validated uint8 images."""

    def fp() -> str:
        """Hash of the shape and uint8 pixels."""
        h = hashlib.sha256(str(tuple(x.shape)).encode())
        h.update(x.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    return ImageInput(_UInt8Images(x), x.shape[0], fp)


def _folder_input(path: str | os.PathLike, what: str, n: int | None) -> ImageInput:
    """A flat folder of png/jpg images read like torch-fidelity reads it."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{what} folder {str(p)!r} does not exist or is not a directory")
    files = glob_samples_paths(str(p), False, FOLDER_EXTENSIONS, None, verbose=False)
    if not files:
        raise ValueError(f"{what} folder {str(p)!r} contains no {FOLDER_EXTENSIONS} images")
    if n is not None:
        if len(files) < n:
            raise ValueError(f"{what} folder {str(p)!r} has {len(files)} images, fewer than n={n}")
        files = files[:n]

    def fp() -> str:
        """Hash of the file names, sizes and modification times."""
        h = hashlib.sha256()
        for f in files:
            st = os.stat(f)
            h.update(f"{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()[:16]

    return ImageInput(ImagesPathDataset(files), len(files), fp)


def _dataset_images(ds: Dataset, what: str, n: int | None) -> Tensor:
    """Stack the images of a dataset whose items are tensors or ``(tensor, ...)`` tuples."""
    if hasattr(ds, "images") and torch.is_tensor(ds.images):
        x = ds.images
        return x if n is None else x[:n]
    count = len(ds) if n is None else min(n, len(ds))
    items = []
    for i in range(count):
        item = ds[i]
        item = item[0] if isinstance(item, (tuple, list)) else item
        if not torch.is_tensor(item):
            raise ValueError(f"{what} dataset items must be image tensors or (image, label) tuples")
        items.append(item)
    if not items:
        raise ValueError(f"{what} dataset is empty")
    return torch.stack(items)


@torch.no_grad()
def sample_images(
    sampler: Sampler, n: int, batch_size: int = 256, seed: int = 0, device: str = "cpu"
) -> Tensor:
    """Draw ``n`` images from ``sampler(b, generator)`` in batches; uint8 ``[n, C, H, W]`` on the CPU.

    One ``torch.Generator`` on ``device`` seeded with ``seed`` is passed to every call, so the
    result depends only on (sampler, n, batch_size, seed).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    out: list[Tensor] = []
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        x = sampler(b, g)
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[0] != b:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"sampler(n={b}, generator) must return [n, C, H, W] images, got {shape}")
        xb = to_uint8(x, "sampler outputs")
        if out and xb.shape[1:] != out[0].shape[1:]:
            before, now = tuple(out[0].shape[1:]), tuple(xb.shape[1:])
            raise ValueError(f"sampler changed image shape between calls: {before} vs {now}")
        out.append(xb)
        done += b
    return torch.cat(out)


def resolve_input(
    source: ImageSource, what: str, n: int | None, batch_size: int, seed: int, device: str
) -> ImageInput:
    """Turn a sampler, tensor, dataset or folder into an :class:`ImageInput`."""
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(source, (str, os.PathLike)):
        return _folder_input(source, what, n)
    if torch.is_tensor(source):
        x = to_uint8(source, what)
        if n is not None:
            if x.shape[0] < n:
                raise ValueError(f"{what} has {x.shape[0]} images, fewer than n={n}")
            x = x[:n]
        return _tensor_input(x)
    if isinstance(source, Dataset):
        x = _dataset_images(source, what, n)
        if n is not None and x.shape[0] < n:
            raise ValueError(f"{what} has {x.shape[0]} images, fewer than n={n}")
        return _tensor_input(to_uint8(x, what))
    if callable(source):
        if n is None:
            raise ValueError(f"{what}: a sampler needs n, the number of images to draw")
        return _tensor_input(sample_images(source, n, batch_size, seed, device))
    raise ValueError(
        f"{what} must be a sampler callable, an image tensor, a Dataset or a folder path, "
        f"got {type(source).__name__}"
    )


__all__ = [
    "FOLDER_EXTENSIONS",
    "RANGE_LIMIT",
    "ImageInput",
    "ImageSource",
    "Sampler",
    "resolve_input",
    "sample_images",
    "save_png_folder",
    "to_uint8",
]
