"""``flowdistill demo``: the README's default job on the built-in checkerboard problem.

1. take the flow-matching teacher: the shipped ``assets/checkerboard_teacher`` (a run directory
   trained by ``configs/teacher_checkerboard.yaml``, 10000 steps; see its README.md and
   ``scripts/train_toy_teacher.py --problem checkerboard``), or train it from that config when
   ``train_teacher=True`` or the asset is not there (assets ship in the wheel: ``flowdistill.resources``);
2. distil it data-free with FreeFlow into a few-step flow-map student
   (``configs/freeflow_checkerboard.yaml``, the benchmark's settings, with ``DISTILL_OVERRIDES``:
   half the steps at 1.5× the learning rate, see below);
3. compare the teacher's Euler sampler at 1, 2, 4, 8, 128 steps with the student at 1, 2, 4 jumps
   (sliced W2 and energy distance to fresh target samples, with the data-vs-data floor at the same
   ``n``), print the table and write ``demo.md``/``demo.json``, a scatter grid and a
   metric-vs-NFE plot.

Where the time goes (2 CPU cores, quiet): the FreeFlow distillation is nearly all of it (each step
is about ten network evaluations, a forward-mode JVP and three optimiser steps: 85 ms with 2
threads, 110 ms with 1); training the teacher as well adds about 5 minutes (1 thread), which is
why the shipped teacher is used by default; evaluation takes about 10 s. The benchmark's 2400 steps took 231 s
alone; 1200 steps at lr 1.5e-3 (warm-ups halved) give the same student within the seed spread:
sliced W2 at 1/2/4 jumps, mean over 5 evaluation seeds (n = 4000, spread ±0.006–0.010), 0.0338 /
0.0357 / 0.0338 against 0.0331 / 0.0353 / 0.0340 for 2400 steps (1200 steps at lr 1e-3: 0.0344 /
0.0368 / 0.0355); the teacher's 128-step Euler is 0.0330, the data floor 0.0280. Those runs used
the earlier 3000-step teacher; from the 10000-step one (2026-12-02, 128-step Euler 0.0304) the
demo's student gives 0.0333 / 0.0322 / 0.0316 (same 5 seeds; 264 s for the demo at load ≈ 6).

Threads: the networks are small (batch 512–1024, width 256), and intra-op threads that share
their cores with other busy processes wait at every op's barrier: on a 2-core box with other jobs
running, a teacher step took 14× longer with 2 threads than with 1 (500 vs 36 ms). Unless
``OMP_NUM_THREADS`` is set, the demo therefore uses torch's thread count lowered to the CPUs the
1-minute load average leaves idle (at least 1), and restores it afterwards.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from flowdistill.resources import assets_dir, configs_dir

CONFIG_DIR = configs_dir()
TEACHER_ASSET = assets_dir() / "checkerboard_teacher"
DISTILL_OVERRIDES = ["train.steps=1200", "train.lr=1.5e-3", "train.warmup_steps=25",
                     "distiller.correction_warmup=100"]
TEACHER_NFE = [1, 2, 4, 8, 128]
STUDENT_NFE = [1, 2, 4]


def _config_path(name: str) -> Path:
    """A packaged config file by name."""
    return CONFIG_DIR / name


def _shipped_teacher() -> Path | None:
    """The shipped teacher run directory, or None if it is not installed."""
    ok = (TEACHER_ASSET / "config.yaml").is_file() and (TEACHER_ASSET / "student" / "config.json").is_file()
    return TEACHER_ASSET if ok else None


def _cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _demo_threads() -> int:
    """Intra-op threads for the demo: torch's count, capped by the idle CPUs (see the module doc)."""
    threads = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return threads
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return threads
    return max(1, min(threads, int(_cpus() - load + 0.5)))


def run_demo(out: Path, quick: bool = False, train_teacher: bool = False) -> str:
    """Get the teacher, distil it with FreeFlow, sweep NFE, print the table, write PNGs.

    ``quick`` shrinks the distillation (and a trained teacher) to seconds, for smoke tests; the
    numbers are then meaningless. ``train_teacher`` trains the teacher into ``out/teacher`` instead
    of using the shipped one. Returns the markdown table.
    """
    before = torch.get_num_threads()
    threads = _demo_threads()
    torch.set_num_threads(threads)
    try:
        return _run(Path(out), quick, train_teacher, threads)
    finally:
        torch.set_num_threads(before)


