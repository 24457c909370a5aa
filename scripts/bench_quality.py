"""Quality benchmark: every method's declared rows against its teacher, per problem.

The methods and their rows come from the distiller registry, not from this file: each registered
distiller with :attr:`~flowdistill.distillers.base.Distiller.bench_rows` (a label, config overrides
for an ablation, NFEs) is trained on each problem and evaluated at its rows' NFEs, beside the
teacher at the same NFEs and at 128 steps. A method added by a ``--plugin`` module is benchmarked
the same way (``--methods NAME --config NAME=PATH``).

Where a method's run comes from (first that exists):

1. ``--config METHOD=PATH`` — a job config, or a recipe (a file with ``stages``);
2. the row's declared ``source``: ``configs/<method>_<problem>.yaml`` (a job), or a recipe
   ``configs/recipes/NAME_<problem>.yaml`` whose first stage of the method is the run (reflow and
   InstaFlow declare ``recipes/reflow``);
3. the same for ``checkerboard`` with ``data.name`` set to the problem.

The teacher of a toy problem is the shipped ``assets/<problem>_teacher`` (else one trained with
``configs/teacher_<problem>.yaml``); digits use ``assets/digits_teacher``. A row's overrides apply
to the job (or to the method's stage of a recipe; an ablation of a coupling-trained stage shares
the base run's coupling store). Runs live under ``RUNS/<problem>/`` and are reused when finished
with the same config; a changed config is trained again.

Metric protocol (DESIGN §7): toys — sliced W2 at ``n`` = 4000 against fresh target samples, with
the data-vs-data floor, mean ± std over ``--seeds`` evaluation seeds (default 5); digits — FID with
digits-classifier features at n = 360 against the test split with its floor, mean ± std over the
seeds, and KID. ``ratio`` = mean value / the teacher's mean at 128 Euler steps (digits: the
teacher at Heun 64 steps, NFE 128, the row ``teacher (Heun)``). Straightness rows (Euler path at
128 steps; 0 = straight) for the teacher and every velocity-field student on toys.

    OMP_NUM_THREADS=1 python scripts/bench_quality.py                          # all methods, 3 toys
    OMP_NUM_THREADS=1 python scripts/bench_quality.py --methods freeflow --problems checkerboard
    OMP_NUM_THREADS=1 python scripts/bench_quality.py --steps-scale 0.05 --runs runs/smoke
    OMP_NUM_THREADS=1 python scripts/bench_quality.py --digits --problems ""   # digits only
    python scripts/bench_quality.py --plugin ./my_method.py --methods mine --config mine=my.yaml
    # only some rows (a regex on the row labels), plus a saved run evaluated beside them:
    OMP_NUM_THREADS=1 python scripts/bench_quality.py --methods lcm,pcm,tscd --rows "LCM|PCM .k=4" \
        --extra "TSCD progressive k=4 stage=runs/bench/checkerboard/tscd_progressive_checkerboard/k4@4"
    # class-conditional digits: balanced labels (i mod 10) for every model, the teacher with CFG 1.5
    OMP_NUM_THREADS=1 python scripts/bench_quality.py --methods pcm --rows "^$" --digits --problems "" \
        --labels balanced --teacher-guidance 1.5 --extra "TSCD CFG 1.5=runs/tscd_digits_cfg@4"

Labels on digits (``--labels``): by default every model samples with the null label (the
unconditional protocol of the shipped teacher's FID 0.785); ``balanced`` gives sample ``i`` class
``i mod 10`` and compares with the same test split (``flowdistill.eval.image_eval.class_labels``).
``--teacher-guidance W`` samples the teacher with classifier-free guidance ``w = W`` (as a job's
``guidance.scale``), to compare a student distilled from the guided teacher with its teacher.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TOY_PROBLEMS = ("checkerboard", "8gaussians", "spirals")
MANY_NFE = 128
DIGITS_REF = ("teacher (Heun)", MANY_NFE)  # digits ratios: the teacher at Heun 64 steps (issue 13)
COLUMNS = ["problem", "model", "nfe", "metric", "value", "std", "floor", "ratio", "seeds"]


def log(msg: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(f"[bench_quality] {msg}", file=sys.stderr, flush=True)


# -- where runs come from -----------------------------------------------------------------------
@dataclass
class Source:
    """A method's run on a problem: a job config (``stage`` empty) or a stage of a recipe."""

    path: Path
    overrides: list[str]
    stage: str = ""


def _is_recipe(path: Path) -> bool:
    from flowdistill.config import read_yaml_file

    return "stages" in read_yaml_file(path)


