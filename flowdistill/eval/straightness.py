"""Trajectory straightness, and quality rows for teachers, rectified flows and distilled students.

**Straightness** of a sampler's path (Rectified Flow, Liu et al. 2022, measure the same idea with
velocities; this is the path-space form): with the solver states ``x_{t_i}`` on a grid from
``t = 1`` (``x_1 = ε``) to ``t = 0`` (``x_0`` = the sample),

    S = E_ε ∫_0^1 ‖x_t − ((1 − t)·x_0 + t·x_1)‖² dt,

the mean squared distance of the path from the straight segment between its ends (``‖·‖²`` summed
over the data dimensions, the integral by the trapezoid rule on the solver grid). ``S = 0`` exactly
when every path is a straight line traversed at constant speed, which is what makes one Euler step
exact. Computed at many steps (128) it measures the *field*; a k-step sampler's own path is
piecewise linear with ``k − 1`` kinks (a one-step path has ``S = 0`` by construction).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from flowdistill.core.sampling import sample_velocity


@torch.no_grad()
def trajectory_straightness(field, noise: Tensor, nfe: int = 128, solver: str = "euler",
                            grid: str = "uniform", cond: Tensor | None = None) -> float:
    """``S`` (module docstring) of the ``field``'s ODE path from ``noise`` with a fixed-step solver."""
    if solver == "dopri5":
        raise ValueError("straightness needs a fixed-step solver (the path is read on its grid)")
    res = sample_velocity(field, noise, nfe, solver, grid, cond=cond, return_trajectory=True)
    traj = torch.stack([x.double() for x in res.trajectory])  # [T+1, B, ...]
    ts = torch.tensor(res.times, dtype=torch.float64)
    x1, x0 = traj[0], traj[-1]
    tc = ts.reshape(-1, *([1] * (traj.ndim - 1)))
    dev = (traj - ((1 - tc) * x0 + tc * x1)).flatten(2).pow(2).sum(dim=2)  # [T+1, B]
    w = (ts[:-1] - ts[1:]).abs()  # trapezoid weights on the (possibly non-uniform) grid
    integral = (0.5 * w[:, None] * (dev[:-1] + dev[1:])).sum(dim=0)  # [B]
    return float(integral.mean())


def quality_rows(runs: Mapping[str, Any], nfes: Mapping[str, list[int]], dataset: Any, n: int = 4000,
                 seed: int = 1234, straight_nfe: Mapping[str, int] | int = 128,
                 n_straight: int | None = None) -> list[dict[str, Any]]:
    """Rows ``{model, nfe, sw2, sw2_floor, energy, energy_floor, straightness, n}`` for toy targets.

    ``runs`` maps a row label to a loaded run (anything with ``sample(n, nfe, seed=)`` and a
    velocity-net ``student``, e.g. :func:`flowdistill.api.load_run`); ``nfes[label]`` lists the
    NFE budgets to sample it at. Distances are against a fresh target sample of the same ``n``
    (with its data-vs-data floor, see :func:`~flowdistill.eval.toy_metrics.evaluate_samples`).
    ``straightness`` is :func:`trajectory_straightness` of the model's Euler path at
    ``straight_nfe`` steps (per label or one value; give a distilled k-step student its own
    ``k``) from ``n_straight`` (default ``n``) seeded noise. Every model sees the same noise.
    """
    from flowdistill.eval.toy_metrics import evaluate_samples

    rows = []
    for name, run in runs.items():
        k = straight_nfe[name] if isinstance(straight_nfe, Mapping) else straight_nfe
        g = torch.Generator().manual_seed(seed + 17)
        m = n_straight or n
        shape = tuple(run.sample(1, 1, seed=0).shape[1:])
        noise = torch.randn(m, *shape, generator=g)
        s = trajectory_straightness(run.student, noise, nfe=k)
        for nfe in nfes[name]:
            x = run.sample(n, nfe, seed=seed)
            met = evaluate_samples(x, dataset, seed=seed + 1)
            rows.append({"model": name, "nfe": nfe, "sw2": met["sw2"], "sw2_floor": met["sw2_floor"],
                         "energy": met["energy"], "energy_floor": met["energy_floor"],
                         "straightness": s, "straight_nfe": k, "n": n})
    return rows


COLUMNS = ["model", "nfe", "sw2", "sw2_floor", "energy", "straightness", "straight_nfe"]

__all__ = ["COLUMNS", "quality_rows", "trajectory_straightness"]
