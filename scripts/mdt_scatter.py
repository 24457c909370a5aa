"""Scatter plot of MDT-dist students against the data and the teacher (docs/img/mdt_*.png).

    OMP_NUM_THREADS=1 python scripts/mdt_scatter.py docs/img/mdt_checkerboard.png --nfe 1 \
        --panel "teacher 25 steps=assets/checkerboard_teacher@25" --panel "VM only=runs/X" ...

Each ``--panel LABEL=RUN[@NFE]`` is ``n`` samples of the run from seed 1234 noise (the same noise
for every panel) at ``NFE`` (default ``--nfe``); the first panel is the run's exact data.
"""

from __future__ import annotations

import argparse

import torch

from flowdistill.api import load_run
from flowdistill.data.registry import build_dataset
from flowdistill.eval.plots import scatter_grid


def main() -> None:
    """Draw the panels."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--panel", action="append", required=True, help="LABEL=RUN[@NFE]")
    ap.add_argument("--nfe", type=int, default=1)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--title", default=None)
    a = ap.parse_args()
    panels: dict[str, torch.Tensor] = {}
    for spec in a.panel:
        label, _, where = spec.partition("=")
        run_dir, _, nfe = where.partition("@")
        run = load_run(run_dir)
        if not panels:
            data, _ = build_dataset(run.cfg.data).dataset.sample(a.n, torch.Generator().manual_seed(1241))
            panels["data"] = data
        panels[label] = run.sample(a.n, int(nfe or a.nfe), seed=1234)
    print(scatter_grid(panels, a.out, title=a.title))


if __name__ == "__main__":
    main()