def _recipe_stage(path: Path, method: str) -> str:
    """The first stage of the recipe at ``path`` whose distiller is ``method`` ('' if none)."""
    from flowdistill.recipes import load_recipe

    for s in load_recipe(path).stages:
        if s.job is not None and s.job.distiller.name == method:
            return s.name
    return ""


def find_source(method: str, source: str, problem: str, explicit: dict[str, Path]) -> Source | None:
    """Where ``method``'s run on ``problem`` comes from (module docstring), or ``None``.

    ``source`` is the row's declared :attr:`~flowdistill.distillers.base.BenchRow.source`: ``""``
    for ``configs/<method>_<problem>.yaml``, ``"recipes/NAME"`` for ``configs/recipes/NAME_<problem>.yaml``.
    """
    if method in explicit:
        p = explicit[method]
        if _is_recipe(p):
            stage = _recipe_stage(p, method)
            return Source(p, [f"common.data.name={problem}"], stage) if stage else None
        return Source(p, [f"data.name={problem}"])
    fallback = [("checkerboard", [problem])] if problem in TOY_PROBLEMS else []  # images need their own
    for name, extra in ((problem, []), *fallback):
        if source.startswith("recipes/"):
            stem, _, named = source.split("/", 1)[1].partition(":")
            recipe = CONFIGS / "recipes" / f"{stem}_{name}.yaml"
            stage = (named or _recipe_stage(recipe, method)) if recipe.is_file() else ""
            if stage:
                return Source(recipe, [f"common.data.name={p}" for p in extra], stage)
        else:
            job = CONFIGS / f"{method}_{name}.yaml"
            if job.is_file():
                return Source(job, [f"data.name={p}" for p in extra])
    return None


def teacher_for(problem: str, runs_dir: Path, scale: float) -> Path:
    """The problem's teacher: the shipped asset, else a run trained from its teacher config."""
    asset = REPO / "assets" / f"{problem}_teacher"
    if (asset / "config.json").is_file() or (asset / "student" / "config.json").is_file():
        return asset
    cfg = CONFIGS / f"teacher_{problem}.yaml"
    over = [f"out_dir={runs_dir / problem / 'teacher'}"]
    if not cfg.is_file():
        cfg, over = CONFIGS / "teacher_checkerboard.yaml", [*over, f"data.name={problem}"]
    over = scale_job(cfg, over, scale, "flow_matching")
    return train_or_reuse(cfg, over, "flow_matching", f"{problem} teacher")


# -- schedules ----------------------------------------------------------------------------------
def _scaled(train: Any, scale: float, prefix: str) -> list[str]:
    steps = max(2, round(train.steps * scale))
    ck = max(1, round(train.ckpt_every * scale)) if train.ckpt_every > 0 else 0
    return [f"{prefix}train.steps={steps}",
            f"{prefix}train.warmup_steps={round(train.warmup_steps * scale)}",
            f"{prefix}train.log_every={max(1, round(train.log_every * scale))}",
            f"{prefix}train.ckpt_every={ck}"]


def _scaled_distiller(dist: Any, steps: int, scale: float, prefix: str) -> list[str]:
    out = []
    if getattr(dist, "correction_warmup", None) is not None:
        out.append(f"{prefix}distiller.correction_warmup={round(dist.correction_warmup * scale)}")
    if getattr(dist, "couple", None) is not None:
        out.append(f"{prefix}distiller.couple.n_pairs={max(256, round(dist.couple.n_pairs * scale))}")
    if getattr(dist, "finetune_after", 0) > 0:
        ft = min(steps - 1, max(1, round(dist.finetune_after * scale)))
        out.append(f"{prefix}distiller.finetune_after={ft}")
    return out


def scale_job(path: Path, overrides: list[str], scale: float, distiller: str) -> list[str]:
    """``overrides`` plus the job's schedule shrunk by ``scale`` (1: unchanged)."""
    from flowdistill.config import load_config

    if scale == 1.0:
        return list(overrides)
    cfg = load_config(path, overrides, default_distiller=distiller)
    return [*overrides, *_scaled(cfg.train, scale, ""),
            *_scaled_distiller(cfg.distiller, max(2, round(cfg.train.steps * scale)), scale, "")]


