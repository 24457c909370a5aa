"""Train the checkerboard teacher that ``flowdistill demo`` distils, and ship it in ``assets/``.

Usage::

    python scripts/train_checkerboard_teacher.py [--out-dir runs/teacher_checkerboard]
        [--asset-dir assets/checkerboard_teacher] [--overwrite] [key=value ...]

Trains ``configs/teacher_checkerboard.yaml`` (plus any ``key=value`` overrides) with
:func:`flowdistill.api.train` and copies the run's ``config.yaml`` and exported ``student/``
(safetensors, ``save_pretrained``) to the asset directory, so that the asset is itself a run
directory: ``flowdistill.api.load_run`` loads it and ``teacher=assets/checkerboard_teacher`` names
it as a teacher. ``README.md`` beside it records the command, seed, training time, weights hash
and the teacher's Euler sweep (sliced W2 and energy distance at n = 4000 against fresh target
samples, mean ± std over 5 evaluation seeds, with the data-vs-data floor; DESIGN §7).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "teacher_checkerboard.yaml"
MAX_BYTES = 5 * 1024 * 1024
NFE = [1, 2, 4, 8, 128]
EVAL_SEEDS = [1234, 1, 2, 3, 4]
N = 4000


def sweep(run_dir: Path) -> str:
    """Markdown table: the teacher's Euler sliced W2 / energy per NFE, mean ± std over EVAL_SEEDS."""
    from flowdistill.api import load_run
    from flowdistill.data.toy2d import get_toy
    from flowdistill.eval.sweep import toy_sweep

    run = load_run(run_dir)
    per_seed = [toy_sweep({"teacher": lambda k, nfe, s: run.sample(k, nfe, seed=s)}, {"teacher": NFE},
                          get_toy("checkerboard"), N, seed=seed)[0] for seed in EVAL_SEEDS]
    lines = ["| Euler NFE | sw2 | sw2 floor | energy | energy floor |", "|---:|---:|---:|---:|---:|"]
    for i, nfe in enumerate(NFE):
        cells = []
        for key in ("sw2", "sw2_floor", "energy", "energy_floor"):
            vals = [rows[i][key] for rows in per_seed]
            cells.append(f"{statistics.mean(vals):.4g} ± {statistics.stdev(vals):.2g}")
        lines.append(f"| {nfe} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Train, copy config.yaml + student/ into the asset directory, write its README."""
    from flowdistill.data.couplings import file_sha256
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.seed=1")
    ap.add_argument("--out-dir", default=str(REPO / "runs" / "teacher_checkerboard"))
    ap.add_argument("--asset-dir", default=str(REPO / "assets" / "checkerboard_teacher"))
    ap.add_argument("--overwrite", action="store_true", help="replace an existing run in --out-dir")
    args = ap.parse_args(argv)

    import torch

    from flowdistill.api import train
    from flowdistill.config import load_config

    cfg = load_config(CONFIG, [*args.overrides, f"out_dir={args.out_dir}"])
    t0, c0 = time.perf_counter(), time.process_time()
    run_dir = Path(train(cfg, overwrite=args.overwrite))
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    size = sum(p.stat().st_size for p in (run_dir / "student").rglob("*") if p.is_file())
    if size >= MAX_BYTES:
        print(f"error: exported teacher is {size / 1e6:.1f} MB, not shipping (limit 5 MB)", file=sys.stderr)
        return 2
    asset = Path(args.asset_dir)
    if asset.exists():
        shutil.rmtree(asset)
    asset.mkdir(parents=True)
    shutil.copy2(run_dir / "config.yaml", asset / "config.yaml")
    shutil.copytree(run_dir / "student", asset / "student")
    table = sweep(asset)
    weights = asset / "student" / "diffusion_pytorch_model.safetensors"
    given = argv if argv is not None else sys.argv[1:]
    cmd = "python scripts/train_checkerboard_teacher.py " + shlex.join(given)
    lines = [
        "# Checkerboard teacher (shipped)",
        "",
        f"The {cfg.model.name} flow-matching velocity field that `flowdistill demo` distils, trained by "
        "`configs/teacher_checkerboard.yaml`. This directory is a run directory "
        "(`config.yaml` + `student/`, safetensors via `save_pretrained`): "
        "`flowdistill.api.load_run('assets/checkerboard_teacher')` loads it, "
        "`teacher=assets/checkerboard_teacher` names it as a teacher, and "
        "`flowdistill.demo.run_demo(out, train_teacher=True)` retrains it instead of using it.",
        "",
        "## How it was made",
        "",
        f"- command: `{cmd.rstrip()}`",
        f"- seed: train.seed={cfg.train.seed}; {cfg.train.steps} steps, batch {cfg.train.batch_size}, "
        f"{train_s:.0f} s wall clock, {cpu_s:.0f} s process CPU time",
        f"- weights: {weights.stat().st_size / 1e6:.2f} MB, sha256 `{file_sha256(weights)}`",
        f"- date (UTC): {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} torch threads "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), {os.cpu_count()} CPUs",
        f"- config file sha256: `{file_sha256(CONFIG)}` ({CONFIG.name})",
        "",
        f"## Euler sweep (n = {N}, mean ± std over evaluation seeds {', '.join(map(str, EVAL_SEEDS))})",
        "",
        table,
    ]
    (asset / "README.md").write_text("\n".join(lines) + "\n")
    print(f"teacher shipped to {asset} ({size / 1e6:.2f} MB)\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
