"""Sliced W2 of toy runs at several NFEs over the 5 evaluation seeds, in one process.

Each (run, seed) is exactly ``flowdistill eval RUN --nfe NFES --n N --seed S --out RUN/eval_seeds/S``
(the same :func:`flowdistill.eval.run_eval.evaluate_run`); the table gives mean ± std over the seeds
of sw2, its floor, and sw2 / (a reference's mean sw2 at ``--ref-nfe``) when ``--ref`` names one.

    OMP_NUM_THREADS=1 python scripts/mdt_eval_seeds.py runs/mdt_checkerboard --nfe 1,2 \
        --ref assets/checkerboard_teacher --ref-nfe 25
    OMP_NUM_THREADS=1 python scripts/mdt_eval_seeds.py runs/mdt_checkerboard --nfe 2,4 --sampler renoise

``--sampler`` sets an MDT run's multistep sampler (``distiller.sampler``: ``euler`` or ``renoise``)
for the sweep; the reference run is always sampled as it was trained.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

SEEDS = (1234, 1, 2, 3, 4)


def sweep(run_dir: str, nfes: list[int], n: int, out_root: Path,
          sampler: str | None = None) -> dict[int, list[dict]]:
    """``{nfe: [row per seed]}`` for one run (rows as in ``sweep.json``); ``sampler`` overrides
    the run's ``distiller.sampler`` (MDT runs only)."""
    from flowdistill.api import load_run
    from flowdistill.eval.run_eval import evaluate_run

    run = load_run(run_dir)
    if sampler is not None:
        if not hasattr(run.distiller.cfg, "sampler"):
            raise SystemExit(f"--sampler: {run_dir} is a {run.distiller.name} run, "
                             f"whose sampler has no such option")
        run.distiller.cfg.sampler = sampler
    rows: dict[int, list[dict]] = {k: [] for k in nfes}
    for s in SEEDS:
        out = out_root / str(s)
        out.mkdir(parents=True, exist_ok=True)
        evaluate_run(run, nfes, n, out, seed=s)
        for r in json.loads((out / "sweep.json").read_text()):
            rows[int(r["nfe"])].append(r)
    return rows


def _ms(v: list[float]) -> str:
    return f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}"


def main() -> None:
    """Print one markdown row per (run, NFE)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--nfe", default="1,2")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--ref", default=None, help="reference run (the teacher) for the ratio column")
    ap.add_argument("--ref-nfe", type=int, default=25)
    ap.add_argument("--sampler", default=None, choices=("euler", "renoise"),
                    help="MDT multistep sampler for the runs (default: each run's distiller.sampler)")
    a = ap.parse_args()
    nfes = [int(k) for k in a.nfe.split(",")]
    ref = None
    if a.ref:
        rr = sweep(a.ref, [a.ref_nfe], a.n, Path("/tmp/mdt_eval_seeds") / Path(a.ref).name)
        ref = statistics.mean(r["sw2"] for r in rr[a.ref_nfe])
        print(f"reference {a.ref} NFE {a.ref_nfe}: sw2 {_ms([r['sw2'] for r in rr[a.ref_nfe]])}")
    print("| run | NFE | sw2 (5 seeds) | floor | ratio to ref |")
    print("|---|---:|---:|---:|---:|")
    for run_dir in a.runs:
        tag = f"eval_seeds_{a.sampler}" if a.sampler else "eval_seeds"
        rows = sweep(run_dir, nfes, a.n, Path(run_dir) / tag, a.sampler)
        for k in nfes:
            sw2 = [r["sw2"] for r in rows[k]]
            ratio = f"{statistics.mean(sw2) / ref:.3f}" if ref else "—"
            name = f"{run_dir} ({a.sampler})" if a.sampler else run_dir
            print(f"| {name} | {k} | {_ms(sw2)} | {_ms([r['sw2_floor'] for r in rows[k]])} | {ratio} |",
                  flush=True)


if __name__ == "__main__":
    main()