def scale_recipe(path: Path, overrides: list[str], scale: float) -> list[str]:
    """``overrides`` plus every stage's schedule and coupling count shrunk by ``scale``."""
    from flowdistill.recipes import load_recipe

    if scale == 1.0:
        return list(overrides)
    out = list(overrides)
    for s in load_recipe(path, overrides).stages:
        if s.job is not None:
            pre = f"stages.{s.name}."
            out += [*_scaled(s.job.train, scale, pre),
                    *_scaled_distiller(s.job.distiller, max(2, round(s.job.train.steps * scale)), scale, pre)]
    return out


# -- training -----------------------------------------------------------------------------------
def train_or_reuse(path: Path, overrides: list[str], distiller: str, label: str) -> Path:
    """Train the job ``path`` + ``overrides`` unless its run dir holds the same finished run."""
    from flowdistill.api import train
    from flowdistill.config import load_config
    from flowdistill.errors import ConfigError
    from flowdistill.recipes.runner import is_finished

    cfg = load_config(path, overrides, default_distiller=distiller)
    try:
        if is_finished(cfg):
            log(f"{label}: reusing {cfg.out_dir}")
            return Path(cfg.out_dir)
    except ConfigError:
        log(f"{label}: {cfg.out_dir} holds a run with another config; training it again")
    t0 = time.perf_counter()
    log(f"{label}: training {cfg.train.steps} steps in {cfg.out_dir}")
    train(cfg, overwrite=True)
    log(f"{label}: done in {time.perf_counter() - t0:.0f} s")
    return Path(cfg.out_dir)


def slug(text: str) -> str:
    """A directory-safe name for a row label."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "row"


def run_row(method: str, overrides: tuple[str, ...], src: Source, problem: str, teacher: Path,
            runs_dir: Path, scale: float) -> Path:
    """Train (or reuse) ``method``'s run for one row (its ``overrides`` on top of the source)."""
    from flowdistill.recipes import load_recipe, run_recipe

    name = method if not overrides else f"{method}-{slug('-'.join(overrides))}"
    if not src.stage:
        over = [*src.overrides, f"out_dir={runs_dir / problem / name}", f"teacher={teacher}",
                f"distiller.name={method}", *overrides]
        return train_or_reuse(src.path, scale_job(src.path, over, scale, method), method, f"{problem} {name}")
    base = runs_dir / problem / src.path.stem
    over = [*src.overrides, f"out_dir={base if not overrides else runs_dir / problem / name}"]
    if "teacher" in _recipe_vars(src.path):
        over.append(f"vars.teacher={teacher}")
    over += [f"stages.{src.stage}.{o}" for o in overrides]
    if overrides:  # an ablation shares the base run's coupling store (same generation settings)
        stage = load_recipe(src.path, over).stage(src.stage)
        if getattr(stage.job.distiller, "couplings", None):
            over.append(f"stages.{src.stage}.distiller.couplings={base / src.stage / 'couplings'}")
    over = scale_recipe(src.path, over, scale)
    names = [s.name for s in load_recipe(src.path, over).stages]
    t0 = time.perf_counter()
    log(f"{problem} {name}: recipe {src.path.name} up to stage {src.stage} (finished stages are skipped)")
    runs = run_recipe(src.path, over, report=False, only=names[: names.index(src.stage) + 1])
    log(f"{problem} {name}: done in {time.perf_counter() - t0:.0f} s")
    return runs[src.stage]


def _recipe_vars(path: Path) -> dict[str, Any]:
    from flowdistill.config import read_yaml_file

    return dict(read_yaml_file(path).get("vars") or {})


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


