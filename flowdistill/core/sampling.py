"""Sampling a velocity field with a named solver and time grid at a given NFE budget.

Guidance is not applied here: a guided field comes ready from
:func:`flowdistill.core.guidance.build_guidance` (DESIGN.md §1)."""

from __future__ import annotations

import torch
from torch import Tensor

from flowdistill.core.solvers import SolveResult, solve, steps_for_nfe
from flowdistill.core.timesteps import build_grid


@torch.no_grad()
def sample_velocity(field, noise: Tensor, nfe: int, solver: str = "euler", grid: str = "uniform",
                    cond: Tensor | None = None, return_trajectory: bool = False,
                    **grid_kw) -> SolveResult:
    """Integrate ``field`` from ``t = 1`` (``noise``) to ``t = 0`` spending ``nfe`` evaluations.

    For ``solver="dopri5"`` ``nfe`` is ignored (adaptive) and the grid is just ``[1, 0]``.
    """
    if solver == "dopri5":
        g = torch.tensor([1.0, 0.0], dtype=torch.float64)
        return solve(field, noise, g, "dopri5", cond=cond, return_trajectory=return_trajectory)
    steps = steps_for_nfe(solver, nfe)
    g = build_grid(grid, steps, dtype=torch.float64, **grid_kw)
    return solve(field, noise, g, solver, cond=cond, return_trajectory=return_trajectory)
