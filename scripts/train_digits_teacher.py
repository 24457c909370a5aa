"""Train the digits teacher and ship it in ``assets/digits_teacher/``.

Usage::

    OMP_NUM_THREADS=1 python scripts/train_digits_teacher.py [--config PATH] [--out-dir runs/teacher_digits]
        [--asset-dir assets/digits_teacher] [--overwrite] [--no-eval] [key=value ...]

Trains ``configs/teacher_digits.yaml`` (plus any ``key=value`` overrides) with
:func:`flowdistill.api.train`, then copies the exported ``run_dir/student`` (safetensors, written by
``save_pretrained``) to the asset directory, refusing if it is 10 MB or more. Unless ``--no-eval``,
it measures the NFE sweep of DESIGN §7 (digits-classifier FID/KID against the 360 test images, with
the train-vs-test floor at the same n): Euler at NFE 1, 2, 4, 8, 32 and Heun at NFE 128 (64 steps).
``README.md`` in the asset directory records the command, the seed, the resolved config, the
training time, the sweep and git-free provenance (package versions, platform, file hashes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "teacher_digits.yaml"
MAX_BYTES = 10 * 1024 * 1024
EULER_NFE = [1, 2, 4, 8, 32]
HEUN_NFE = [128]


def dir_bytes(path: Path) -> int:
    """Total size of the regular files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def provenance(config: Path) -> list[str]:
    """Versions and platform facts that identify how the teacher was made (no git)."""
    from importlib.metadata import version

    import diffusers
    import numpy
    import sklearn
    import torch

    from flowdistill.data.couplings import file_sha256

    return [
        f"- date (UTC): {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M')}",
        f"- flowdistill {version('flowdistill')}, torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, numpy {numpy.__version__}, scikit-learn {sklearn.__version__}",
        f"- python {platform.python_version()}, {platform.system()} {platform.machine()}, "
        f"torch threads {torch.get_num_threads()} "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), {os.cpu_count()} CPUs",
        f"- config file sha256: `{file_sha256(config)}` ({config.name})",
        f"- digits feature net sha256: `{file_sha256(REPO / 'assets' / 'digits_classifier.safetensors')}`",
    ]


def run_sweep(run_dir: Path) -> tuple[str, str]:
    """Euler and Heun sweeps of the trained run (DESIGN §7 protocol); the two markdown tables."""
    from flowdistill.api import load_run
    from flowdistill.eval.image_eval import evaluate_image_run

    run = load_run(run_dir)
    out = run_dir / "eval"
    euler = evaluate_image_run(run, EULER_NFE, 360, out, seed=1234, solver="euler")
    heun = evaluate_image_run(run, HEUN_NFE, 360, out, seed=1234, solver="heun")
    return euler, heun


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, copy the student into the asset directory and write its README."""
    from flowdistill.data.couplings import file_sha256
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.seed=1")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--out-dir", default=str(REPO / "runs" / "teacher_digits"))
    ap.add_argument("--asset-dir", default=str(REPO / "assets" / "digits_teacher"))
    ap.add_argument("--overwrite", action="store_true", help="replace an existing run in --out-dir")
    ap.add_argument("--no-eval", action="store_true", help="skip the NFE sweep")
    args = ap.parse_args(argv)

    from flowdistill.api import train
    from flowdistill.config import load_config, to_yaml

    cfg = load_config(args.config, [*args.overrides, f"out_dir={args.out_dir}"])
    t0, c0 = time.perf_counter(), time.process_time()
    run_dir = train(cfg, overwrite=args.overwrite)
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    print(f"trained {cfg.train.steps} steps: {train_s:.0f} s wall, {cpu_s:.0f} s CPU, {run_dir}", flush=True)

    student = run_dir / "student"
    size = dir_bytes(student)
    if size >= MAX_BYTES:
        print(f"error: exported student is {size / 1e6:.1f} MB, not shipping (limit 10 MB)", file=sys.stderr)
        return 2
    asset = Path(args.asset_dir)
    if asset.exists():
        shutil.rmtree(asset)
    shutil.copytree(student, asset)
    (asset / "train_config.yaml").write_text(to_yaml(cfg))

    tables = run_sweep(run_dir) if not args.no_eval else None
    loss_lines = (run_dir / "metrics.jsonl").read_text().strip().splitlines()
    last = json.loads(loss_lines[-1]) if loss_lines else {}
    weights = asset / "diffusion_pytorch_model.safetensors"
    cmd = "OMP_NUM_THREADS={} python {} {}".format(
        os.environ.get("OMP_NUM_THREADS", "1"), Path(sys.argv[0]).as_posix(), shlex.join(argv or sys.argv[1:])
    ).rstrip()
    kind = "class-conditional" if cfg.data.conditional else "unconditional"
    lines = [
        "# Digits teacher (shipped)",
        "",
        f"A {cfg.model.name} flow-matching velocity field on the {cfg.data.image_size}x{cfg.data.image_size} "
        f"scikit-learn digits (train split, {kind}), "
        "saved with `save_pretrained` (safetensors). Load it with "
        "`flowdistill.models.loading.load_model_dir('assets/digits_teacher')`; use it as a teacher with "
        "`teacher=assets/digits_teacher`.",
        "",
        "## How it was made",
        "",
        f"- command: `{cmd}`",
        f"- seed: train.seed={cfg.train.seed} (initial weights and every batch/noise/time draw)",
        f"- training: {cfg.train.steps} steps, batch {cfg.train.batch_size}, {train_s:.0f} s wall clock, "
        f"{cpu_s:.0f} s process CPU time, "
        f"final logged loss {last.get('loss', float('nan')):.4f}",
        f"- weights: {weights.name}, {weights.stat().st_size / 1e6:.2f} MB, sha256 `{file_sha256(weights)}`",
        *provenance(Path(args.config)),
        "",
        "The resolved config is `train_config.yaml` beside this file.",
    ]
    if tables is not None:
        lines += [
            "",
            "## NFE sweep (DESIGN §7)",
            "",
            "Digits-classifier features; reference = the 360 test images; n = 360 samples (seed 1234, "
            "unconditional: null label); `fid_floor`/`kid_floor` = 360 train images vs the same reference.",
            "",
            "Euler:",
            "",
            tables[0],
            "",
            "Heun (2 evaluations per step; NFE 128 = 64 steps):",
            "",
            tables[1],
        ]
    (asset / "README.md").write_text("\n".join(lines) + "\n")
    print(f"teacher shipped to {asset} ({size / 1e6:.2f} MB)")
    if tables is not None:
        print(tables[0])
        print(tables[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
