"""Segment edges on a teacher time grid (METHODS.md §3: PCM / Hyper-SD trajectory segments, LCM).

A teacher grid ``1 = t_N > … > t_0`` (index ``n`` ascending with time, as METHODS.md writes it;
the project's grid builders return it in sampling order ``t_N, …, t_0``) is split into ``k``
segments whose edges are the grid points at indices ``floor(linspace(0, N, k, endpoint=False))``,
i.e. ``n_j = floor(j·N/k)``, ``j = 0, …, k − 1``. On a shifted grid ``t_n = shift(n/N)`` the edges
are ``e_j = shift(j/k)`` when ``k`` divides ``N``; the lowest edge is the grid's smallest time
``t_0`` (PCM; LCM is ``k = 1``: every sample jumps to ``t_0``); the top ``t_N = 1`` is not an edge.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _ascending(grid: Tensor) -> Tensor:
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError("time grid must be 1-D with at least 2 times")
    asc = grid.flip(0) if grid[0] > grid[-1] else grid
    if not bool((asc[1:] > asc[:-1]).all()):
        raise ValueError("time grid must be strictly monotone")
    return asc


def segment_indices(n: int, k: int) -> list[int]:
    """Ascending grid indices of the ``k`` edges on an ``N = n``-step grid: ``floor(j·N/k)``
    (exact integer arithmetic, so no float rounding in ``linspace``)."""
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"number of segments must be an integer in [1, {n}], got {k!r}")
    return [(j * n) // k for j in range(k)]


def segment_edges(grid: Tensor, k: int) -> Tensor:
    """The ``k`` segment edges ``e_0 < … < e_{k−1}`` (ascending) of a teacher ``grid`` given in
    either order; ``e_0`` is the grid's smallest time."""
    asc = _ascending(grid)
    idx = torch.tensor(segment_indices(asc.numel() - 1, k), device=asc.device)
    return asc[idx]


def edge_below(t: Tensor, edges: Tensor) -> Tensor:
    """Per sample the largest edge ``≤ t`` (``t [B]``; ``edges`` ascending, from
    :func:`segment_edges`). A ``t`` on an edge returns that edge. In the consistency loss it is
    called with ``t' = t_n`` (the grid point below the sample's ``t = t_{n+1}``), so the target at
    ``t' = e(t')`` is ``x_t'`` itself."""
    e = edges.to(device=t.device, dtype=t.dtype)
    if bool((t < e[0]).any()):
        raise ValueError(f"time below the lowest segment edge {float(e[0])}")
    i = torch.searchsorted(e, t.contiguous(), right=True) - 1
    return e[i]
