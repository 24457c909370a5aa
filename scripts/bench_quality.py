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

Where runs come from, their schedules and training: ``bench_quality_runs.py``; the evaluation rows
and ratios: ``bench_quality_rows.py`` (siblings in ``scripts/``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality_rows import MANY_NFE, add_ratios, digits_rows, guide_teacher, toy_rows  # noqa: E402
from bench_quality_runs import REPO, TOY_PROBLEMS, find_source, log, run_row, teacher_for  # noqa: E402

DIGITS_REF = ("teacher (Heun)", MANY_NFE)  # digits ratios: the teacher at Heun 64 steps (issue 13)
COLUMNS = ["problem", "model", "nfe", "metric", "value", "std", "floor", "ratio", "seeds"]


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
