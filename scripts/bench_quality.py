"""Quality benchmark: teacher (Euler) against FreeFlow students and their ablations, per problem.

For each toy problem (checkerboard, 8gaussians, spirals; ``--problems``) this trains a flow-matching
teacher (``flowdistill/configs/teacher_checkerboard.yaml`` with ``data.name`` overridden), distils it
with FreeFlow (``flowdistill/configs/freeflow_<problem>.yaml``, falling back to the checkerboard
config with ``data.name`` overridden) in three modes — ``both`` (the method), ``prediction`` and
``correction`` (ablations) — and measures sliced W2 (n = 4000) against fresh target samples, with
the data-vs-data floor at the same n: the teacher at NFE 1, 2, 4, 8, 128 and every student at 1, 2, 4.
``--digits`` adds the 8x8 digits (teacher ``assets/digits_teacher`` if shipped, else one trained
with ``flowdistill/configs/teacher_digits.yaml``) measured by FID with digits-classifier features
(n = 360, the test split; ``flowdistill.eval.image_eval.image_sweep``).

The table (columns problem, model, nfe, metric, value, floor, ratio) is printed and written to
``RUNS/quality.md`` and ``RUNS/quality.json``; ``ratio`` is the value over the teacher's at NFE 128
(for digits: over the teacher's best NFE). Runs live under ``RUNS/<problem>/`` and are reused when
their saved config matches the one asked for (so a rerun only evaluates); a run whose config differs
(say from a ``--steps-scale`` smoke run) is trained again in place.

``--reflow`` adds the reflow → InstaFlow chain (METHODS.md §2,
``flowdistill.couplings.pipeline.bench_rows``): for each toy problem
``flowdistill/configs/reflow_checkerboard.yaml`` with ``data.name``, the teacher (the problem's bench
teacher) and ``out_dir`` (``RUNS/<problem>/reflow``) overridden, plus its rfpp ablations (uniform vs
U-shaped time sampling × L2 vs pseudo-Huber); with ``--digits`` also
``flowdistill/configs/reflow_digits.yaml`` from the digits teacher into ``RUNS/digits/reflow`` (no
ablations: each would be another 2-RF training). Rows: ``2-RF`` and ``2-RF <ablation>`` at NFE 1, 2,
4 (and 128), ``InstaFlow (1-step)``, on digits also ``teacher (Heun)`` at 128 evaluations (64 steps),
in the same metric as the problem; and ``metric = straightness`` rows (nfe = the Euler steps of the
measured path; 0 is a straight line) for the teacher, 2-RF and student, whose ratio is over the
teacher's straightness. ``--steps-scale`` also shrinks the chain's training schedules and coupling
counts. Chain stages resume and are skipped when finished (``OUT_DIR/timings.json`` keeps their wall
times); unlike the runs above, a chain made with other settings is not replaced (its coupling stores
only grow), so give ``--steps-scale`` smoke runs their own ``--runs`` folder.

    OMP_NUM_THREADS=1 python scripts/bench_quality.py                      # full run, 3 toy problems
    OMP_NUM_THREADS=1 python scripts/bench_quality.py --steps-scale 0.05 --problems checkerboard
    OMP_NUM_THREADS=1 python scripts/bench_quality.py --digits --problems ""   # digits only
    OMP_NUM_THREADS=1 python scripts/bench_quality.py --reflow --digits        # with the reflow chain
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "flowdistill" / "configs"
TOY_PROBLEMS = ("checkerboard", "8gaussians", "spirals")
TEACHER_NFE = [1, 2, 4, 8, 128]
STUDENT_NFE = [1, 2, 4]
MODES = ("both", "prediction", "correction")
COLUMNS = ["problem", "model", "nfe", "metric", "value", "floor", "ratio"]
TEACHER_LABEL = "teacher (Euler)"


def log(msg: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(f"[bench_quality] {msg}", file=sys.stderr, flush=True)


# -- configs and runs ---------------------------------------------------------------------------
def scale_overrides(path: Path, overrides: list[str], scale: float, distiller: str) -> list[str]:
    """``overrides`` plus the schedule of ``path`` shrunk by ``scale`` (steps, warm-ups, intervals).

    ``scale == 1`` returns ``overrides`` unchanged. Steps never drop below 2, intervals below 1.
    """
    from flowdistill.config import load_config

    if scale == 1.0:
        return list(overrides)
    cfg = load_config(path, overrides, default_distiller=distiller)
    tr = cfg.train
    out = [*overrides, f"train.steps={max(2, round(tr.steps * scale))}",
           f"train.warmup_steps={round(tr.warmup_steps * scale)}",
           f"train.log_every={max(1, round(tr.log_every * scale))}",
           f"train.ckpt_every={max(1, round(tr.ckpt_every * scale)) if tr.ckpt_every > 0 else 0}"]
    warm = getattr(cfg.distiller, "correction_warmup", None)
    if warm is not None:
        out.append(f"distiller.correction_warmup={round(warm * scale)}")
    return out


def _comparable(yaml_text: str) -> dict:
    """A saved/resolved config as a dict without ``out_dir`` (which may be spelt differently)."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(OmegaConf.create(yaml_text))
    d.pop("out_dir", None)
    return d


