"""``video_folder``: a folder of the user's own clips, read lazily, as random fixed-length windows.

Files under ``data.root`` (recursively, sorted): animated GIFs (``*.gif``) and safetensors tensors
(``*.safetensors``, one tensor per file — the key ``"frames"`` if present, else the only one —
shaped ``[F, C, H, W]``, float in [-1, 1] or uint8 in 0..255). Construction reads only headers (the
frame count of each file) and raises a one-line ConfigError for an empty folder or for clips shorter
than ``frames``; a batch decodes only the clips it draws. Each item is a ``frames``-long window,
resized to ``image_size × image_size`` (bilinear, antialiased; non-square clips are stretched) with
``channels`` channels (``data.params.channels``, default 3; GIFs are converted to ``"L"`` or
``"RGB"``, tensors with 1 channel are repeated to 3 and 3 are averaged to 1), as ``{"x": [frames,
channels, size, size]}`` in [-1, 1]. The window's start is uniform over the clip and drawn, like the
clip index, from the step's generator, so batches are reproducible.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flowdistill.data.registry import register_dataset
from flowdistill.data.sources import IndexedSource, _slice
from flowdistill.errors import ConfigError

SUFFIXES = (".gif", ".safetensors")


def _tensor_key(path: Path) -> str:
    """The key of a clip tensor in a safetensors file (``"frames"`` or the only key)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if "frames" in keys:
        return "frames"
    if len(keys) != 1:
        raise ConfigError(f"video_folder: {path} must hold one tensor or a 'frames' tensor, has {keys}")
    return keys[0]


def clip_length(path: str | os.PathLike) -> int:
    """Number of frames of a clip file, from its header only."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        from PIL import Image

        with Image.open(path) as im:
            return int(getattr(im, "n_frames", 1))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shape = f.get_slice(_tensor_key(path)).get_shape()
    if len(shape) != 4:
        raise ConfigError(f"video_folder: {path} holds a tensor of shape {shape}, expected [F, C, H, W]")
    return int(shape[0])


def read_clip(path: str | os.PathLike, start: int, frames: int, size: int, channels: int) -> Tensor:
    """Frames ``start .. start + frames − 1`` of a clip as ``[frames, channels, size, size]`` in [-1, 1]."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        import numpy as np
        from PIL import Image

        out = []
        with Image.open(path) as im:
            for f in range(start, start + frames):
                im.seek(f)
                arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
                out.append(torch.from_numpy(arr.copy()))
        x = torch.stack(out)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        x = x.float() / 127.5 - 1.0
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            x = f.get_slice(_tensor_key(path))[start:start + frames]
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[1] != channels:
            if x.shape[1] == 1:
                x = x.repeat(1, channels, 1, 1)
            elif channels == 1:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise ConfigError(f"video_folder: {path} has {x.shape[1]} channels, "
                                  f"data.params.channels={channels}")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1.0, 1.0).contiguous()


class VideoFolderSource(IndexedSource):
    """Clips under ``root`` as random ``frames``-long windows (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, frames: int, size: int, channels: int = 3):
        """List the clip files and read their lengths (headers only)."""
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(f"data.root={str(root)!r} is not a directory "
                              f"(video_folder needs a folder of clips)")
        if frames < 1 or channels not in (1, 3):
            raise ConfigError(f"video_folder needs data.params.frames >= 1 and channels in (1, 3), "
                              f"got {frames}, {channels}")
        self.files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not self.files:
            raise ConfigError(f"data.root={str(root)!r} holds no clips (*.gif or *.safetensors)")
        self.lengths = [clip_length(p) for p in self.files]
        short = [(p.name, n) for p, n in zip(self.files, self.lengths, strict=True) if n < frames]
        if short:
            raise ConfigError(f"video_folder: {len(short)} clip(s) shorter than data.params.frames={frames}, "
                              f"e.g. {short[0][0]} has {short[0][1]} frames")
        self.frames, self.size, self.channels = int(frames), int(size), int(channels)
        self.sample_shape = (self.frames, self.channels, self.size, self.size)

    def __len__(self) -> int:
        """Number of clip files."""
        return len(self.files)

    def window(self, i: int, start: int) -> dict[str, Tensor]:
        """The window of clip ``i`` starting at frame ``start``."""
        return {"x": read_clip(self.files[i], start, self.frames, self.size, self.channels)}

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        """The first window of clip ``i``."""
        return self.window(int(i), 0)

    def local_batch(self, generator: torch.Generator, rank: int, world: int,
                    local_batch: int) -> dict[str, Tensor]:
        """This process's slice of a global batch of (clip, start) pairs drawn from ``generator``."""
        idx = torch.randint(len(self), (local_batch * world,), generator=generator)
        u = torch.rand(local_batch * world, generator=generator, dtype=torch.float64)
        lengths = torch.tensor(self.lengths, dtype=torch.float64)[idx]
        start = torch.floor(u * (lengths - self.frames + 1)).long()
        mine = zip(_slice(idx, rank, world), _slice(start, rank, world), strict=True)
        pairs = [(int(i), int(s)) for i, s in mine]
        return {"x": torch.stack([self.window(i, s)["x"] for i, s in pairs])}


def _params(spec: Any) -> tuple[str, int, int, int]:
    """``(root, frames, image_size, channels)`` of a ``video_folder`` data spec."""
    if not str(getattr(spec, "root", "") or "").strip():
        raise ConfigError("data.name=video_folder needs data.root=DIR (the folder of clips)")
    p = dict(getattr(spec, "params", None) or {})
    extra = sorted(set(p) - {"frames", "channels"})
    if extra:
        raise ConfigError(f"data.params of video_folder: unknown key(s) {extra} "
                          f"(known: ['channels', 'frames'])")
    return str(spec.root), int(p.get("frames", 16)), int(spec.image_size), int(p.get("channels", 3))


def _shape(spec: Any) -> tuple[int, ...]:
    """``(frames, channels, image_size, image_size)`` of a ``video_folder`` spec (no file is read)."""
    _, frames, size, channels = _params(spec)
    return (frames, channels, size, size)


@register_dataset("video_folder", kind="video", sample_shape=_shape)
def _video_folder(spec: Any, split: str) -> VideoFolderSource:
    """Clips under ``spec.root`` (one folder, so ``split`` is ignored)."""
    if getattr(spec, "conditional", False):
        raise ConfigError("data.conditional=true is not supported by video_folder (clips carry no labels)")
    return VideoFolderSource(*_params(spec))


__all__ = ["SUFFIXES", "VideoFolderSource", "clip_length", "read_clip"]