def bench_problem(problem: str, methods: list[str], explicit: dict[str, Path], runs_dir: Path, scale: float,
                  n: int, seeds: list[int], teachers: dict[str, Path] | None = None, rows_re: str = "",
                  extra: dict[str, tuple[Path, list[int]]] | None = None,
                  teacher_nfe: list[int] | None = None, labels: str | None = None,
                  teacher_guidance: float = 1.0, heun_ref_only: bool = False) -> list[dict[str, Any]]:
    """Train (or reuse) every method's rows on ``problem`` and evaluate them beside the teacher
    (``teachers[problem]`` when given, else the shipped one). ``rows_re``: only the rows whose label
    it matches (``re.search``); ``extra``: saved runs evaluated beside them, ``label → (dir, nfes)``;
    ``teacher_nfe``: the teacher's NFEs (default: the students' and ``MANY_NFE``; digits add Heun
    ``MANY_NFE // 2`` steps when ``MANY_NFE`` is among them); ``labels`` (digits): ``None`` or
    ``"balanced"``; ``teacher_guidance``: the teacher sampled with that CFG scale (1 = as saved);
    ``heun_ref_only`` (digits): the teacher only at Heun 64 steps, the ratios' reference."""
    from flowdistill.api import load_run
    from flowdistill.distillers import DISTILLERS

    if teachers and problem in teachers:
        teacher = teachers[problem]
    elif problem == "digits":
        teacher = REPO / "assets" / "digits_teacher"
    else:
        teacher = teacher_for(problem, runs_dir, scale)
    fm = DISTILLERS.get("flow_matching")
    teacher_label = fm.bench_rows[0].label if fm.bench_rows else "teacher"
    runs: dict[str, tuple[Any, list[int]]] = {}
    student_nfes: set[int] = set()
    for method in methods:
        cls = DISTILLERS.get(method)
        for row in cls.bench_rows:
            if rows_re and not re.search(rows_re, row.label):
                continue
            src = find_source(method, row.source, problem, explicit)
            if src is None:
                log(f"{problem}: no config for {method} ({row.label}); skipped (give --config {method}=PATH)")
                continue
            run_dir = run_row(method, row.overrides, src, problem, teacher, runs_dir, scale)
            runs[row.label] = (load_run(run_dir), list(row.nfes(cls)))
            student_nfes |= set(row.nfes(cls))
    for label, (path, nfes) in (extra or {}).items():
        runs[label] = (load_run(path), nfes)
        student_nfes |= set(nfes)
    teacher_nfes = sorted(teacher_nfe or student_nfes | {MANY_NFE} | set(fm.eval_nfe))
    teacher_run = load_run(teacher)
    if teacher_guidance != 1.0:
        guide_teacher(teacher_run, teacher_guidance)
    runs = {teacher_label: (teacher_run, teacher_nfes), **runs}
    if problem == "digits" and heun_ref_only:
        runs = {k: v for k, v in runs.items() if k != teacher_label}
        teacher_nfes = [MANY_NFE]
    if problem == "digits" and MANY_NFE in teacher_nfes:
        runs = {**runs, DIGITS_REF[0]: (teacher_run, [DIGITS_REF[1]])}
    log(f"{problem}: evaluating {len(runs)} models over {len(seeds)} seeds")
    if problem == "digits":
        rows = digits_rows(runs, seeds, runs_dir / "digits" / "fid_cache", {DIGITS_REF[0]: "heun"}, labels)
    else:
        rows = toy_rows(problem, runs, n, seeds)
    add_ratios(rows, teacher_label, problem_best=problem == "digits",
               ref_row=DIGITS_REF if problem == "digits" else None)
    return rows


