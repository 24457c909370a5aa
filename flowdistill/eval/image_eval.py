"""NFE sweeps for image runs: FID/KID/precision/recall per NFE against real images, with the floor.

Protocol (DESIGN.md §7): every comparison uses equal-size sets and states ``n``; the floor is the
same metric between ``n`` real training images and the same reference. For digits the reference
is the held-out test split (360 images), so ``n = 360`` and the floor is FID(train subset, test) —
the "train vs test" FID that the digits teacher target is stated against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flowdistill.eval.sweep import write_table

IMAGE_COLUMNS = ["model", "solver", "nfe", "fid", "fid_floor", "kid_mean", "kid_floor", "precision", "recall",
                 "n"]


def reference_images(run, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(reference images, real images for the floor, reference name) for a run's dataset.

    Read through the dataset registry from the run's own data spec (the dataset a run trained on
    must be registered, e.g. through ``--plugin``); at most ``n`` images per set.
    """
    from flowdistill.data.registry import reference_images as dataset_reference

    ref = dataset_reference(run.cfg.data, n)
    return ref.reference, ref.floor, ref.name


def image_sweep(samplers: dict[str, Any], nfes: dict[str, list[int]], reference: torch.Tensor,
                floor_real: torch.Tensor, seed: int = 0, feature_extractor: str = "digits",
                cache_dir: Path | None = None, reference_name: str | None = None, solver: str = "",
                **fid_kw) -> tuple[list[dict[str, Any]], dict[str, dict[int, torch.Tensor]]]:
    """FID etc. of each ``sampler(n, nfe, seed)`` at each NFE; ``n = len(reference)``.

    ``floor_real`` needs at least ``n`` images (the first ``n`` are used); ``solver`` only labels
    the rows.
    """
    from flowdistill.eval.fid import compute_fid

    n = reference.shape[0]
    if floor_real.shape[0] < n:
        raise ValueError(f"the floor needs {n} real images (the reference size), got {floor_real.shape[0]}")
    kw = {"feature_extractor": feature_extractor, "cache_dir": cache_dir, "reference_name": reference_name,
          "seed": seed, **fid_kw}
    floor = compute_fid(floor_real[:n], reference, **kw)
    rows, samples = [], {}
    for name, sampler in samplers.items():
        samples[name] = {}
        for nfe in nfes[name]:
            x = sampler(n, nfe, seed).clamp(-1, 1)
            samples[name][nfe] = x
            m = compute_fid(x, reference, **kw)
            rows.append({"model": name, "solver": solver or "default", "nfe": nfe,
                         "fid": m["fid"], "fid_floor": floor["fid"],
                         "kid_mean": m["kid_mean"], "kid_floor": floor["kid_mean"],
                         "precision": m["precision"], "recall": m["recall"], "n": n})
    return rows, samples


def _check_budgets(solver: str | None, nfes: list[int]) -> None:
    """Fail before any sampling if an explicit fixed-step ``solver`` cannot spend an NFE exactly."""
    from flowdistill.core.solvers import steps_for_nfe
    from flowdistill.errors import ConfigError

    if not solver or solver == "dopri5":
        return
    for nfe in nfes:
        try:
            steps_for_nfe(solver, nfe)
        except ValueError as e:
            raise ConfigError(f"--nfe {nfe} with solver {solver!r}: {e}") from None


def evaluate_image_run(run, nfes: list[int], n: int, out_dir: Path, seed: int = 1234,
                       solver: str | None = None, cache_dir: Path | None = None, **fid_kw: Any) -> str:
    """Sweep a :class:`~flowdistill.api.LoadedRun` on images; writes tables, a plot and grids.

    ``n = min(n, len(reference))`` samples are compared with the first ``n`` reference images, and
    the floor uses ``n`` real training images (for digits the full protocol is n = 360). Files are
    ``sweep[_SOLVER].md/json``, ``fid_vs_nfe[_SOLVER].png`` and ``grid[_SOLVER]_nfeK.png``, so
    sweeps with different ``solver`` values can share ``out_dir``. Reference features are cached in
    ``cache_dir`` (default ``RUN_DIR/fid_cache``); ``fid_kw`` go to :func:`~flowdistill.eval.fid.compute_fid`
    (e.g. ``inception_weights``).
    """
    from flowdistill.eval.plots import image_grid, metric_vs_nfe

    _check_budgets(solver, nfes)
    from flowdistill.data.registry import reference_images as dataset_reference

    real = dataset_reference(run.cfg.data, int(n))
    reference, floor_real, ref_name, extractor = real.reference, real.floor, real.name, real.feature_extractor
    n = reference.shape[0]
    label = run.cfg.distiller.name
    tag = f"_{solver}" if solver else ""
    rows, samples = image_sweep({label: lambda k, nfe, s: run.sample(k, nfe, seed=s, solver=solver)},
                                {label: nfes}, reference, floor_real, seed=seed,
                                feature_extractor=extractor,
                                cache_dir=cache_dir if cache_dir is not None else run.run_dir / "fid_cache",
                                reference_name=f"{ref_name}-n{n}",
                                solver=solver or getattr(run.cfg.distiller, "sample_solver", ""), **fid_kw)
    md = write_table(rows, IMAGE_COLUMNS, out_dir, stem=f"sweep{tag}")
    for nfe, x in samples[label].items():
        image_grid(x[:64], out_dir / f"grid{tag}_nfe{nfe}.png")
    metric_vs_nfe({label: {r["nfe"]: r["fid"] for r in rows}}, out_dir / f"fid_vs_nfe{tag}.png",
                  ylabel=f"FID ({extractor} features, n={rows[0]['n']})", floor=rows[0]["fid_floor"])
    return md
