"""Jobs over couplings: ``flowdistill couple`` and the one-config reflow → InstaFlow chain.

:func:`couple_job` generates the couplings a reflow/InstaFlow job config asks for
(``cfg.distiller.couple`` settings, from ``cfg.teacher`` into ``cfg.distiller.couplings``).

:func:`run_pipeline` runs the whole recipe of METHODS.md §2 from one YAML file::

    couple(teacher) → reflow (2-rectified flow) → couple(2-RF) → instaflow (1- or k-step student)

    python -m flowdistill.couplings.pipeline configs/reflow_checkerboard.yaml \\
        teacher=runs/teacher_checkerboard out_dir=runs/reflow_checkerboard [reflow.train.steps=...]

A pipeline file has the top-level keys of a job (``out_dir``, ``teacher``, ``model``, ``data``,
``eval``) and one section per stage, ``reflow`` and ``instaflow``, each holding a job's ``train``
and ``distiller`` sections. Each stage becomes a plain job config written to
``OUT_DIR/<stage>.yaml`` — the same file ``flowdistill couple`` and ``flowdistill distill`` take,
so any stage can be rerun by hand — with its run in ``OUT_DIR/2rf`` resp. ``OUT_DIR/instaflow``
and its couplings inside that run (``…/couplings``). Every step resumes: a complete coupling
store is re-verified and kept, a partial one is finished, a finished run is skipped and an
interrupted one continues from its newest checkpoint. The driver ends with a table
(``OUT_DIR/report.md`` and ``report.json``) of straightness beside sliced W2 and energy distance
(toy targets) or FID with digits-classifier features (digits, n = 360; Inception for image
folders), and ``OUT_DIR/timings.json`` keeps the wall time of every coupling and training step
that ran. The teacher may be a run directory, its ``student/``, or a shipped model directory such
as ``assets/digits_teacher`` (config: ``configs/reflow_digits.yaml``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from accelerate import PartialState
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowdistill.api import LoadedRun, load_run, sample_shape_of, train
from flowdistill.config import DataSpec, JobConfig, load_config
from flowdistill.core.registry import UnknownNameError
from flowdistill.couplings.generation import generate_couplings
from flowdistill.data.couplings import MANIFEST, read_manifest
from flowdistill.errors import ConfigError, FlowDistillError
from flowdistill.runs import atomic_write_text, holds_run, read_meta

STAGES = {"reflow": ("reflow", "2rf"), "instaflow": ("instaflow", "instaflow")}  # section: (distiller, dir)
_TOP = ("out_dir", "teacher", "model", "data", "eval", *STAGES)


def couple_job(cfg: JobConfig, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Generate the couplings of a reflow/InstaFlow job: ``cfg.teacher`` (guided as ``cfg.guidance``
    says) → ``cfg.distiller.couplings``."""
    spec, root = getattr(cfg.distiller, "couple", None), getattr(cfg.distiller, "couplings", None)
    if spec is None or not root:
        raise ConfigError(f"distiller {cfg.distiller.name!r} does not train on couplings; "
                          f"`flowdistill couple` needs distiller.name=reflow or instaflow")
    if not cfg.teacher:
        raise ConfigError("`flowdistill couple` needs teacher=PATH (a run directory or its student/)")
    return generate_couplings(cfg.teacher, root, spec, sample_shape_of(cfg.data), cfg.data.conditional,
                              resume=resume, overwrite=overwrite, progress=progress, guidance=cfg.guidance)


