"""Write clips as animated GIFs, mp4 files and frame-grid PNGs.

Clips are float ``[F, C, H, W]`` (one clip) or ``[rows, F, C, H, W]`` (several, shown side by side
in a GIF/mp4, one row each in a grid) in [-1, 1] (C = 1 or 3), converted to uint8 with
:func:`flowdistill.eval.image_io.to_uint8` (``round((x + 1)·127.5)``). ``scale`` enlarges every
frame by an integer factor with nearest-neighbour copies (a 32×32 frame is hard to see);
``pad`` pixels of ``pad_value`` separate tiles.

- :func:`save_gif` — Pillow only (always available); ``fps`` frames per second, loops forever.
- :func:`save_mp4` — needs ``imageio-ffmpeg`` (``pip install imageio-ffmpeg``) or PyAV
  (``pip install av``); without either it raises a one-line ConfigError naming them. H.264 needs
  even sizes, so odd tiles are padded by one pixel.
- :func:`save_frame_grid` — one PNG, rows = clips, columns = frames (every ``every``-th frame).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowdistill.errors import ConfigError
from flowdistill.eval.image_io import to_uint8


def _as_rows(frames: Tensor) -> Tensor:
    """``[F, C, H, W]`` or ``[rows, F, C, H, W]`` → ``[rows, F, C, H, W]`` (a ValueError otherwise)."""
    if not torch.is_tensor(frames) or frames.dim() not in (4, 5):
        shape = tuple(frames.shape) if torch.is_tensor(frames) else type(frames).__name__
        raise ValueError(f"clips must be [F, C, H, W] or [rows, F, C, H, W], got {shape}")
    return frames.unsqueeze(0) if frames.dim() == 4 else frames


def _tiles(frames: Tensor, scale: int) -> np.ndarray:
    """uint8 ``[rows, F, H·scale, W·scale, C]`` (C = 1 or 3) of ``[rows, F, C, H, W]`` clips."""
    if int(scale) < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    r, f, c, h, w = frames.shape
    u8 = to_uint8(frames.reshape(r * f, c, h, w), "clips").reshape(r, f, c, h, w)
    if scale > 1:
        u8 = u8.repeat_interleave(int(scale), dim=3).repeat_interleave(int(scale), dim=4)
    return u8.permute(0, 1, 3, 4, 2).numpy()


def compose_frames(frames: Tensor, *, scale: int = 4, pad: int = 2, pad_value: int = 0) -> np.ndarray:
    """Each time step as one picture: uint8 ``[F, H', W', C]`` with the rows' clips side by side."""
    t = _tiles(_as_rows(frames), scale)
    r, f, h, w, c = t.shape
    out = np.full((f, h, r * w + (r - 1) * pad, c), pad_value, dtype=np.uint8)
    for i in range(r):
        out[:, :, i * (w + pad) : i * (w + pad) + w] = t[i]
    return out


def _pil(arr: np.ndarray):  # noqa: ANN202 - PIL type kept out of the signature
    """A PIL image of an ``[H, W, 1|3]`` uint8 array."""
    from PIL import Image

    return Image.fromarray(
        arr[..., 0] if arr.shape[-1] == 1 else arr, mode="L" if arr.shape[-1] == 1 else "RGB"
    )


def save_gif(
    frames: Tensor, path: str | os.PathLike, *, fps: float = 8.0, scale: int = 4, pad: int = 2
) -> Path:
    """Write an animated GIF (looping) of one clip or several side by side; returns the path."""
    pics = compose_frames(frames, scale=scale, pad=pad)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [_pil(p) for p in pics]
    duration = max(1, int(round(1000.0 / float(fps))))
    images[0].save(
        path, save_all=True, append_images=images[1:], duration=duration, loop=0, optimize=False, disposal=1
    )
    return path


def _even(pics: np.ndarray) -> np.ndarray:
    """Pad ``[F, H, W, C]`` by one pixel where H or W is odd (H.264 needs even sizes); RGB."""
    f, h, w, c = pics.shape
    if c == 1:
        pics = np.repeat(pics, 3, axis=-1)
    return np.pad(pics, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))


