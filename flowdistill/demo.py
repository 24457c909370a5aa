"""``flowdistill demo``: the README's default job on the built-in checkerboard problem."""

from __future__ import annotations

import time
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _config_path(name: str) -> Path:
    return CONFIG_DIR / name


def run_demo(out: Path, quick: bool = False) -> str:
    """Train a checkerboard teacher, sweep its NFE, print the distance table, write PNGs.

    ``quick`` shrinks everything to seconds (for smoke tests); the numbers are then meaningless.
    """
    from flowdistill.api import load_run, train
    from flowdistill.config import load_config
    from flowdistill.data.toy2d import get_toy
    from flowdistill.eval.plots import metric_vs_nfe, scatter_grid
    from flowdistill.eval.sweep import toy_sweep, write_table

    t0 = time.time()
    over = [f"out_dir={out / 'teacher'}"]
    n, nfes = 4000, [1, 2, 4, 8, 32, 128]
    if quick:
        over += ["train.steps=30", "train.log_every=10", "train.ckpt_every=30"]
        n, nfes = 500, [1, 2, 8]
    cfg = load_config(_config_path("teacher_checkerboard.yaml"), over)
    print(f"[demo] training checkerboard teacher ({cfg.train.steps} steps) in {out / 'teacher'}")
    train(cfg, overwrite=True)
    teacher = load_run(out / "teacher")
    ds = get_toy("checkerboard")
    rows, samples = toy_sweep({"teacher (Euler)": lambda k, nfe, s: teacher.sample(k, nfe, seed=s)},
                              {"teacher (Euler)": nfes}, ds, n, seed=1234)
    md = write_table(rows, ["model", "nfe", "sw2", "sw2_floor", "energy", "energy_floor", "n"], out, "demo")
    data, _ = ds.sample(n, torch.Generator().manual_seed(99))
    scatter_grid({"data": data, **{f"teacher NFE {k}": v for k, v in samples["teacher (Euler)"].items()}},
                 out / "demo_samples.png")
    metric_vs_nfe({"teacher (Euler)": {r["nfe"]: r["sw2"] for r in rows}}, out / "demo_sw2_vs_nfe.png",
                  ylabel="sliced W2", floor=rows[0]["sw2_floor"])
    print(md)
    print(f"[demo] done in {time.time() - t0:.0f} s; plots in {out}")
    return md