def train_or_reuse(path: Path, overrides: list[str], distiller: str, label: str) -> Path:
    """Train the job ``path`` + ``overrides`` unless its run dir already holds the same finished run."""
    from flowdistill.api import train
    from flowdistill.config import load_config, to_yaml

    cfg = load_config(path, overrides, default_distiller=distiller)
    run_dir = Path(cfg.out_dir)
    saved = run_dir / "config.yaml"
    if saved.is_file() and (run_dir / "student" / "config.json").is_file():
        if _comparable(saved.read_text()) == _comparable(to_yaml(cfg)):
            log(f"{label}: reusing {run_dir}")
            return run_dir
        log(f"{label}: {run_dir} holds a run with another config; training it again")
    t0 = time.perf_counter()
    log(f"{label}: training {cfg.train.steps} steps in {run_dir}")
    train(cfg, overwrite=True)
    log(f"{label}: done in {time.perf_counter() - t0:.0f} s")
    return run_dir


def freeflow_config(problem: str) -> tuple[Path, list[str]]:
    """The FreeFlow config of ``problem`` and the overrides its fallback needs."""
    own = CONFIGS / f"freeflow_{problem}.yaml"
    if own.is_file():
        return own, []
    return CONFIGS / "freeflow_checkerboard.yaml", [f"data.name={problem}"]


def distil_modes(problem: str, teacher_model: Path, runs: Path, scale: float, modes: list[str],
                 extra: list[str] | None = None) -> dict[str, Path]:
    """One FreeFlow run per mode (``both`` is the method, the others are ablations)."""
    path, base = freeflow_config(problem)
    out = {}
    for mode in modes:
        over = [*base, *(extra or []), f"out_dir={runs / problem / f'freeflow_{mode}'}",
                f"teacher={teacher_model}", "distiller.name=freeflow", f"distiller.mode={mode}"]
        over = scale_overrides(path, over, scale, "freeflow")
        if mode == "correction":
            # without the prediction loss the student has no loss at all before the warm-up (and
            # FreeFlow's backward fails on the constant): correct from step 0, as the ablation means
            over.append("distiller.correction_warmup=0")
        out[mode] = train_or_reuse(path, over, "freeflow", f"{problem} freeflow mode={mode}")
    return out


def student_label(mode: str) -> str:
    """Table name of a FreeFlow student."""
    return "FreeFlow" if mode == "both" else f"FreeFlow ({mode} only)"


# -- rows ---------------------------------------------------------------------------------------
def add_ratios(rows: list[dict[str, Any]], ref: float) -> None:
    """``ratio = value / ref`` for every row (``nan`` when undefined)."""
    for r in rows:
        ok = ref and math.isfinite(ref) and math.isfinite(r["value"])
        r["ratio"] = r["value"] / ref if ok else float("nan")


def toy_rows(problem: str, runs: dict[str, Any], n: int, seed: int) -> list[dict[str, Any]]:
    """SW2 rows of the teacher (Euler, ``TEACHER_NFE``) and each student (``STUDENT_NFE``)."""
    from flowdistill.eval.toy_metrics import evaluate_samples

    rows = []
    for label, (run, nfes, solver) in runs.items():
        for nfe in nfes:
            x = run.sample(n, nfe, seed=seed, solver=solver)
            m = evaluate_samples(x, problem, seed=seed + 1)
            rows.append({"problem": problem, "model": label, "nfe": nfe, "metric": "sw2", "value": m["sw2"],
                         "floor": m["sw2_floor"], "energy": m["energy"], "energy_floor": m["energy_floor"],
                         "n": m["n"]})
    ref = next(r["value"] for r in rows if r["model"] == TEACHER_LABEL and r["nfe"] == max(TEACHER_NFE))
    add_ratios(rows, ref)
    return rows


