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

**Quality rows** put it beside sample quality: sliced W2 / energy distance for toy targets, FID
(digits-classifier or Inception features, DESIGN §7) for image datasets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowdistill.core.broadcast import bcast
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
    tc = bcast(ts, traj)
    dev = (traj - ((1 - tc) * x0 + tc * x1)).flatten(2).pow(2).sum(dim=2)  # [T+1, B]
    w = (ts[:-1] - ts[1:]).abs()  # trapezoid weights on the (possibly non-uniform) grid
    integral = (0.5 * w[:, None] * (dev[:-1] + dev[1:])).sum(dim=0)  # [B]
    return float(integral.mean())


NfeSpec = int | tuple[int, str]  # an NFE budget, or (NFE, solver) to sample with another solver


def _budgets(specs: Sequence[NfeSpec]) -> list[tuple[int, str | None]]:
    """``[(nfe, solver or None)]`` from NFE specs (``None``: the run's own sampler)."""
    return [(int(s[0]), str(s[1])) if isinstance(s, tuple | list) else (int(s), None) for s in specs]


def dataset_name(dataset: Any) -> str:
    """The dataset name of a name or of a :class:`~flowdistill.config.DataSpec`."""
    return dataset if isinstance(dataset, str) else str(dataset.name)


def is_image_dataset(dataset: Any) -> bool:
    """Whether ``dataset`` (a name or a data spec) is an image dataset (rows use FID), not a toy.

    Asks the dataset registry; a name nobody registered is an UnknownNameError.
    """
    from flowdistill.data.registry import dataset_entry

    return dataset_entry(dataset_name(dataset)).kind == "image"


def _straightness(run: Any, k: int, m: int, seed: int) -> float:
    """Straightness of ``run``'s velocity net at ``k`` Euler steps from ``m`` seeded noises."""
    g = torch.Generator().manual_seed(seed + 17)
    shape = tuple(run.sample(1, 1, seed=0).shape[1:])
    noise = torch.randn(m, *shape, generator=g)
    return trajectory_straightness(run.student, noise, nfe=k)


