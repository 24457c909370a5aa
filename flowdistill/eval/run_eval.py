"""Evaluate a trained run at several NFE: toy distances or image FID, tables and plots.

Settings not given come from the run's own ``eval:`` section (:class:`~flowdistill.config.EvalSpec`:
``nfe``, ``n_samples``, ``solver``, ``seed``). An NFE the solver cannot spend exactly (Heun or
midpoint at an odd count, RK4 at one not a multiple of 4) is skipped with a note under the table;
only a sweep where every NFE is skipped is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowdistill.errors import ConfigError
from flowdistill.eval.sweep import toy_sweep, write_table

TOY_COLUMNS = ["model", "nfe", "sw2", "sw2_floor", "energy", "energy_floor", "n"]


def class_labels_for(run: Any, labels: Sequence[int] | None, n: int) -> torch.Tensor | None:
    """Class labels ``[n]`` for ``n`` samples of ``run``: ``labels`` repeated in turn (``None``: no
    labels, an unconditional sample). A run without classes given labels, or a label outside
    ``[0, num_classes)``, is a :class:`~flowdistill.errors.ConfigError`."""
    if labels is None:
        return None
    labels = [int(v) for v in labels]
    k = int(getattr(run, "num_classes", 0) or 0)
    if not labels:
        raise ConfigError("class labels: none given")
    if k <= 0:
        raise ConfigError(f"{run.run_dir} is unconditional (its model has num_classes=0); it takes no "
                          f"class labels (--class / --labels)")
    bad = [v for v in labels if not 0 <= v < k]
    if bad:
        raise ConfigError(f"class label {bad[0]} is out of range: {run.run_dir} has {k} classes "
                          f"(labels 0..{k - 1})")
    return torch.tensor(labels, dtype=torch.long)[torch.arange(n) % len(labels)]


@dataclass
class EvalPlan:
    """The resolved settings of one eval: what is sampled, and the notes printed under the table."""

    nfes: list[int]
    n: int
    seed: int
    solver: str | None  # passed to the sampler; None = the method's own default
    solver_label: str  # the solver the samples are drawn with ("" when the method has none)
    skipped: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _method_default_solver(run: Any) -> str | None:
    """The solver a method samples with when none is given (``None`` when it takes none)."""
    if "solver" not in getattr(run.distiller, "sample_options", {}):
        return None
    return getattr(run.cfg.distiller, "sample_solver", None) or "euler"


def plan_eval(run: Any, nfes: Sequence[int] | None = None, n: int | None = None, seed: int | None = None,
              solver: str | None = None) -> EvalPlan:
    """Resolve an eval's settings: each one given wins, the rest come from ``run.cfg.eval``.

    The eval section's ``solver`` applies to methods whose sampler takes a solver (flow matching,
    reflow, InstaFlow); an explicit ``solver`` for one that takes none is a ConfigError. NFEs the
    solver cannot spend exactly are moved to :attr:`EvalPlan.skipped` with the reason; if none is
    left, a ConfigError says why.
    """
    from flowdistill.core.solvers import SOLVERS, steps_for_nfe

    spec = run.cfg.eval
    nfes = [int(v) for v in (nfes if nfes is not None else spec.nfe)]
    n = int(n if n is not None else spec.n_samples)
    seed = int(seed if seed is not None else spec.seed)
    if not nfes or any(v <= 0 for v in nfes) or n <= 0:
        raise ConfigError(f"eval needs positive NFEs and sample count, got nfe={nfes}, n={n}")
    notes = []
    default = _method_default_solver(run)
    if solver is not None:
        run.distiller.check_sample_options({"solver": solver})  # a method without solvers: one line
        effective = solver
    elif default is None:
        effective = None  # the method has its own sampler (e.g. FreeFlow's jumps)
    else:
        effective = spec.solver
        solver = None if spec.solver == default else spec.solver
    skipped: dict[int, str] = {}
    if effective is not None and effective in SOLVERS.names() and effective != "dopri5":
        for v in nfes:
            try:
                steps_for_nfe(effective, v)
            except ValueError as e:
                skipped[v] = str(e)
    kept = [v for v in nfes if v not in skipped]
    for v, why in skipped.items():
        notes.append(f"NFE {v} skipped: {why}")
    if not kept:
        raise ConfigError(f"no NFE of {nfes} can be used with solver {effective!r}: {skipped[nfes[0]]}")
    return EvalPlan(kept, n, seed, solver, effective or "", skipped, notes)


class _Labelled:
    """A run whose ``sample`` adds fixed class labels (for evaluators that call ``run.sample``)."""

    def __init__(self, run: Any, labels: Sequence[int]):
        """Wrap ``run``; every ``sample(n, ...)`` gets :func:`class_labels_for` ``(run, labels, n)``."""
        self._run, self._labels = run, list(labels)

    def __getattr__(self, name: str) -> Any:
        """Everything else is the wrapped run's."""
        return getattr(self._run, name)

    def sample(self, n: int, nfe: int, seed: int = 0, **kw: Any) -> torch.Tensor:
        """The wrapped run's samples, conditioned on the labels (a caller's ``cond=None`` — the
        image sweep's null label — gives way to them; any other ``cond`` is a conflict)."""
        if kw.get("cond", None) is not None:
            raise ValueError("a labelled run's sample() takes no cond: its labels are fixed")
        kw.pop("cond", None)
        return self._run.sample(n, nfe, seed=seed, cond=class_labels_for(self._run, self._labels, n), **kw)