def bench_toy(problem: str, runs_dir: Path, scale: float, modes: list[str], n: int, seed: int,
              reflow: bool) -> list[dict[str, Any]]:
    """Train (or reuse) the teacher and students of a toy problem and return its rows."""
    from flowdistill.api import load_run

    teacher_dir = train_or_reuse(
        CONFIGS / "teacher_checkerboard.yaml",
        scale_overrides(CONFIGS / "teacher_checkerboard.yaml",
                        [f"out_dir={runs_dir / problem / 'teacher'}", f"data.name={problem}"],
                        scale, "flow_matching"),
        "flow_matching", f"{problem} teacher")
    students = distil_modes(problem, teacher_dir / "student", runs_dir, scale, modes)
    log(f"{problem}: evaluating (n={n})")
    runs = {TEACHER_LABEL: (load_run(teacher_dir), TEACHER_NFE, "euler")}
    runs.update({student_label(m): (load_run(d), STUDENT_NFE, None) for m, d in students.items()})
    rows = toy_rows(problem, runs, n, seed)
    if reflow:
        ref = next(r["value"] for r in rows if r["model"] == TEACHER_LABEL and r["nfe"] == max(TEACHER_NFE))
        over = [f"data.name={problem}", f"teacher={teacher_dir}", f"out_dir={runs_dir / problem / 'reflow'}"]
        rows += reflow_rows(problem, REFLOW_TOY_CONFIG, over, scale, n, seed, ref, rows, ablations=True)
    return rows


REFLOW_TOY_CONFIG = CONFIGS / "reflow_checkerboard.yaml"
REFLOW_DIGITS_CONFIG = CONFIGS / "reflow_digits.yaml"
REFLOW_LABELS = {"2-RF": "2-RF", "student": "InstaFlow"}  # chain label prefixes -> table labels


def reflow_scale_overrides(path: Path, overrides: list[str], scale: float) -> list[str]:
    """``overrides`` plus both chain stages' schedules and coupling counts shrunk by ``scale``.

    ``scale == 1`` returns ``overrides`` unchanged. Steps never drop below 2, pairs below 256.
    """
    from flowdistill.couplings.pipeline import load_pipeline

    if scale == 1.0:
        return list(overrides)
    pipe = load_pipeline(path, overrides)
    out = list(overrides)
    for stage in ("reflow", "instaflow"):
        tr, dist = pipe[stage].get("train", {}), pipe[stage].get("distiller", {})
        steps = max(2, round(int(tr.get("steps", 2000)) * scale))
        out += [f"{stage}.train.steps={steps}",
                f"{stage}.train.warmup_steps={round(int(tr.get('warmup_steps', 0)) * scale)}",
                f"{stage}.train.log_every={max(1, round(int(tr.get('log_every', 50)) * scale))}",
                f"{stage}.train.ckpt_every={max(1, round(int(tr.get('ckpt_every', 500)) * scale))}"]
        pairs = int(dist.get("couple", {}).get("n_pairs", 20000))
        out.append(f"{stage}.distiller.couple.n_pairs={max(256, round(pairs * scale))}")
        ft = int(dist.get("finetune_after", 0))
        if ft > 0:
            out.append(f"{stage}.distiller.finetune_after={min(steps - 1, max(1, round(ft * scale)))}")
    return out


def _reflow_label(model: str, solver: str) -> str:
    """Table name of a chain row: the teacher as in the rest of the table, 2-RF and its ablations,
    the InstaFlow student."""
    if model == "teacher":
        return TEACHER_LABEL if solver == "euler" else f"teacher ({solver.capitalize()})"
    if model.startswith("student"):
        return REFLOW_LABELS["student"] + model[len("student"):]
    return model