def quality_rows(runs: Mapping[str, Any], nfes: Mapping[str, Sequence[NfeSpec]], dataset: Any,
                 n: int = 4000, seed: int = 1234, straight_nfe: Mapping[str, int] | int = 128,
                 n_straight: int | None = None, cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """Quality rows of each run at each NFE budget, with its straightness.

    ``runs`` maps a row label to a loaded run (anything with ``sample(n, nfe, seed=)``, taking
    ``solver=`` where a budget names one, and a velocity-net ``student``; e.g.
    :func:`flowdistill.api.load_run`);
    ``nfes[label]`` lists the budgets to sample it at: an NFE (the run's own sampler) or a pair
    ``(nfe, solver)``. ``dataset`` is a toy name, or a data spec (name and ``image_size``).

    Toy targets: rows ``{model, nfe, solver, metric="sw2", value, floor, sw2, sw2_floor, energy,
    energy_floor, straightness, straight_nfe, n}``, distances against a fresh target sample of the
    same ``n`` (with its data-vs-data floor, see :func:`~flowdistill.eval.toy_metrics.evaluate_samples`).
    Image datasets: :func:`image_quality_rows` (FID).

    ``straightness`` is :func:`trajectory_straightness` of the model's Euler path at
    ``straight_nfe`` steps (per label or one value; give a distilled k-step student its own
    ``k``) from ``n_straight`` (default ``n``) seeded noise. Every model sees the same noise.
    """
    if is_image_dataset(dataset):
        if isinstance(dataset, str):
            raise ValueError(f"image dataset {dataset!r}: pass its data spec (name and image_size)")
        return image_quality_rows(runs, nfes, dataset, n=n, seed=seed, straight_nfe=straight_nfe,
                                  n_straight=n_straight, cache_dir=cache_dir)
    from flowdistill.eval.toy_metrics import evaluate_samples

    name = dataset_name(dataset)
    rows = []
    for label, run in runs.items():
        k = straight_nfe[label] if isinstance(straight_nfe, Mapping) else straight_nfe
        s = _straightness(run, k, n_straight or n, seed)
        for nfe, solver in _budgets(nfes[label]):
            x = run.sample(n, nfe, seed=seed, **({"solver": solver} if solver else {}))
            met = evaluate_samples(x, name, seed=seed + 1)
            rows.append({"model": label, "nfe": nfe, "solver": solver or _default_solver(run),
                         "metric": "sw2", "value": met["sw2"], "floor": met["sw2_floor"],
                         "sw2": met["sw2"], "sw2_floor": met["sw2_floor"],
                         "energy": met["energy"], "energy_floor": met["energy_floor"],
                         "straightness": s, "straight_nfe": k, "n": n})
    return rows


def _default_solver(run: Any) -> str:
    """The solver a run samples with when none is named (``euler`` unless its config says)."""
    dist = getattr(getattr(run, "cfg", None), "distiller", None)
    return str(getattr(dist, "sample_solver", "euler") or "euler")


def image_quality_rows(runs: Mapping[str, Any], nfes: Mapping[str, Sequence[NfeSpec]], data: Any,
                       n: int = 360, seed: int = 1234, straight_nfe: Mapping[str, int] | int = 128,
                       n_straight: int | None = None, cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """FID rows (DESIGN §7 protocol, :func:`~flowdistill.eval.image_eval.image_sweep`) with straightness.

    ``data`` is the data spec of the runs (digits: the 360 test images are the reference and 360
    train images give the floor; ``n = min(n, len(reference))``; features of the bundled digits
    classifier, Inception for image folders). Rows ``{model, nfe, solver, metric="fid", value,
    floor, fid, fid_floor, kid, kid_floor, precision, recall, straightness, straight_nfe, n}``;
    samples are clamped to [-1, 1]. ``cache_dir`` keeps the reference features.
    """
    from flowdistill.data.registry import reference_images
    from flowdistill.eval.image_eval import image_sweep, sample_decoder

    real = reference_images(data, int(n))
    reference, floor_real, ref_name, extractor = real.reference, real.floor, real.name, real.feature_extractor
    n = reference.shape[0]
    decode = sample_decoder(data)  # a latent dataset's tokenizer decoder (None for images)
    rows = []
    for label, run in runs.items():
        k = straight_nfe[label] if isinstance(straight_nfe, Mapping) else straight_nfe
        s = _straightness(run, k, n_straight or n, seed)
        for nfe, solver in _budgets(nfes[label]):
            kw = {"solver": solver} if solver else {}
            sweep, _ = image_sweep({label: lambda m, b, sd, run=run, kw=kw: run.sample(m, b, seed=sd, **kw)},
                                   {label: [nfe]}, reference, floor_real, seed=seed,
                                   feature_extractor=extractor, cache_dir=cache_dir,
                                   reference_name=f"{ref_name}-n{n}", solver=solver or _default_solver(run),
                                   decode=decode)
            r = sweep[0]
            rows.append({"model": label, "nfe": nfe, "solver": r["solver"], "metric": "fid",
                         "value": r["fid"], "floor": r["fid_floor"],
                         "fid": r["fid"], "fid_floor": r["fid_floor"],
                         "kid": r["kid_mean"], "kid_floor": r["kid_floor"], "precision": r["precision"],
                         "recall": r["recall"], "straightness": s, "straight_nfe": k, "n": n})
    return rows


COLUMNS = ["model", "nfe", "sw2", "sw2_floor", "energy", "straightness", "straight_nfe"]
IMAGE_COLUMNS = ["model", "solver", "nfe", "fid", "fid_floor", "kid", "straightness", "straight_nfe"]


def columns_for(dataset: Any) -> list[str]:
    """The report columns for a dataset (name or data spec): :data:`COLUMNS` or :data:`IMAGE_COLUMNS`."""
    return IMAGE_COLUMNS if is_image_dataset(dataset) else COLUMNS


__all__ = ["COLUMNS", "IMAGE_COLUMNS", "columns_for", "dataset_name", "image_quality_rows",
           "is_image_dataset", "quality_rows", "trajectory_straightness"]
