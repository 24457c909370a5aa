"""Solver overhead: Euler at NFE 32 vs 32 bare forward passes vs torchdiffeq's fixed-grid Euler.

Run: ``python scripts/bench_solvers.py [--batch 4096] [--nfe 32] [--repeats 15]``.
All three are timed in the same run, interleaved, and reported as medians and ratios (this
machine is noisy: ratios are what to read).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flowdistill.core.sampling import sample_velocity
from flowdistill.models import MLPFlowNet


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    """Print a markdown table of medians and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--nfe", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    args = ap.parse_args()
    import torchdiffeq

    net = MLPFlowNet(hidden=args.hidden, depth=args.depth).eval()
    x = torch.randn(args.batch, 2)
    grid = torch.linspace(1.0, 0.0, args.nfe + 1)
    tvec = [grid[i].expand(args.batch) for i in range(args.nfe)]

    def bare():
        for t in tvec:
            net(x, t)

    def ours():
        sample_velocity(net, x, args.nfe, "euler")

    def tdq():
        torchdiffeq.odeint(lambda t, y: net(y, t.expand(y.shape[0])), x, grid, method="euler")

    fns = {"bare forwards": bare, "flowdistill euler": ours, "torchdiffeq euler": tdq}
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():  # warm-up
            f()
        for _ in range(args.repeats):
            for k, f in fns.items():
                times[k].append(_time(f))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["bare forwards"]
    print(f"MLP {args.hidden}x{args.depth}, batch {args.batch}, NFE {args.nfe}, "
          f"threads {torch.get_num_threads()}, median of {args.repeats}\n")
    print("| run | median ms | ratio to bare forwards |")
    print("|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v * 1e3:.1f} | {v / base:.3f} |")
    print(f"\nflowdistill / torchdiffeq: {med['flowdistill euler'] / med['torchdiffeq euler']:.3f}")


if __name__ == "__main__":
    main()
