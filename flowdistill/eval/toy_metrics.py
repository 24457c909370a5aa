"""Distances between point clouds for the toy targets, their data-vs-data floors, and tables.

Two distances, both computed on the CPU in float64:

- **Sliced Wasserstein-2** (:func:`sliced_wasserstein2`), with directions uniform on the unit
  sphere ``S^{d-1}``:

      SW2(P, Q) = ( E_θ [ W2²(θ·P, θ·Q) ] )^{1/2}.

  Note the normalisation: for a pure shift ``Q = P + m``, ``SW2 = |m| / √d`` (``|m|/√2`` in 2-D),
  because ``E_θ[(θ·m)²] = |m|²/d``.
- **Energy distance** (:func:`energy_distance`), Székely's squared form

      D²(P, Q) = 2·E|X − Y| − E|X − X'| − E|Y − Y'|,

  estimated by the V-statistic (all pairs, diagonal included, divided by ``n·m``, ``n²``, ``m²``).
  The V-statistic is always ``≥ 0`` but biased upward: for two independent samples of size ``n``
  from the same law its mean is ``2·E|X − X'| / n``. That bias is exactly what the data-vs-data
  floor reports, so compare a model's value with the floor at the same ``n``.

The **floor** of a metric is its value between two independent target samples of the same size
(see ``DESIGN.md``, "Metric protocol"): a model cannot be told apart from the data below it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

Metric = Callable[[Tensor, Tensor], float]

# Elements of one block of the pairwise-distance matrix (float64): 4M → 32 MB per block.
_BLOCK_ELEMS = 4_000_000


def _as_cloud(x: Tensor, name: str) -> Tensor:
    """A ``[n, d]`` float64 CPU copy of a point cloud, or a clear error."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a point cloud [n, d], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return x.detach().to("cpu", torch.float64)