def save_mp4(
    frames: Tensor, path: str | os.PathLike, *, fps: float = 8.0, scale: int = 4, pad: int = 2
) -> Path:
    """Write an H.264 mp4 with imageio-ffmpeg or PyAV (whichever is installed; a ConfigError if neither)."""
    pics = _even(compose_frames(frames, scale=scale, pad=pad))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import imageio_ffmpeg
    except ImportError:
        imageio_ffmpeg = None
    if imageio_ffmpeg is not None:
        f, h, w, _ = pics.shape
        writer = imageio_ffmpeg.write_frames(
            str(path), (w, h), fps=float(fps), codec="libx264", pix_fmt_in="rgb24", macro_block_size=1
        )
        writer.send(None)
        for p in pics:
            writer.send(np.ascontiguousarray(p))
        writer.close()
        return path
    try:
        import av
    except ImportError:
        raise ConfigError(
            "writing .mp4 needs imageio-ffmpeg or PyAV: pip install imageio-ffmpeg "
            "(or pip install av), or write a .gif"
        ) from None
    from fractions import Fraction

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(float(fps)).limit_denominator(1000))
        stream.height, stream.width = pics.shape[1], pics.shape[2]
        stream.pix_fmt = "yuv420p"
        for p in pics:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(p), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def save_frame_grid(
    frames: Tensor,
    path: str | os.PathLike,
    *,
    scale: int = 2,
    pad: int = 2,
    every: int = 1,
    max_frames: int | None = None,
) -> Path:
    """One PNG: rows = clips, columns = frames ``0, every, 2·every, …`` (at most ``max_frames``)."""
    rows = _as_rows(frames)
    if int(every) < 1:
        raise ValueError(f"every must be a positive integer, got {every}")
    rows = rows[:, :: int(every)]
    if max_frames is not None:
        rows = rows[:, : int(max_frames)]
    t = _tiles(rows, scale)
    r, f, h, w, c = t.shape
    grid = np.zeros((r * h + (r - 1) * pad, f * w + (f - 1) * pad, c), dtype=np.uint8)
    for i in range(r):
        for j in range(f):
            grid[i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = t[i, j]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _pil(grid).save(path)
    return path


def save_video(frames: Tensor, path: str | os.PathLike, *, fps: float = 8.0, scale: int = 4) -> Path:
    """Write by suffix: ``.gif`` (:func:`save_gif`), ``.mp4`` (:func:`save_mp4`), ``.png`` (a frame grid)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".gif":
        return save_gif(frames, path, fps=fps, scale=scale)
    if suffix == ".mp4":
        return save_mp4(frames, path, fps=fps, scale=scale)
    if suffix == ".png":
        return save_frame_grid(frames, path, scale=scale)
    raise ConfigError(f"video output {str(path)!r}: the suffix must be .gif, .mp4 or .png")


def load_gif(path: str | os.PathLike) -> Tensor:
    """Frames of a GIF as float ``[F, C, H, W]`` in [-1, 1] (C = 1 for grayscale, else 3)."""
    from PIL import Image

    out = []
    with Image.open(path) as im:
        gray = im.mode in ("L", "P") and _palette_is_gray(im)
        for f in range(getattr(im, "n_frames", 1)):
            im.seek(f)
            arr = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8)
            out.append(torch.from_numpy(arr.copy()))
    x = torch.stack(out)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1.0


def _palette_is_gray(im) -> bool:  # noqa: ANN001 - a PIL image
    """Whether a GIF's palette only holds grays (so it decodes to one channel)."""
    if im.mode == "L":
        return True
    pal = im.getpalette() or []
    rgb = np.asarray(pal[: 3 * (len(pal) // 3)]).reshape(-1, 3)
    return bool((rgb[:, 0] == rgb[:, 1]).all() and (rgb[:, 1] == rgb[:, 2]).all())


__all__ = ["compose_frames", "load_gif", "save_frame_grid", "save_gif", "save_mp4", "save_video"]