# -- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description="Quality benchmark: every method's declared rows against "
                                             "its teacher, per problem.")
    ap.add_argument("--runs", default="runs/bench", help="folder of the runs and the table")
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply every training schedule by this (e.g. 0.05 for a smoke run)")
    ap.add_argument("--problems", default=",".join(TOY_PROBLEMS),
                    help="comma-separated toy problems ('' for none)")
    ap.add_argument("--digits", action="store_true", help="also benchmark the 8x8 digits (FID)")
    ap.add_argument("--methods", default="",
                    help="comma-separated distillers (default: every one with bench_rows)")
    ap.add_argument("--config", action="append", default=[], metavar="METHOD=PATH",
                    help="the job config or recipe a method's runs come from (repeatable)")
    ap.add_argument("--teacher", action="append", default=[], metavar="PROBLEM=PATH",
                    help="the teacher of a problem (a run or model directory; default: the shipped one)")
    ap.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                    help="import MODULE (name or .py path) first, as the CLI's --plugin")
    ap.add_argument("--rows", default="",
                    help="only the rows whose label matches this regular expression (default: all)")
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=RUN_DIR@NFE[,NFE]",
                    help="a saved run evaluated beside the rows (repeatable; on every problem given)")
    ap.add_argument("--teacher-nfe", default="",
                    help="the teacher's NFEs, comma-separated (default: the students' and 128; on digits "
                         "128 also adds Heun 64 steps)")
    ap.add_argument("--labels", default="", choices=["", "balanced"],
                    help="digits: the class labels every model samples with ('' = the null label; "
                         "balanced = i mod 10, the class-conditional protocol)")
    ap.add_argument("--teacher-guidance", type=float, default=1.0,
                    help="sample the teacher with classifier-free guidance of this scale (1 = as saved)")
    ap.add_argument("--heun-ref-only", action="store_true",
                    help="digits: evaluate the teacher only at Heun 64 steps (the ratios' reference)")
    ap.add_argument("--n", type=int, default=4000, help="samples per toy evaluation")
    ap.add_argument("--seeds", type=int, default=5, help="evaluation seeds (DESIGN §7: >= 5 for toys)")
    ap.add_argument("--seed", type=int, default=1234, help="first evaluation seed")
    args = ap.parse_args(argv)
    from flowdistill.data.toy2d import TOY_DATASETS
    from flowdistill.distillers import DISTILLERS
    from flowdistill.plugins import load_plugins

    load_plugins(args.plugin)
    args.problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    bad = [p for p in args.problems if p not in TOY_DATASETS.names()]
    if bad:
        ap.error(f"unknown problem {bad[0]!r}; available: {', '.join(TOY_DATASETS.names())}")
    declared = [m for m in DISTILLERS.names() if m != "flow_matching" and DISTILLERS.get(m).bench_rows]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()] or declared
    for m in args.methods:
        DISTILLERS.get(m)  # an unknown name lists the registered ones
    args.config = dict(_pair(c, ap) for c in args.config)
    args.teacher = dict(_pair(c, ap) for c in args.teacher)
    args.extra = dict(_extra(e, ap) for e in args.extra)
    try:
        args.teacher_nfe = [int(v) for v in args.teacher_nfe.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--teacher-nfe takes comma-separated integers, got {args.teacher_nfe!r}")
    try:
        re.compile(args.rows)
    except re.error as e:
        ap.error(f"--rows is not a regular expression: {e}")
    if not args.steps_scale > 0 or args.n < 2 or args.seeds < 1:
        ap.error("--steps-scale must be positive, --n >= 2, --seeds >= 1")
    if not args.teacher_guidance >= 0:
        ap.error(f"--teacher-guidance must be >= 0, got {args.teacher_guidance}")
    args.labels = args.labels or None
    if not args.problems and not args.digits:
        ap.error("nothing to do: give --problems and/or --digits")
    return args


def _pair(spec: str, ap: argparse.ArgumentParser) -> tuple[str, Path]:
    if "=" not in spec:
        ap.error(f"--config/--teacher take NAME=PATH, got {spec!r}")
    method, path = spec.split("=", 1)
    return method, Path(path)


def _extra(spec: str, ap: argparse.ArgumentParser) -> tuple[str, tuple[Path, list[int]]]:
    label, _, rest = spec.rpartition("=")
    path, _, nfes = rest.rpartition("@")
    try:
        counts = [int(v) for v in nfes.split(",")]
    except ValueError:
        counts = []
    if not label or not path or not counts or min(counts) < 1:
        ap.error(f"--extra takes LABEL=RUN_DIR@NFE[,NFE], got {spec!r}")
    return label, (Path(path), counts)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table and write ``quality.md``/``.json``, the per-NFE summary
    ``quality_by_nfe.md`` and one metric-vs-NFE plot per problem."""
    from flowdistill.core.registry import UnknownNameError
    from flowdistill.errors import FlowDistillError
    from flowdistill.eval.sweep import by_nfe_table, plot_by_problem
    from flowdistill.eval.toy_metrics import markdown_table

    try:
        args = parse_args(argv)
        runs_dir = Path(args.runs)
        runs_dir.mkdir(parents=True, exist_ok=True)
        seeds = [args.seed + i for i in range(args.seeds)]
        t0 = time.perf_counter()
        rows: list[dict[str, Any]] = []
        for problem in [*args.problems, *(["digits"] if args.digits else [])]:
            rows += bench_problem(problem, args.methods, args.config, runs_dir, args.steps_scale, args.n,
                                  seeds, args.teacher, args.rows, args.extra, args.teacher_nfe, args.labels,
                                  args.teacher_guidance, args.heun_ref_only)
    except (FlowDistillError, UnknownNameError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md = markdown_table(rows, COLUMNS)
    (runs_dir / "quality.md").write_text(md + "\n")
    (runs_dir / "quality.json").write_text(json.dumps(
        {"steps_scale": args.steps_scale, "n": args.n, "seeds": seeds, "rows": rows}, indent=2))
    (runs_dir / "quality_by_nfe.md").write_text(by_nfe_table(rows) + "\n")
    plot_by_problem(rows, runs_dir, "quality")
    print(md)
    log(f"steps scale {args.steps_scale:g}; toys: sliced W2, n={args.n}; digits: FID (digits features, "
        f"n=360); {len(seeds)} seeds; ratio = mean / teacher@{MANY_NFE} "
        f"(digits: teacher Heun {MANY_NFE // 2} steps)")
    log(f"done in {time.perf_counter() - t0:.0f} s; wrote {runs_dir / 'quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
