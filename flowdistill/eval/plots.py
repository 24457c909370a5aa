"""PNG plots for toy and image runs: scatter grids, metric-vs-NFE curves, image grids.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``) and written through
the Agg canvas: no pyplot, no global backend switch, no ``show()``, so these work headless and
leave a notebook's backend alone. Every function creates missing parent folders and returns the
path it wrote.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

Lim = float | tuple[float, float] | None


def _save(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Render ``fig`` with the Agg canvas to ``path`` (PNG); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _points(x: Tensor | np.ndarray) -> np.ndarray:
    """A finite ``[n, 2]`` float numpy array from a tensor or array (non-finite rows dropped)."""
    a = x.detach().to("cpu", torch.float64).numpy() if isinstance(x, Tensor) else np.asarray(x, float)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"scatter panels must be [n, 2] point clouds, got shape {a.shape}")
    return a[np.isfinite(a).all(axis=1)]


def _auto_lim(clouds: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """A shared symmetric axis range ``[-r, r]``.

    ``r`` is 1.15 × the 99.5 % quantile of ``max(|x|, |y|)`` of the panel named ``"data"`` if there
    is one, else the median of that radius over the panels — so one diverged panel cannot squash
    the others (its far points simply fall outside).
    """
    radii = {k: float(np.quantile(np.abs(c).max(axis=1), 0.995)) for k, c in clouds.items() if len(c)}
    if not radii:
        return (-1.0, 1.0)
    r = radii["data"] if "data" in radii else float(np.median(list(radii.values())))
    r = 1.15 * r if r > 0 else 1.0
    return (-r, r)


def scatter_grid(panels: Mapping[str, Tensor], path: str | Path, title: str | None = None,
                 lim: Lim = None, max_points: int = 20_000) -> Path:
    """One square scatter subplot per panel (``{"data": x, "teacher NFE 1": y, ...}``), as a PNG.

    ``lim`` is the axis range for both axes: a half-width ``r`` (``[-r, r]``), a ``(lo, hi)`` pair,
    or ``None`` for a shared range fitted to the ``"data"`` panel (else the typical panel). At
    most ``max_points`` points per panel are drawn (the first ones); non-finite points are dropped.
    """
    if not panels:
        raise ValueError("scatter_grid needs at least one panel")
    clouds = {name: _points(x)[:max_points] for name, x in panels.items()}
    if lim is None:
        lo, hi = _auto_lim(clouds)
    elif isinstance(lim, int | float):
        lo, hi = -float(lim), float(lim)
    else:
        lo, hi = float(lim[0]), float(lim[1])
    k = len(clouds)
    ncols = min(k, 4)
    nrows = math.ceil(k / ncols)
    fig = Figure(figsize=(3.0 * ncols, 3.0 * nrows + (0.4 if title else 0.0)))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (name, pts) in zip(axes.flat, clouds.items(), strict=False):
        size = 1.5 if len(pts) > 2000 else 4.0
        ax.scatter(pts[:, 0], pts[:, 1], s=size, alpha=0.5, linewidths=0, rasterized=True)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[k:]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def metric_vs_nfe(curves: Mapping[str, Mapping[int, float]], path: str | Path, ylabel: str,
                  floor: float | None = None, logy: bool = False, title: str | None = None) -> Path:
    """A metric against NFE (log₂ x-axis), one line per model, optional dashed data floor; PNG.

    ``curves`` maps a label to ``{nfe: value}``; NFE ticks are the NFEs present. ``nan`` values
    leave gaps.
    """
    if not curves:
        raise ValueError("metric_vs_nfe needs at least one curve")
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    ticks: set[int] = set()
    for label, pts in curves.items():
        nfes = sorted(int(k) for k in pts)
        if any(k < 1 for k in nfes):
            raise ValueError(f"NFE must be >= 1, got {nfes} for {label!r}")
        ticks.update(nfes)
        ax.plot(nfes, [float(pts[k]) for k in nfes], marker="o", label=label)
    if floor is not None:
        ax.axhline(float(floor), color="gray", linestyle="--", linewidth=1, label="data floor")
    ax.set_xscale("log", base=2)
    if ticks:
        ax.set_xticks(sorted(ticks))
        ax.set_xticklabels([str(k) for k in sorted(ticks)])
        ax.minorticks_off()
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def image_grid(x: Tensor, path: str | Path, nrow: int | None = None,
               value_range: tuple[float, float] = (-1, 1), scale: int = 4) -> Path:
    """Tile images ``[B, C, H, W]`` (values in ``value_range``, default ``[-1, 1]``) into one PNG.

    ``C`` is 1 (grey) or 3 (RGB); ``nrow`` images per row (default ≈ √B); each pixel is drawn as a
    ``scale × scale`` block (nearest) so small images such as 8×8 digits stay legible.
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"image_grid needs [B, 1 or 3, H, W] with B >= 1, got {tuple(x.shape)}")
    lo, hi = value_range
    imgs = ((x.detach().to("cpu", torch.float32) - lo) / (hi - lo)).nan_to_num(0.0).clamp(0, 1)
    b, c, h, w = imgs.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / nrow)
    pad = 1
    canvas = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(b):
        r, q = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        canvas[:, top : top + h, left : left + w] = imgs[i]
    canvas = canvas.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if c == 1:
        arr = np.repeat(arr, 3, axis=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from matplotlib.image import imsave

    imsave(path, arr, format="png")
    return path


__all__ = ["image_grid", "metric_vs_nfe", "scatter_grid"]