def reflow_rows(problem: str, config: Path, overrides: list[str], scale: float, n: int, seed: int,
                ref: float | None, existing: list[dict[str, Any]],
                ablations: bool = True) -> list[dict[str, Any]]:
    """The reflow chain's rows for ``problem`` in ``COLUMNS``
    (``flowdistill.couplings.pipeline.bench_rows``).

    Runs (or resumes) the chain of ``config`` + ``overrides`` evaluated with this benchmark's ``n``
    and ``seed``, then normalises its rows: quality rows (``sw2`` or ``fid``) of every model except
    teacher rows that ``existing`` already holds (same sampler, same noise, same numbers), and one
    ``straightness`` row per model. Quality ratios are over ``ref`` (the problem's teacher
    reference of the rest of the table; ``None``: the chain teacher's best value), straightness
    ratios over the teacher's straightness.
    """
    from flowdistill.couplings.pipeline import bench_rows

    over = reflow_scale_overrides(config, [*overrides, f"eval.n_samples={n}", f"eval.seed={seed}"], scale)
    t0 = time.perf_counter()
    log(f"{problem}: reflow chain {config.name} (resumes finished stages)")
    chain = bench_rows(config, over, ablations=ablations, n=n)
    log(f"{problem}: reflow chain and its rows done in {time.perf_counter() - t0:.0f} s")
    have = {(r["model"], r["nfe"]) for r in existing
            if r.get("problem") == problem and r.get("metric") != "straightness"}
    rows, straight = [], {}
    for r in chain:
        label = _reflow_label(r["model"], r.get("solver", "euler"))
        who = TEACHER_LABEL if r["model"] == "teacher" else label
        straight.setdefault(who, (r["straight_nfe"], r["straightness"]))
        if (label, r["nfe"]) in have:
            continue
        rows.append({"problem": problem, "model": label, "nfe": r["nfe"], "metric": r["metric"],
                     "value": float(r["value"]), "floor": float(r["floor"]), "n": r["n"]})
    if ref is None:
        ref = min(r["value"] for r in chain if r["model"] == "teacher")
    add_ratios(rows, ref)
    s_rows = [{"problem": problem, "model": label, "nfe": k, "metric": "straightness", "value": float(s),
               "floor": None} for label, (k, s) in straight.items()]
    add_ratios(s_rows, straight[TEACHER_LABEL][1])
    return rows + s_rows