def sliced_wasserstein2(x: Tensor, y: Tensor, n_projections: int = 512,
                        generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point clouds ``[n, d]``.

    Draws ``n_projections`` directions ``θ_k`` uniform on the unit sphere, sorts the projections
    ``θ_k·x_i`` and ``θ_k·y_i`` (the 1-D optimal coupling) and returns

        sqrt( mean_k mean_i (sort(θ_k·x)_i − sort(θ_k·y)_i)² ).

    ``generator`` draws the directions; ``None`` uses a fixed seed (0), so the value is
    deterministic and two calls compare on the same directions. Non-finite input gives ``nan``.
    """
    x, y = _as_cloud(x, "x"), _as_cloud(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: x has d={x.shape[1]}, y has d={y.shape[1]}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"sliced_wasserstein2 needs equal sizes, got n={x.shape[0]} and n={y.shape[0]}")
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    theta = torch.randn(n_projections, x.shape[1], generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    xt, yt = x.T.contiguous(), y.T.contiguous()  # [d, n]: projections come out as [c, n] rows
    chunk = max(1, _BLOCK_ELEMS // x.shape[0])
    total = 0.0
    for k in range(0, n_projections, chunk):
        th = theta[k : k + chunk]  # [c, d]
        px = torch.sort(th @ xt, dim=1).values  # sorting contiguous rows is much faster than columns
        py = torch.sort(th @ yt, dim=1).values
        total += float(((px - py) ** 2).sum())
    return math.sqrt(total / (x.shape[0] * n_projections)) if math.isfinite(total) else float("nan")


def _mean_pairwise_distance(a: Tensor, b: Tensor | None = None) -> float:
    """``(1 / (n·m)) Σ_ij |a_i − b_j|`` in row blocks (bounded memory); ``b=None`` means ``b = a``.

    For ``b = a`` only the upper triangle of blocks is computed (the matrix is symmetric).
    """
    sym = b is None
    b = a if b is None else b
    rows = max(1, _BLOCK_ELEMS // b.shape[0])
    total = 0.0
    for i in range(0, a.shape[0], rows):
        blk = a[i : i + rows]
        if sym:
            d = torch.cdist(blk, a[i:], compute_mode="donot_use_mm_for_euclid_dist")
            total += 2.0 * float(d.sum()) - float(d[:, : blk.shape[0]].sum())  # diagonal block once
        else:
            total += float(torch.cdist(blk, b, compute_mode="donot_use_mm_for_euclid_dist").sum())
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance ``D² = 2·E|X − Y| − E|X − X'| − E|Y − Y'|`` (V-statistic, ``≥ 0``).

    Sizes may differ; dimensions must match. Memory stays bounded (blocks of the distance matrix),
    so ``n = 10⁴`` is fine. Tiny negative round-off is clipped to 0; non-finite input gives ``nan``.
    """
    x, y = _as_cloud(x, "x"), _as_cloud(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: x has d={x.shape[1]}, y has d={y.shape[1]}")
    return _energy(x, y)


def _energy(x: Tensor, y: Tensor, eyy: float | None = None) -> float:
    """V-statistic energy distance of float64 clouds; ``eyy`` reuses a known ``E|Y − Y'|``."""
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return float("nan")
    exy = _mean_pairwise_distance(x, y)
    exx = _mean_pairwise_distance(x)
    if eyy is None:
        eyy = _mean_pairwise_distance(y)
    return max(0.0, 2.0 * exy - exx - eyy)


METRICS: dict[str, Metric] = {"sw2": sliced_wasserstein2, "energy": energy_distance}


def _dataset(dataset: Any):
    """A toy target instance from a name or an instance."""
    if isinstance(dataset, str):
        from flowdistill.data.toy2d import get_toy

        return get_toy(dataset)
    return dataset


def _reference_pair(dataset: Any, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Two independent target samples of size ``n`` from one generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    a, _ = dataset.sample(n, generator=g)
    b, _ = dataset.sample(n, generator=g)
    return a, b


def _projection_seed(seed: int) -> int:
    """Seed of the SW2 directions derived from the evaluation seed (shared by model and floor)."""
    return (int(seed) * 7919 + 17) % (2**63 - 1)


def _resolve_metric(metric: str | Metric, seed: int, n_projections: int) -> Metric:
    """A ``(x, y) -> float`` metric from a name (``"sw2"``, ``"energy"``) or a callable."""
    if callable(metric):
        return metric
    if metric == "sw2":
        return lambda a, b: sliced_wasserstein2(
            a, b, n_projections, generator=torch.Generator().manual_seed(_projection_seed(seed)))
    if metric == "energy":
        return energy_distance
    raise ValueError(f"unknown metric {metric!r}; available: {', '.join(METRICS)} or a callable")


def data_floor(dataset: Any, n: int, metric: str | Metric = "sw2", seed: int = 0,
               n_projections: int = 512) -> float:
    """The metric between two independent target samples of size ``n`` (the data-vs-data floor).

    ``dataset`` is a toy target or its name; ``metric`` is ``"sw2"``, ``"energy"`` or a callable
    ``(x, y) -> float``. Deterministic in ``seed``; equals the floor :func:`evaluate_samples`
    reports for the same ``(n, seed)``.
    """
    ds = _dataset(dataset)
    a, b = _reference_pair(ds, n, seed)
    return float(_resolve_metric(metric, seed, n_projections)(b, a))


def evaluate_samples(samples: Tensor, dataset: Any, seed: int, n_projections: int = 512) -> dict[str, Any]:
    """SW2 and energy distance of ``samples [n, 2]`` to a fresh target sample of the same ``n``.

    Returns ``{"sw2", "energy", "sw2_floor", "energy_floor", "n"}``. The reference sample and the
    floor's second sample are drawn from ``seed``; SW2 uses the same directions for the model and
    the floor. Non-finite samples (a diverged sampler) give ``nan`` distances, not an error, so
    sweeps still produce a table.
    """
    ds = _dataset(dataset)
    x = _as_cloud(samples, "samples")
    dim = int(getattr(ds, "dim", x.shape[1]))
    if x.shape[1] != dim:
        raise ValueError(f"samples have d={x.shape[1]} but the target has d={dim}")
    n = x.shape[0]
    ref, ref2 = (r.double() for r in _reference_pair(ds, n, seed))
    sw2 = _resolve_metric("sw2", seed, n_projections)
    eyy = _mean_pairwise_distance(ref)  # shared by the model's and the floor's energy
    return {
        "sw2": float(sw2(x, ref)),
        "energy": _energy(x, ref, eyy),
        "sw2_floor": float(sw2(ref2, ref)),
        "energy_floor": _energy(ref2, ref, eyy),
        "n": n,
    }


def _fmt(v: Any) -> str:
    """One markdown cell: floats to 4 significant digits, ``None`` empty, ``|`` escaped."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, Tensor) and v.numel() == 1:
        return _fmt(v.item())
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-markdown table of ``rows`` restricted to ``columns`` (in that order).

    Missing keys give empty cells; columns whose values are all numbers are right-aligned.
    """
    if not columns:
        raise ValueError("markdown_table needs at least one column")

    def numeric(c: str) -> bool:
        vals = [r[c] for r in rows if r.get(c) is not None]
        return bool(vals) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals)

    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if numeric(c) else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


__all__ = ["METRICS", "data_floor", "energy_distance", "evaluate_samples", "markdown_table",
           "sliced_wasserstein2"]