def _run(out: Path, quick: bool, train_teacher: bool, threads: int) -> str:
    """:func:`run_demo` once the thread count is set."""
    from flowdistill.api import load_run, train
    from flowdistill.config import load_config
    from flowdistill.data.toy2d import get_toy
    from flowdistill.eval.plots import metric_vs_nfe, scatter_grid
    from flowdistill.eval.sweep import toy_sweep, write_table

    t0 = time.time()
    print(f"[demo] {threads} torch thread(s) on {_cpus()} CPUs")
    n, t_nfe, s_nfe = 4000, TEACHER_NFE, STUDENT_NFE
    t_over = [f"out_dir={out / 'teacher'}"]
    s_over = [f"out_dir={out / 'student'}", *DISTILL_OVERRIDES]
    if quick:
        t_over += ["train.steps=30", "train.log_every=10", "train.ckpt_every=30"]
        s_over += ["train.steps=6", "train.log_every=2", "train.ckpt_every=6",
                   "distiller.correction_warmup=2"]
        n, t_nfe, s_nfe = 500, [1, 2, 8], [1, 2]
    teacher_dir = None if train_teacher else _shipped_teacher()
    if teacher_dir is None:
        t_cfg = load_config(_config_path("teacher_checkerboard.yaml"), t_over)
        why = "" if train_teacher else f" (no shipped teacher at {TEACHER_ASSET})"
        print(f"[demo] 1/3 training the checkerboard teacher ({t_cfg.train.steps} steps){why} "
              f"in {out / 'teacher'}")
        teacher_dir = Path(train(t_cfg, overwrite=True))
    else:
        print(f"[demo] 1/3 using the shipped checkerboard teacher {teacher_dir} "
              "(configs/teacher_checkerboard.yaml; run_demo(..., train_teacher=True) retrains it)")
    t1 = time.time()
    s_cfg = load_config(_config_path("freeflow_checkerboard.yaml"), [*s_over, f"teacher={teacher_dir}"],
                        default_distiller="freeflow")
    print(f"[demo] 2/3 distilling it with FreeFlow, data-free ({s_cfg.train.steps} steps, "
          f"lr {s_cfg.train.lr:g}) in {out / 'student'}")
    train(s_cfg, overwrite=True)
    t2 = time.time()
    print("[demo] 3/3 evaluating")
    teacher, student = load_run(teacher_dir), load_run(out / "student")
    ds = get_toy("checkerboard")
    names = {"teacher": "teacher (Euler)", "student": "FreeFlow student"}
    rows, samples = toy_sweep(
        {names["teacher"]: lambda k, nfe, s: teacher.sample(k, nfe, seed=s),
         names["student"]: lambda k, nfe, s: student.sample(k, nfe, seed=s)},
        {names["teacher"]: t_nfe, names["student"]: s_nfe}, ds, n, seed=1234)
    md = write_table(rows, ["model", "nfe", "sw2", "sw2_floor", "energy", "energy_floor", "n"], out, "demo")
    data, _ = ds.sample(n, torch.Generator().manual_seed(99))
    panels = {"data": data}
    panels.update({f"teacher NFE {k}": v for k, v in samples[names["teacher"]].items()})
    panels.update({f"student NFE {k}": v for k, v in samples[names["student"]].items()})
    scatter_grid(panels, out / "demo_samples.png")
    curves = {m: {r["nfe"]: r["sw2"] for r in rows if r["model"] == m} for m in names.values()}
    metric_vs_nfe(curves, out / "demo_sw2_vs_nfe.png", ylabel="sliced W2", floor=rows[0]["sw2_floor"],
                  logy=True)
    t3 = time.time()
    print(md)
    print(f"[demo] done in {t3 - t0:.0f} s (teacher {t1 - t0:.0f} s, distillation {t2 - t1:.0f} s, "
          f"evaluation {t3 - t2:.0f} s); tables and plots in {out}")
    return md