# -- the chain ---------------------------------------------------------------------------------
def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """The pipeline YAML merged with ``key=value`` overrides (top-level keys checked)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    try:
        raw = OmegaConf.merge(OmegaConf.load(p), OmegaConf.from_dotlist(list(overrides or [])))
    except OmegaConfBaseException as e:
        raise ConfigError(f"pipeline config: {str(e).splitlines()[0]}") from None
    for key in raw:
        if key not in _TOP:
            raise ConfigError(f"pipeline config key '{key}' is unknown; allowed: {', '.join(_TOP)}")
    for key in ("out_dir", "teacher", *STAGES):
        if OmegaConf.select(raw, key) in (None, ""):
            raise ConfigError(f"pipeline config key '{key}' is missing")
    return raw


def stage_config(pipe: DictConfig, stage: str, teacher: str, sub: str | None = None,
                 distiller_overrides: dict[str, Any] | None = None) -> JobConfig:
    """The job config of ``stage`` (written to ``OUT_DIR/<sub>.yaml`` and loaded from there).

    ``sub`` (default: the stage's own directory name) names the run directory ``OUT_DIR/<sub>``;
    ``distiller_overrides`` (dotted keys) change the stage's distiller section (ablations).
    """
    dist_name, default_sub = STAGES[stage]
    sub = sub or default_sub
    root = Path(str(pipe.out_dir))
    sec = pipe[stage]
    for key in sec:
        if key not in ("train", "distiller"):
            raise ConfigError(f"pipeline config key '{stage}.{key}' is unknown; allowed: train, distiller")
    job: dict[str, Any] = {"out_dir": str(root / sub), "teacher": teacher}
    for key in ("model", "data", "eval"):
        if key in pipe:
            job[key] = OmegaConf.to_container(pipe[key], resolve=True)
    job["train"] = OmegaConf.to_container(sec.get("train", {}), resolve=True)
    dist = OmegaConf.create(OmegaConf.to_container(sec.get("distiller", {}), resolve=True))
    for key, value in (distiller_overrides or {}).items():
        OmegaConf.update(dist, key, value, force_add=True)
    dist = OmegaConf.to_container(dist)
    if dist.setdefault("name", dist_name) != dist_name:
        raise ConfigError(f"pipeline config key '{stage}.distiller.name' must be {dist_name!r}")
    job["distiller"] = dist
    f = root / (f"{stage}.yaml" if sub == default_sub else f"{sub}.yaml")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(f, OmegaConf.to_yaml(OmegaConf.create(job)))
    try:
        return load_config(f)
    except (ConfigError, UnknownNameError) as e:
        raise ConfigError(f"pipeline stage '{stage}' ({f}): {e}") from None


def _record_time(timings: Path | None, key: str, seconds: float) -> None:
    """Add ``key: seconds`` to the JSON file ``timings`` (nothing when ``timings`` is None)."""
    if timings is None:
        return
    d = json.loads(timings.read_text()) if timings.is_file() else {}
    d[key] = round(seconds, 1)
    atomic_write_text(timings, json.dumps(d, indent=2) + "\n")


def run_stage(cfg: JobConfig, progress: bool = True, timings: Path | None = None) -> Path:
    """Couple (resuming a store that exists) and train (skipping a finished run, resuming a partial).

    With ``timings`` (a JSON file) the wall seconds of the coupling and training steps that did
    work are recorded under ``<run dir name>/couple`` and ``<run dir name>/train``.
    """
    store = Path(cfg.distiller.couplings)
    run_dir = Path(cfg.out_dir)
    exists = (store / MANIFEST).is_file()
    complete = exists and bool(read_manifest(store).get("complete")) \
        and read_manifest(store).get("n_pairs") == cfg.distiller.couple.n_pairs
    t0 = time.perf_counter()
    couple_job(cfg, resume=exists, progress=progress)
    main = PartialState().is_main_process
    if not complete and main:
        _record_time(timings, f"{run_dir.name}/couple", time.perf_counter() - t0)
    meta = read_meta(run_dir / "student") if (run_dir / "student").is_dir() else {}
    if meta.get("steps") == cfg.train.steps and meta.get("distiller") == cfg.distiller.name:
        return run_dir
    t0 = time.perf_counter()
    out = train(cfg, resume=holds_run(run_dir))
    if main:
        _record_time(timings, f"{run_dir.name}/train", time.perf_counter() - t0)
    return out


def run_pipeline(path: str | Path, overrides: list[str] | None = None,
                 report: bool = True) -> dict[str, Path]:
    """teacher → couplings → 2-RF → couplings → InstaFlow student; returns the run directories."""
    pipe = load_pipeline(path, overrides)
    timings = Path(str(pipe.out_dir)) / "timings.json"
    rf_cfg = stage_config(pipe, "reflow", str(pipe.teacher))
    rf_dir = run_stage(rf_cfg, timings=timings)
    st_cfg = stage_config(pipe, "instaflow", str(rf_dir))
    st_dir = run_stage(st_cfg, timings=timings)
    runs = {"teacher": Path(str(pipe.teacher)), "2rf": rf_dir, "student": st_dir}
    if report and PartialState().is_main_process:
        write_report(runs, st_cfg, Path(str(pipe.out_dir)))
    return runs


ABLATIONS = {  # rfpp's two training choices, crossed (label: distiller overrides of the reflow stage)
    "2-RF uniform+l2": {"time_sampler.name": "uniform", "loss": "l2"},
    "2-RF uniform+pseudo_huber": {"time_sampler.name": "uniform", "loss": "pseudo_huber"},
    "2-RF u_shaped+l2": {"time_sampler.name": "u_shaped", "loss": "l2"},
    "2-RF u_shaped+pseudo_huber": {"time_sampler.name": "u_shaped", "loss": "pseudo_huber"},
}


def run_ablations(path: str | Path, overrides: list[str] | None = None,
                  variants: dict[str, dict[str, Any]] | None = None) -> dict[str, Path]:
    """Extra 2-RF runs on the chain's (shared, already generated) teacher couplings, one per variant.

    Each variant's run lives in ``OUT_DIR/ablation-<i>`` with its config beside it; the coupling
    store is ``OUT_DIR/2rf/couplings`` (run :func:`run_pipeline` first, or this generates it).
    """
    pipe = load_pipeline(path, overrides)
    base = stage_config(pipe, "reflow", str(pipe.teacher))
    out = {}
    for i, (label, over) in enumerate((variants or ABLATIONS).items()):
        cfg = stage_config(pipe, "reflow", str(pipe.teacher), sub=f"ablation-{i}",
                           distiller_overrides={**over, "couplings": base.distiller.couplings})
        same = cfg.distiller == base.distiller and cfg.train == base.train
        timings = Path(str(pipe.out_dir)) / "timings.json"
        # the chain's own 2-RF is not retrained
        out[label] = run_stage(base, timings=timings) if same else run_stage(cfg, timings=timings)
    return out


def bench_rows(path: str | Path, overrides: list[str] | None = None, ablations: bool = True,
               n: int | None = None) -> list[dict[str, Any]]:
    """Everything the quality benchmark reports for reflow: runs (or resumes) the chain and the
    ablations, then returns :func:`pipeline_rows` (each with ``metric``/``value``/``floor``:
    ``sw2`` on toy targets, ``fid`` on images, and ``straightness``)."""
    runs = run_pipeline(path, overrides, report=False)
    extra = run_ablations(path, overrides) if ablations else None
    pipe = load_pipeline(path, overrides)
    st = stage_config(pipe, "instaflow", str(runs["2rf"]))
    return pipeline_rows(runs, st.distiller.steps, st.data, n=n or st.eval.n_samples,
                         seed=st.eval.seed, extra=extra, cache_dir=Path(str(pipe.out_dir)) / "fid_cache")


def load_teacher_run(path: str | Path, data: DataSpec | None = None) -> LoadedRun:
    """The chain's teacher as a :class:`~flowdistill.api.LoadedRun`, to sample and measure it.

    ``path`` is a run directory, a run's ``student/``, or a saved model directory: a shipped
    teacher with its ``train_config.yaml`` beside it (``assets/digits_teacher``), or a bare one,
    which is sampled as a flow-matching velocity field on ``data`` (Euler). The same as
    :func:`flowdistill.api.load_run`, whose error names what ``path`` lacks.
    """
    return load_run(path, data)


def pipeline_rows(runs: dict[str, Path], steps: int, dataset: str | DataSpec, n: int = 4000,
                  seed: int = 1234, extra: dict[str, Path] | None = None,
                  cache_dir: Path | None = None, many_nfe: int = 128) -> list[dict[str, Any]]:
    """Quality rows (:func:`flowdistill.eval.straightness.quality_rows`) of a finished chain.

    Teacher at 1, 2, 4 and ``many_nfe`` Euler steps, 2-RF at the same budgets, the student at its
    ``steps``; ``extra`` adds 2-RF variants (ablations) at 1, 2, 4 steps. ``dataset`` is a toy name
    (sliced W2 rows) or the data spec of an image dataset (FID rows, n = min(n, reference size);
    the teacher is also measured with Heun at ``many_nfe`` evaluations — 64 steps at the default
    128 —, its accurate reference). Straightness: at ``many_nfe`` Euler steps, the student at its
    own ``steps``. Row labels: ``teacher``, ``2-RF``, ``student (<steps>-step)``, the ``extra`` keys.
    """
    from flowdistill.eval.straightness import is_image_dataset, quality_rows

    image = is_image_dataset(dataset)
    data = dataset if not isinstance(dataset, str) else None
    student = f"student ({steps}-step)"
    loaded = {"teacher": load_teacher_run(runs["teacher"], data), "2-RF": load_run(runs["2rf"]),
              student: load_run(runs["student"])}
    few: list[Any] = [1, 2, 4, many_nfe]
    nfes: dict[str, list[Any]] = {"teacher": few + ([(many_nfe, "heun")] if image else []), "2-RF": few,
                                  student: [steps]}
    straight = {"teacher": many_nfe, "2-RF": many_nfe, student: steps}
    for name, d in (extra or {}).items():
        loaded[name], nfes[name], straight[name] = load_run(d), [1, 2, 4], many_nfe
    return quality_rows(loaded, nfes, dataset, n=n, seed=seed, straight_nfe=straight, cache_dir=cache_dir)


def write_report(runs: dict[str, Path], student_cfg: JobConfig, out_dir: Path,
                 extra: dict[str, Path] | None = None) -> list[dict[str, Any]]:
    """``OUT_DIR/report.md`` and ``report.json``: :func:`pipeline_rows` (sliced W2 on toy targets,
    FID on images) with the stage wall times of ``OUT_DIR/timings.json`` appended."""
    from flowdistill.eval.straightness import columns_for
    from flowdistill.eval.toy_metrics import markdown_table

    data = student_cfg.data
    rows = pipeline_rows(runs, student_cfg.distiller.steps, data, n=student_cfg.eval.n_samples,
                         seed=student_cfg.eval.seed, extra=extra, cache_dir=out_dir / "fid_cache")
    md = markdown_table(rows, columns_for(data))
    timings = out_dir / "timings.json"
    if timings.is_file():
        t = json.loads(timings.read_text())
        md += "\n\n" + markdown_table([{"step": k, "wall_s": v} for k, v in t.items()], ["step", "wall_s"])
    atomic_write_text(out_dir / "report.md", md + "\n")
    atomic_write_text(out_dir / "report.json", json.dumps(rows, indent=2))
    print(md)
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m flowdistill.couplings.pipeline CONFIG [key=value ...]``."""
    p = argparse.ArgumentParser(prog="python -m flowdistill.couplings.pipeline",
                                description="couple → reflow → couple → InstaFlow from one config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)
    try:
        runs = run_pipeline(args.config, args.overrides, report=not args.no_report)
    except (FlowDistillError, UnknownNameError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("runs: " + ", ".join(f"{k}={v}" for k, v in runs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
