"""``flowdistill demo``: the README's default job on the built-in checkerboard problem.

1. train a flow-matching teacher (``configs/teacher_checkerboard.yaml``);
2. distil it data-free with FreeFlow into a few-step flow-map student
   (``configs/freeflow_checkerboard.yaml``, the benchmark's settings);
3. compare the teacher's Euler sampler at 1, 2, 4, 8, 128 steps with the student at 1, 2, 4 jumps
   (sliced W2 and energy distance to fresh target samples, with the data-vs-data floor at the same
   ``n``), print the table and write ``demo.md``/``demo.json``, a scatter grid and a
   metric-vs-NFE plot.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TEACHER_NFE = [1, 2, 4, 8, 128]
STUDENT_NFE = [1, 2, 4]


def _config_path(name: str) -> Path:
    return CONFIG_DIR / name


def run_demo(out: Path, quick: bool = False) -> str:
    """Train the teacher, distil it with FreeFlow, sweep NFE, print the table, write PNGs.

    ``quick`` shrinks everything to seconds (for smoke tests); the numbers are then meaningless.
    Returns the markdown table.
    """
    from flowdistill.api import load_run, train
    from flowdistill.config import load_config
    from flowdistill.data.toy2d import get_toy
    from flowdistill.eval.plots import metric_vs_nfe, scatter_grid
    from flowdistill.eval.sweep import toy_sweep, write_table

    t0 = time.time()
    out = Path(out)
    n, t_nfe, s_nfe = 4000, TEACHER_NFE, STUDENT_NFE
    t_over = [f"out_dir={out / 'teacher'}"]
    s_over = [f"out_dir={out / 'student'}", f"teacher={out / 'teacher'}"]
    if quick:
        t_over += ["train.steps=30", "train.log_every=10", "train.ckpt_every=30"]
        s_over += ["train.steps=6", "train.log_every=2", "train.ckpt_every=6",
                   "distiller.correction_warmup=2"]
        n, t_nfe, s_nfe = 500, [1, 2, 8], [1, 2]
    t_cfg = load_config(_config_path("teacher_checkerboard.yaml"), t_over)
    print(f"[demo] 1/3 training the checkerboard teacher ({t_cfg.train.steps} steps) in {out / 'teacher'}")
    train(t_cfg, overwrite=True)
    t1 = time.time()
    s_cfg = load_config(_config_path("freeflow_checkerboard.yaml"), s_over, default_distiller="freeflow")
    print(f"[demo] 2/3 distilling it with FreeFlow, data-free ({s_cfg.train.steps} steps) "
          f"in {out / 'student'}")
    train(s_cfg, overwrite=True)
    t2 = time.time()
    print("[demo] 3/3 evaluating")
    teacher, student = load_run(out / "teacher"), load_run(out / "student")
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
    print(md)
    print(f"[demo] done in {time.time() - t0:.0f} s (teacher {t1 - t0:.0f} s, distillation {t2 - t1:.0f} s); "
          f"tables and plots in {out}")
    return md
