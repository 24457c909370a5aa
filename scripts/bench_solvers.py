"""Solver overhead: flowdistill's Euler against the fastest plain Euler loop and torchdiffeq's Euler.

Run: ``python scripts/bench_solvers.py [--batch 4096] [--nfe 32] [--repeats 15] [--threads 1]``.

The three runs do the same work on the same tensors (a ``MLPFlowNet``, fp32, the same noise and
the same uniform grid from t = 1 to 0 with ``nfe`` steps), under the same autograd mode (``--mode``,
default ``inference``: all three run inside one ``torch.inference_mode()``; ``sample_velocity``'s
own ``no_grad`` does not leave it):

- **floor**: the fastest plain loop, ``y.add_(net(y, t_i), alpha=dt_i)`` with the time vectors,
  the step sizes and the state allocated before the clock starts: nothing but the network calls
  and one in-place axpy per step. A sampler cannot do less work, so its ratio to this is its
  overhead (target ≤ 1.03).
- **flowdistill euler**: ``sample_velocity(net, x, nfe, "euler")`` (grid building, the solver loop,
  the kernel dispatch) from scratch each call.
- **torchdiffeq euler**: ``torchdiffeq.odeint(..., method="euler")`` on the same grid (fixed
  steps, same NFE).

The repeats are interleaved (floor, flowdistill, torchdiffeq, floor, ...) after one warm-up
each, and each run's median is reported with the ratios of medians and the "paired" ratios (the
median over repeats of this repeat's time over the floor's, or torchdiffeq's, time in the same
repeat: neighbours in time share the machine's load, so these are the ones to read on a shared
machine). The
final states are compared, so a run that skipped work would show. ``--clock cpu`` times with
``time.process_time`` (this process's CPU time: less sensitive to other processes on a loaded
machine, meaningful with ``--threads 1``).

A second table isolates the machinery: the same three loops around a *null field* (returns a
preallocated velocity, no arithmetic), timed over many calls, give each sampler's own cost per
step in microseconds; its difference to the floor's, times NFE, over the floor's time with the
real network is the overhead share that the first table's ratio measures with noise.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from flowdistill.core.sampling import sample_velocity
from flowdistill.models import MLPFlowNet


def _timed(fn: Callable[[], torch.Tensor], clock: Callable[[], float]) -> tuple[float, torch.Tensor]:
    """Seconds one call of ``fn`` takes on ``clock``, and its result."""
    t0 = clock()
    out = fn()
    return clock() - t0, out


NULL_CALLS = 200


def _null_field_costs(x: torch.Tensor, grid: torch.Tensor, tvec: list[torch.Tensor], dts: list[float],
                      repeats: int) -> dict[str, float]:
    """Median µs per solve of the three loops around a field that only returns a fixed tensor."""
    import torchdiffeq

    v = torch.randn_like(x)
    state = torch.empty_like(x)

    def null(y: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return v

    def floor() -> torch.Tensor:
        y = state.copy_(x)
        for t, dt in zip(tvec, dts, strict=True):
            y.add_(null(y, t), alpha=dt)
        return y

    fns = {
        "floor (plain loop)": floor,
        "flowdistill euler": lambda: sample_velocity(null, x, len(tvec), "euler").x,
        "torchdiffeq euler": lambda: torchdiffeq.odeint(lambda t, y: null(y, t.expand(y.shape[0])), x, grid,
                                                        method="euler"),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(NULL_CALLS):
                f()
            times[k].append((time.perf_counter() - t0) / NULL_CALLS * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    """Print a markdown table of medians and ratios to the floor and to torchdiffeq."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--nfe", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--mode", choices=("inference", "no_grad"), default="inference",
                    help="the autograd mode all three runs share")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()
    import torchdiffeq

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.manual_seed(0)
    net = MLPFlowNet(hidden=args.hidden, depth=args.depth).eval().requires_grad_(False)
    x = torch.randn(args.batch, 2)
    grid = torch.linspace(1.0, 0.0, args.nfe + 1)
    # the floor's loop state, built before the clock: per-step [B] time vectors and float steps
    tvec = [grid[i].expand(args.batch) for i in range(args.nfe)]
    dts = (grid[1:].double() - grid[:-1].double()).tolist()
    state = torch.empty_like(x)

    def floor() -> torch.Tensor:
        y = state.copy_(x)
        for t, dt in zip(tvec, dts, strict=True):
            y.add_(net(y, t), alpha=dt)
        return y.clone()

    def ours() -> torch.Tensor:
        return sample_velocity(net, x, args.nfe, "euler").x

    def tdq() -> torch.Tensor:
        return torchdiffeq.odeint(lambda t, y: net(y, t.expand(y.shape[0])), x, grid, method="euler")[-1]

    fns = {"floor (plain loop)": floor, "flowdistill euler": ours, "torchdiffeq euler": tdq}
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict[str, torch.Tensor] = {}
    mode = torch.inference_mode() if args.mode == "inference" else torch.no_grad()
    with mode:
        for k, f in fns.items():  # warm-up (allocator, first-call dispatch)
            outs[k] = f()
        for _ in range(args.repeats):
            for k, f in fns.items():
                times[k].append(_timed(f, clock)[0])
        null_us = _null_field_costs(x, grid, tvec, dts, args.repeats)
    ref = outs["floor (plain loop)"]
    diffs = {k: (v - ref).abs().max().item() for k, v in outs.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    base, tdq_med = med["floor (plain loop)"], med["torchdiffeq euler"]
    print(f"MLPFlowNet {args.hidden}x{args.depth}, batch {args.batch}, fp32, NFE {args.nfe}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.mode} mode, "
          f"{args.clock} clock, median of {args.repeats} interleaved repeats\n")
    floor_t, tdq_t = times["floor (plain loop)"], times["torchdiffeq euler"]
    print("| run | median ms | min ms | × floor | × torchdiffeq | × floor, paired | × torchdiffeq, paired "
          "| max abs diff to floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for k, v in med.items():
        paired_floor = statistics.median(a / b for a, b in zip(times[k], floor_t, strict=True))
        paired_tdq = statistics.median(a / b for a, b in zip(times[k], tdq_t, strict=True))
        print(f"| {k} | {v * 1e3:.1f} | {min(times[k]) * 1e3:.1f} | {v / base:.3f} | {v / tdq_med:.3f} "
              f"| {paired_floor:.3f} | {paired_tdq:.3f} | {diffs[k]:.1e} |")
    print(f"\nNull field (the loop machinery alone; median of {args.repeats} × {NULL_CALLS} calls, wall "
          "clock):\n")
    print("| run | µs per solve | µs per step over the floor | overhead share with the network |")
    print("|---|---:|---:|---:|")
    for k, us in null_us.items():
        extra = us - null_us["floor (plain loop)"]
        print(f"| {k} | {us:.1f} | {extra / args.nfe:.2f} | {extra * 1e-6 / base:.2e} |")


if __name__ == "__main__":
    main()