def reflow_digits_rows(runs_dir: Path, scale: float, seed: int,
                       existing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The digits reflow chain (``reflow_digits.yaml``) from the digits teacher, FID rows (n = 360)."""
    got = digits_teacher(runs_dir, scale)
    if got is None:
        return []
    teacher_model = got[1]
    ref = [r["value"] for r in existing if r.get("problem") == "digits" and r["model"] == TEACHER_LABEL]
    over = [f"teacher={teacher_model}", f"out_dir={runs_dir / 'digits' / 'reflow'}"]
    return reflow_rows("digits", REFLOW_DIGITS_CONFIG, over, scale, 360, seed, min(ref) if ref else None,
                       existing, ablations=False)


# -- digits -------------------------------------------------------------------------------------
def digits_teacher(runs_dir: Path, scale: float):
    """The digits teacher as a ``LoadedRun`` and the model directory to distil from, or ``None``."""
    from flowdistill.api import LoadedRun, load_run
    from flowdistill.config import load_config
    from flowdistill.distillers import DISTILLERS
    from flowdistill.models.loading import load_model_dir

    asset = REPO / "assets" / "digits_teacher"
    cfg_file = CONFIGS / "teacher_digits.yaml"
    if (asset / "config.json").is_file():
        shipped = asset / "train_config.yaml"
        cfg_path = shipped if shipped.is_file() else cfg_file
        if not cfg_path.is_file():
            log(f"digits: {asset} has no train_config.yaml and {cfg_file} is missing; skipping digits")
            return None
        log(f"digits: using the shipped teacher {asset}")
        cfg = load_config(cfg_path, [f"out_dir={asset}"])
        model = load_model_dir(asset)
        dist = DISTILLERS.get(cfg.distiller.name).for_inference(cfg.distiller, model)
        return LoadedRun(cfg, model, dist, asset), asset
    if not cfg_file.is_file():
        log(f"digits: neither {asset} nor {cfg_file} exists; skipping digits")
        return None
    run_dir = train_or_reuse(
        cfg_file, scale_overrides(cfg_file, [f"out_dir={runs_dir / 'digits' / 'teacher'}"], scale,
                                  "flow_matching"), "flow_matching", "digits teacher")
    return load_run(run_dir), run_dir / "student"


def bench_digits(runs_dir: Path, scale: float, modes: list[str], seed: int) -> list[dict[str, Any]]:
    """FID rows (digits features, n = 360) of the digits teacher and its FreeFlow students."""
    from flowdistill.api import load_run
    from flowdistill.eval.image_eval import image_sweep, reference_images

    got = digits_teacher(runs_dir, scale)
    if got is None:
        return []
    teacher, teacher_model = got
    spec = teacher.cfg.data
    extra = [] if (CONFIGS / "freeflow_digits.yaml").is_file() else [
        f"model.name={teacher.cfg.model.name}", f"data.image_size={spec.image_size}",
        f"data.conditional={str(spec.conditional).lower()}", "train.batch_size=128"]
    students = distil_modes("digits", teacher_model, runs_dir, scale, modes, extra)
    reference, floor_real, ref_name = reference_images(teacher)
    samplers = {TEACHER_LABEL: lambda k, nfe, s: teacher.sample(k, nfe, seed=s, solver="euler")}
    nfes = {TEACHER_LABEL: TEACHER_NFE}
    for m, d in students.items():
        run = load_run(d)
        samplers[student_label(m)] = lambda k, nfe, s, run=run: run.sample(k, nfe, seed=s)
        nfes[student_label(m)] = STUDENT_NFE
    log(f"digits: evaluating FID (n={reference.shape[0]})")
    sweep, _ = image_sweep(samplers, nfes, reference, floor_real, seed=seed, feature_extractor="digits",
                           cache_dir=runs_dir / "digits" / "fid_cache",
                           reference_name=f"{ref_name}-n{reference.shape[0]}")
    rows = [{"problem": "digits", "model": r["model"], "nfe": r["nfe"], "metric": "fid", "value": r["fid"],
             "floor": r["fid_floor"], "kid": r["kid_mean"], "kid_floor": r["kid_floor"], "n": r["n"]}
            for r in sweep]
    best = min(r["value"] for r in rows if r["model"] == TEACHER_LABEL)
    add_ratios(rows, best)
    return rows


# -- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/bench",
                    help="folder of the runs and the table (default runs/bench)")
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply every training schedule by this (e.g. 0.05 for a smoke run)")
    ap.add_argument("--problems", default=",".join(TOY_PROBLEMS),
                    help=f"comma-separated toy problems (default {','.join(TOY_PROBLEMS)}; '' for none)")
    ap.add_argument("--modes", default=",".join(MODES), help="FreeFlow modes to train (default all three)")
    ap.add_argument("--digits", action="store_true", help="also benchmark the 8x8 digits (FID)")
    ap.add_argument("--reflow", action="store_true",
                    help="add the reflow -> InstaFlow chain (2-RF, 1-step student, straightness) per problem")
    ap.add_argument("--n", type=int, default=4000, help="samples per toy evaluation (default 4000)")
    ap.add_argument("--seed", type=int, default=1234, help="evaluation seed (default 1234)")
    args = ap.parse_args(argv)
    from flowdistill.data.toy2d import TOY_DATASETS

    args.problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    bad = [p for p in args.problems if p not in TOY_DATASETS.names()]
    if bad:
        ap.error(f"unknown problem {bad[0]!r}; available: {', '.join(TOY_DATASETS.names())}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        ap.error(f"--modes must be a non-empty subset of {','.join(MODES)}")
    if not args.steps_scale > 0:
        ap.error("--steps-scale must be positive")
    if args.n < 2:
        ap.error("--n must be at least 2")
    if not args.problems and not args.digits:
        ap.error("nothing to do: give --problems and/or --digits")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the markdown table and write ``quality.md``/``quality.json``, the
    per-NFE summary ``quality_by_nfe.md`` and one metric-vs-NFE plot per problem."""
    args = parse_args(argv)
    from flowdistill.core.registry import UnknownNameError
    from flowdistill.errors import FlowDistillError
    from flowdistill.eval.sweep import by_nfe_table, plot_by_problem
    from flowdistill.eval.toy_metrics import markdown_table

    runs_dir = Path(args.runs)
    runs_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        for problem in args.problems:
            rows += bench_toy(problem, runs_dir, args.steps_scale, args.modes, args.n, args.seed, args.reflow)
        if args.digits:
            rows += bench_digits(runs_dir, args.steps_scale, args.modes, args.seed)
            if args.reflow:
                rows += reflow_digits_rows(runs_dir, args.steps_scale, args.seed, rows)
    except (FlowDistillError, UnknownNameError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md = markdown_table(rows, COLUMNS)
    (runs_dir / "quality.md").write_text(md + "\n")
    (runs_dir / "quality.json").write_text(json.dumps(
        {"steps_scale": args.steps_scale, "n": args.n, "seed": args.seed, "rows": rows}, indent=2))
    (runs_dir / "quality_by_nfe.md").write_text(by_nfe_table(rows) + "\n")
    plot_by_problem(rows, runs_dir, "quality")
    print(md)
    log(f"steps scale {args.steps_scale:g}; toys: sliced W2, n={args.n}, seed {args.seed}; digits: FID "
        f"(digits features, n=360); ratio = value / teacher@128 (digits: the teacher's best NFE)")
    log(f"done in {time.perf_counter() - t0:.0f} s; wrote {runs_dir / 'quality.md'}, quality.json, "
        f"quality_by_nfe.md and quality_<problem>.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
