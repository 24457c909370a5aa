"""The evaluation rows of ``scripts/bench_quality.py``: sliced W2 and straightness on toys, FID/KID
on digits (mean ± std over seeds, with floors), the teacher's guidance, and the ``ratio`` column.
Imported by ``bench_quality.py`` from this folder.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

MANY_NFE = 128


# -- evaluation ---------------------------------------------------------------------------------
def summarise(problem: str, label: str, nfe: int, metric: str, values: list[float], floors: list[float],
              **extra: Any) -> dict[str, Any]:
    """One table row: mean, spread (std over seeds) and mean floor."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"problem": problem, "model": label, "nfe": nfe, "metric": metric,
            "value": statistics.fmean(values), "std": sd, "floor": statistics.fmean(floors),
            "seeds": len(values), **extra}


def toy_rows(problem: str, runs: dict[str, tuple[Any, list[int]]], n: int, seeds: list[int]) -> list[dict]:
    """Sliced W2 rows (mean ± std over ``seeds``) and straightness rows of velocity-field runs."""
    from flowdistill.eval.straightness import trajectory_straightness
    from flowdistill.eval.toy_metrics import evaluate_samples

    rows = []
    for label, (run, nfes) in runs.items():
        for nfe in nfes:
            mets = [evaluate_samples(run.sample(n, nfe, seed=s), problem, seed=s + 1) for s in seeds]
            rows.append(summarise(problem, label, nfe, "sw2", [m["sw2"] for m in mets],
                                  [m["sw2_floor"] for m in mets], n=n))
        if not run.distiller.student_two_time:
            import torch

            g = torch.Generator().manual_seed(seeds[0])
            noise = torch.randn(n, *run.sample(1, 1).shape[1:], generator=g)
            s = trajectory_straightness(run.student, noise, nfe=MANY_NFE)
            rows.append(summarise(problem, label, MANY_NFE, "straightness", [s], [0.0]))
    return rows


def digits_rows(runs: dict[str, tuple[Any, list[int]]], seeds: list[int], cache: Path,
                solvers: dict[str, str] | None = None, labels: str | None = None) -> list[dict]:
    """FID rows (digits features, n = 360 against the test split, floor train-vs-test) over seeds;
    ``solvers[label]`` samples that entry with another solver (``""``/absent: the run's default);
    ``labels``: ``None`` (null label) or ``"balanced"``, the same labels for every model."""
    from flowdistill.data.registry import reference_images
    from flowdistill.eval.image_eval import image_sweep

    spec = next(iter(runs.values()))[0].cfg.data
    real = reference_images(spec, 360)
    per_seed = []
    solver_of = {k: (solvers or {}).get(k) or None for k in runs}
    num_classes = max(r.num_classes for r, _ in runs.values())
    for s in seeds:
        samplers = {k: (lambda m, b, sd, cond=None, run=r, sol=solver_of[k]:
                        run.sample(m, b, seed=sd, solver=sol, cond=cond))
                    for k, (r, _) in runs.items()}
        sweep, _ = image_sweep(samplers, {k: v for k, (_, v) in runs.items()}, real.reference, real.floor,
                               seed=s, feature_extractor=real.feature_extractor, cache_dir=cache,
                               reference_name=f"{real.name}-n{real.reference.shape[0]}", labels=labels,
                               num_classes=num_classes)
        per_seed.append({(r["model"], r["nfe"]): r for r in sweep})
    rows = []
    for key in per_seed[0]:
        rs = [p[key] for p in per_seed]
        rows.append(summarise("digits", key[0], key[1], "fid", [r["fid"] for r in rs],
                              [r["fid_floor"] for r in rs],
                              kid=statistics.fmean(r["kid_mean"] for r in rs),
                              kid_floor=statistics.fmean(r["kid_floor"] for r in rs), n=rs[0]["n"]))
    return rows


def guide_teacher(run: Any, scale: float) -> None:
    """Sample the loaded teacher ``run`` with classifier-free guidance ``w = scale``,
    ``v_∅ + w·(v_c − v_∅)`` (a job's ``guidance.scale``; ``core.guidance``), in place of its saved
    guidance; a ConfigError for an unconditional teacher or a method that samples unguided."""
    from flowdistill.core.guidance import GuidanceSpec
    from flowdistill.data.registry import sample_shape_of
    from flowdistill.errors import ConfigError
    from flowdistill.models.teachers import guidance_for

    if not run.distiller.guided_sampling:
        raise ConfigError(f"--teacher-guidance: the teacher's method {run.distiller.name!r} samples unguided")
    spec = GuidanceSpec(scale=float(scale))
    run.distiller.sample_guidance = guidance_for(spec, run.student, "teacher", sample_shape_of(run.cfg.data))


def add_ratios(rows: list[dict[str, Any]], teacher_label: str, problem_best: bool,
               ref_row: tuple[str, int] | None = None) -> None:
    """``ratio`` = value / the teacher's value at ``MANY_NFE`` (``problem_best``: its best value;
    ``ref_row = (label, nfe)``: that row's value); straightness rows over the teacher's straightness."""
    for metric in {r["metric"] for r in rows}:
        mine = [r for r in rows if r["metric"] == metric]
        ref_rows = [r for r in mine if r["model"] == teacher_label]
        pinned = [r["value"] for r in mine if ref_row and (r["model"], r["nfe"]) == ref_row]
        if not ref_rows and not pinned:
            continue
        if pinned and metric != "straightness":
            ref = pinned[0]
        elif problem_best or metric == "straightness":
            ref = min(r["value"] for r in ref_rows)
        else:
            ref = next((r["value"] for r in ref_rows if r["nfe"] == MANY_NFE), float("nan"))
        for r in mine:
            ok = ref and math.isfinite(ref) and math.isfinite(r["value"])
            r["ratio"] = r["value"] / ref if ok else float("nan")
