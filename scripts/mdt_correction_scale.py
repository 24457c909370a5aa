"""How large MDT-dist's VM correction ``t·N(dv/dt)`` is against the teacher velocity, by dimension.

At the start of training (student = teacher) on data points ``x_t = (1 − t)·x + t·ε`` with the
official times (logit-normal(1, 1) in ``[Δ + σmin, 1]``), the online one-sided difference along one
teacher step ``Δ = 0.01`` is normalised as ``dvdt_norm`` says (``c = 0.1``) and the per-sample
ratio ``‖t·N(dv/dt)‖ / ‖v_T‖`` is summarised (median and 90th percentile over 1024 points).
The public code's L2 form bounds ``‖N‖ < 1`` while ``‖v_T‖ ≈ √D``: the ratio falls like ``1/√D``.

    OMP_NUM_THREADS=1 python scripts/mdt_correction_scale.py
"""

from __future__ import annotations

import torch

from flowdistill.api import load_run
from flowdistill.data.registry import _take, build_dataset
from flowdistill.distillers.mdt import MDT, MDTConfig

PROBLEMS = {"checkerboard (D = 2)": "assets/checkerboard_teacher", "digits (D = 64)": "assets/digits_teacher"}


def ratios(run_dir: str, norm: str, n: int = 1024, c: float = 0.1) -> torch.Tensor:
    """Per-sample ``‖t·N(dv/dt)‖ / ‖v_T‖`` for the teacher ``run_dir`` as its own student."""
    run = load_run(run_dir)
    net = run.student.eval()
    x = _take(build_dataset(run.cfg.data), n, 0).float()
    cfg = MDTConfig(dvdt_norm=norm, dvdt_c=c)
    d = MDT(cfg, net, net)
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(x.shape, generator=g)
    t = d.times(n, g)
    tb = t.reshape(-1, *([1] * (x.ndim - 1)))
    x_t = (1 - tb) * x + tb * eps
    cond = torch.full((n,), d.num_classes, dtype=torch.long) if d.num_classes else None
    with torch.no_grad():
        v = net(x_t, t, cond=cond)
        _, corr = d.vm_target(x_t, t, cond, v)  # t·N(dv/dt)
    corr = corr.reshape(n, -1).norm(dim=1)
    return corr / v.reshape(n, -1).norm(dim=1)


def main() -> None:
    """Print the table of docs/mdt.md."""
    print("| problem | dvdt_norm | median ratio | 90th pct |")
    print("|---|---|---:|---:|")
    for name, run_dir in PROBLEMS.items():
        for norm in ("l2", "rms", "none"):
            r = ratios(run_dir, norm)
            print(f"| {name} | {norm} | {float(r.median()):.4f} | {float(r.quantile(0.9)):.4f} |", flush=True)


if __name__ == "__main__":
    main()
