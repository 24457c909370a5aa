"""Digits MDT runs at NFE 2: ``euler`` against ``renoise``, class-balanced and null label, seeds 1234…1238.

The same protocol as ``scripts/bench_quality.py --digits`` (FID on the digits-classifier features,
n = 360 against the test split, mean ± std over the 5 seeds; KID mean), through
:func:`flowdistill.eval.run_eval.evaluate_run`, with the run's ``distiller.sampler`` set per row::

    OMP_NUM_THREADS=1 python scripts/mdt_digits_samplers.py runs/mdtd_both runs/mdtd_vm
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from flowdistill.api import load_run
from flowdistill.eval.run_eval import evaluate_run


def main(run_dirs: list[str]) -> None:
    """Print one markdown row per (run, sampler, label protocol)."""
    for run_dir in run_dirs:
        for sampler in ("euler", "renoise"):
            for labels in ("balanced", None):
                fids, kids = [], []
                for seed in range(1234, 1239):
                    run = load_run(run_dir)
                    run.distiller.cfg.sampler = sampler
                    out = Path(run_dir) / f"eval_{sampler}_{labels}" / str(seed)
                    out.mkdir(parents=True, exist_ok=True)
                    lab = (torch.arange(run.num_classes) if labels else None)
                    evaluate_run(run, [2], 360, out, seed=seed, labels=None if lab is None else lab.tolist())
                    r = json.loads((out / "sweep.json").read_text())[0]
                    fids.append(r["fid"])
                    kids.append(r["kid_mean"])
                print(f"| {run_dir} | {sampler} | {labels or 'null'} | 2 | {statistics.mean(fids):.3f} ± "
                      f"{statistics.stdev(fids):.3f} | {statistics.mean(kids):.4f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
