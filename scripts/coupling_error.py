"""Trajectory preservation of few-step students: mean ‖student(ε) − teacher ODE(ε)‖ per NFE
(:mod:`flowdistill.eval.coupling`), mean ± std over evaluation seeds, beside the teacher's own
Euler sampler at the same NFE.

    OMP_NUM_THREADS=1 python scripts/coupling_error.py --teacher assets/checkerboard_teacher \
        --run LCM=runs/lcm_checkerboard --run PCM=runs/pcm_checkerboard --nfe 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from flowdistill.api import load_run
from flowdistill.core.sampling import sample_velocity
from flowdistill.eval.coupling import coupling_error, teacher_ode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--run", action="append", default=[], help="LABEL=RUN_DIR (repeatable)")
    p.add_argument("--nfe", default="1,2,4,8")
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--ref-steps", type=int, default=512)
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    nfes = [int(v) for v in a.nfe.split(",")]
    teacher = load_run(a.teacher)
    runs = {lab: load_run(path) for lab, path in (r.rsplit("=", 1) for r in a.run)}
    per: dict[str, dict[int, list[float]]] = {}
    for seed in range(a.seeds):
        g = torch.Generator().manual_seed(10_000 + seed)
        noise = torch.randn(a.n, *teacher_shape(teacher), generator=g)
        ref = teacher_ode(teacher.student, noise, a.ref_steps)
        rows = {"teacher Euler": coupling_error(
            lambda z, k: sample_velocity(teacher.student, z, k, "euler").x, ref, noise, nfes)}
        for lab, run in runs.items():
            rows[lab] = coupling_error(lambda z, k, run=run: run.distiller.sample(z, k, model=run.student),
                                       ref, noise, nfes)
        for lab, errs in rows.items():
            for k, v in errs.items():
                per.setdefault(lab, {}).setdefault(k, []).append(v)
    table = {lab: {k: (statistics.mean(v), statistics.pstdev(v)) for k, v in d.items()}
             for lab, d in per.items()}
    print(f"mean ‖S(ε) − ODE_T(ε)‖ (teacher ODE: {a.ref_steps} Euler steps), n={a.n}, {a.seeds} seeds")
    print("| model | " + " | ".join(f"NFE {k}" for k in nfes) + " |")
    print("|---|" + "---|" * len(nfes))
    for lab, d in table.items():
        print(f"| {lab} | " + " | ".join(f"{d[k][0]:.4f} ± {d[k][1]:.4f}" for k in nfes) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({lab: {str(k): v for k, v in d.items()} for lab, d in table.items()}, f, indent=1)
    return 0


def teacher_shape(run) -> tuple[int, ...]:
    """The sample shape of the teacher's data."""
    from flowdistill.data.registry import sample_shape_of

    return tuple(sample_shape_of(run.cfg.data))


if __name__ == "__main__":
    raise SystemExit(main())