def evaluate_run(run: Any, nfes: Sequence[int] | None, n: int | None, out_dir: Path, seed: int | None = None,
                 solver: str | None = None, *, labels: Sequence[int] | None = None,
                 inception_weights: str | Path | None = None, cache_dir: Path | None = None) -> str:
    """NFE sweep of a :class:`~flowdistill.api.LoadedRun`; writes ``sweep.md/json`` and PNGs.

    The dataset comes from the registry by the run's own ``data`` spec: toy datasets get distances
    to their exact sampler, image datasets FID/KID against their reference images (features by the
    dataset's extractor; ``inception_weights`` is the local Inception weights file for those scored
    with Inception features). ``nfes``, ``n``, ``seed`` and ``solver`` default to the run's
    ``eval:`` section (see :func:`plan_eval`); ``labels`` are class labels the samples are drawn
    with, in turn. Returns the markdown table followed by the notes (skipped NFEs, settings
    ignored), which are also written under the table in ``sweep*.md``.
    """
    from flowdistill.data.registry import build_dataset, dataset_entry, feature_extractor_of
    from flowdistill.eval.plots import metric_vs_nfe, scatter_grid

    entry = dataset_entry(run.cfg.data.name)  # the run's own dataset; unknown -> UnknownNameError
    plan = plan_eval(run, nfes, n, seed, solver)
    if labels is not None:
        class_labels_for(run, labels, 1)  # checked before anything is sampled
        run = _Labelled(run, labels)
        plan.notes.append(f"class labels {list(labels)} (in turn over the samples)")
    extractor = feature_extractor_of(run.cfg.data) if entry.kind == "image" else None
    if extractor == "inception":
        from flowdistill.eval.inception import inception_weights_path

        inception_weights = inception_weights_path(inception_weights)  # missing file: before sampling
    elif inception_weights is not None:
        what = f"{extractor} features" if extractor else "toy distances, no feature network"
        plan.notes.append(f"--inception-weights not used: dataset {entry.name!r} is scored with {what}")
    label = run.cfg.distiller.name
    if entry.kind == "toy":
        ds = build_dataset(run.cfg.data).dataset  # the exact sampler behind the SamplerSource
        rows, samples = toy_sweep({label: lambda k, nfe, s: run.sample(k, nfe, seed=s, solver=plan.solver)},
                                  {label: plan.nfes}, ds, plan.n, plan.seed)
        md = write_table(rows, TOY_COLUMNS, out_dir)
        data, _ = ds.sample(plan.n, torch.Generator().manual_seed(plan.seed + 7))
        scatter_grid({"data": data, **{f"NFE {k}": v for k, v in samples[label].items()}},
                     out_dir / "samples.png")
        metric_vs_nfe({label: {r["nfe"]: r["sw2"] for r in rows}}, out_dir / "sw2_vs_nfe.png",
                      ylabel="sliced W2", floor=rows[0]["sw2_floor"])
        stem = "sweep"
    else:
        from flowdistill.eval.image_eval import evaluate_image_run

        fid_kw = {"inception_weights": inception_weights} if extractor == "inception" else {}
        md = evaluate_image_run(run, plan.nfes, plan.n, out_dir, seed=plan.seed, solver=plan.solver,
                                cache_dir=cache_dir, **fid_kw)
        stem = f"sweep_{plan.solver}" if plan.solver else "sweep"
    if plan.solver_label:
        plan.notes.insert(0, f"solver {plan.solver_label}")
    if plan.notes:
        md = md + "\n\n" + "\n".join(f"- {note}" for note in plan.notes)
        (out_dir / f"{stem}.md").write_text(md + "\n")
    return md
