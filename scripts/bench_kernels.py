"""Benchmark the fused ops (``flowdistill.kernels``) against eager torch, and few-step DiT sampling.

For each op and tensor size it times the dispatch API (Triton on CUDA, the torch reference on CPU)
against the eager torch expression a user would write (e.g. ``x + dt*(vu + w*(vc - vu))``) and
reports effective bandwidth (bytes read + written once, per call), that bandwidth as a fraction
of ``y.copy_(x)`` bandwidth at the same size, and the speed-up. It then measures 1/2/4-step
flow-map sampling throughput of a small two-time DiT, eagerly and (on CUDA) replayed as a CUDA
graph through :class:`flowdistill.kernels.GraphedSampler`.

On CPU the sizes are capped (default 1, 8, 64 MB per tensor) and the table compares the dispatch
API's torch path with the eager expression (its overhead); GPU numbers are absent there.

Usage::

    python scripts/bench_kernels.py [--sizes-mb 1 16 256] [--dtype fp32|bf16|fp16] [--json out.json]
                                    [--threads N] [--no-dit] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from flowdistill import kernels as K

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_SIZES_MB = (1, 4, 16, 64, 256, 1024)
CPU_SIZES_MB = (1, 8, 64)
MB = 2**20


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(fns: list[Callable[[], object]], device: torch.device, repeats: int,
              min_run_s: float) -> list[float]:
    """Median seconds per call of each callable, measured interleaved after warm-up.

    Each callable is warmed up, then the number of calls per timed run is chosen so a run lasts
    at least ``min_run_s``; runs of the callables alternate ``repeats`` times and the median of
    the per-call times is returned.
    """
    counts = []
    for fn in fns:
        fn()
        fn()
        _sync(device)
        n = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            dt = time.perf_counter() - t0
            if dt >= min_run_s or n >= 1 << 16:
                break
            n = max(n * 2, int(n * min_run_s / max(dt, 1e-9)) + 1)
        counts.append(n)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(counts[i]):
                fn()
            _sync(device)
            samples[i].append((time.perf_counter() - t0) / counts[i])
    return [statistics.median(s) for s in samples]


@dataclass
class OpRow:
    """One (op, size) measurement."""

    op: str
    size_mb: float
    tensors: int  # tensors read + written per call
    fused_us: float
    eager_us: float
    fused_gbs: float
    eager_gbs: float
    copy_gbs: float
    fused_frac_copy: float
    speedup: float
    path: str


def _ops(x: torch.Tensor, B: int) -> list[tuple[str, int, Callable, Callable]]:
    """(name, tensors moved, fused call, eager call) for every op on inputs shaped like ``x``."""
    r = lambda: torch.randn_like(x)  # noqa: E731
    k1, k2, k3, k4 = r(), r(), r(), r()
    shp = (B,) + (1,) * (x.ndim - 1)
    t = torch.rand(B, device=x.device)
    s = t * 0.5
    tb, sb = t.view(shp), s.view(shp)
    a, sg, da, ds = 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    ab, sgb, dab, dsb = a.view(shp), sg.view(shp), da.view(shp), ds.view(shp)
    dt, w = -0.25, 4.0
    return [
        ("euler_step", 3, lambda: K.euler_step(x, k1, dt), lambda: x + dt * k1),
        ("heun (lincomb 2)", 4, lambda: K.lincomb(x, [k1, k2], [0.5 * dt, 0.5 * dt]),
         lambda: x + 0.5 * dt * (k1 + k2)),
        ("rk4 (lincomb 4)", 6, lambda: K.lincomb(x, [k1, k2, k3, k4], [dt / 6, dt / 3, dt / 3, dt / 6]),
         lambda: x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)),
        ("cfg_combine", 3, lambda: K.cfg_combine(k1, k2, w), lambda: k1 + w * (k2 - k1)),
        ("guided_euler_step", 4, lambda: K.guided_euler_step(x, k1, k2, w, dt),
         lambda: x + dt * (k1 + w * (k2 - k1))),
        ("flow_map_jump [B] t,s", 3, lambda: K.flow_map_jump(x, k1, t, s), lambda: x + (sb - tb) * k1),
        ("affine_sample_and_target [B]", 4, lambda: K.affine_sample_and_target(x, k1, a, sg, da, ds),
         lambda: (ab * x + sgb * k1, dab * x + dsb * k1)),
        ("linear_sample_and_target [B]", 4, lambda: K.linear_sample_and_target(x, k1, t),
         lambda: ((1 - tb) * x + tb * k1, k1 - x)),
    ]


def _ema_pair(numel: int, dtype: torch.dtype, device: torch.device):
    """EMA over 64 parameter tensors totalling ``numel`` elements: foreach vs a per-tensor loop."""
    n = 64
    sizes = [numel // n + (1 if i < numel % n else 0) for i in range(n)]
    ema = [torch.randn(k, dtype=dtype, device=device) for k in sizes]
    par = [torch.randn(k, dtype=dtype, device=device) for k in sizes]
    d = 0.999

    def loop():
        for e, p in zip(ema, par, strict=True):
            e.mul_(d).add_(p, alpha=1 - d)

    return (lambda: K.ema_update_(ema, par, d)), loop


def bench_ops(device: torch.device, dtype: torch.dtype, sizes_mb, repeats: int,
              min_run_s: float) -> list[OpRow]:
    """Time every op at every size against its eager expression and ``copy_``."""
    rows = []
    el = torch.tensor([], dtype=dtype).element_size()
    for mb in sizes_mb:
        numel = int(mb * MB) // el
        B = 8
        inner = max(numel // B, 1)
        side = int(math.sqrt(inner // 4)) or 1
        shape = (B, 4, side, inner // (4 * side)) if inner >= 4 else (B, inner)
        x = torch.randn(shape, dtype=dtype, device=device)
        nbytes = x.numel() * el
        y = torch.empty_like(x)
        (t_copy,) = time_pair([lambda x=x, y=y: y.copy_(x)], device, repeats, min_run_s)
        copy_gbs = 2 * nbytes / t_copy / 1e9
        path = K.resolve(x, x)
        entries = [(n, m, f, e) for n, m, f, e in _ops(x, B)]
        entries.append(("ema_update_ (64 tensors)", 3, *_ema_pair(x.numel(), dtype, device)))
        for name, moved, fused, eager in entries:
            tf, te = time_pair([fused, eager], device, repeats, min_run_s)
            byt = moved * nbytes
            rows.append(OpRow(name, nbytes / MB, moved, tf * 1e6, te * 1e6, byt / tf / 1e9, byt / te / 1e9,
                              copy_gbs, byt / tf / 1e9 / copy_gbs, te / tf,
                              "foreach" if name.startswith("ema") else path))
        del x, y, entries
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


@dataclass
class SampleRow:
    """Few-step sampling throughput of the DiT."""

    batch: int
    steps: int
    eager_ms: float
    graph_ms: float | None
    eager_samples_s: float
    graph_samples_s: float | None
    graph_speedup: float | None
    note: str


def bench_sampling(device: torch.device, repeats: int, min_run_s: float) -> tuple[list[SampleRow], str]:
    """1/2/4 flow-map jumps of a small two-time DiT, eager vs CUDA graph (CUDA only)."""
    try:
        from flowdistill.models.dit import DiTFlowNet
    except Exception as e:  # the model may not exist yet in this checkout
        return [], f"DiT sampling skipped: flowdistill.models.dit not importable ({type(e).__name__}: {e})"
    from flowdistill.kernels import GraphedSampler

    if device.type == "cuda":
        cfg = dict(sample_size=32, in_channels=4, patch_size=2, hidden=256, depth=6, heads=4, two_time=True)
        batches = (8, 64)
    else:
        cfg = dict(sample_size=16, in_channels=1, patch_size=2, hidden=64, depth=2, heads=4, two_time=True)
        batches = (8,)
    try:
        net = DiTFlowNet(**cfg).to(device).eval()
    except Exception as e:
        return [], f"DiT sampling skipped: DiTFlowNet({cfg}) failed ({type(e).__name__}: {e})"
    with torch.no_grad():  # warm the model up (allocator, kernels) before any timing
        z = torch.randn(batches[0], cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], device=device)
        tt = torch.ones(batches[0], device=device)
        for _ in range(3):
            net(z, tt, tt * 0.5)
    rows = []
    desc = f"DiTFlowNet({', '.join(f'{k}={v}' for k, v in cfg.items())})"
    for B in batches:
        noise = torch.randn(B, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], device=device)
        for steps in (1, 2, 4):
            grid = [torch.full((B,), 1 - i / steps, device=device) for i in range(steps + 1)]

            def sample(z, grid=grid, steps=steps):
                x = z
                for i in range(steps):
                    x = K.flow_map_jump(x, net(x, grid[i], grid[i + 1]), grid[i], grid[i + 1])
                return x

            def eager(sample=sample, noise=noise):
                with torch.no_grad():
                    return sample(noise)

            graph_ms = graph_sps = speed = None
            note = "eager only (CPU: no CUDA graphs)"
            if device.type == "cuda":
                g = GraphedSampler(sample)
                g.capture(noise)
                if g.graphed:
                    same = torch.allclose(g(noise), eager(), rtol=1e-4, atol=1e-4)
                    te, tg = time_pair([eager, lambda g=g, noise=noise: g(noise)], device, repeats, min_run_s)
                    graph_ms, graph_sps, speed = tg * 1e3, B / tg, te / tg
                    note = "graph replay" + ("" if same else " (OUTPUT DIFFERS FROM EAGER)")
                else:
                    (te,) = time_pair([eager], device, repeats, min_run_s)
                    note = f"capture failed: {g.failure}"[:80]
            else:
                (te,) = time_pair([eager], device, repeats, min_run_s)
            rows.append(SampleRow(B, steps, te * 1e3, graph_ms, B / te, graph_sps, speed, note))
    return rows, desc


def _fmt(v, spec=".2f") -> str:
    return "–" if v is None else format(v, spec)


def print_tables(rows: list[OpRow], srows: list[SampleRow], sdesc: str, device: torch.device,
                 dtype_name: str) -> None:
    """Markdown tables on stdout."""
    gpu = device.type == "cuda"
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    dev = torch.cuda.get_device_name(device) if gpu else cpu
    print(f"## Fused elementwise ops — {dev}, {dtype_name}, torch {torch.__version__}\n")
    if not gpu:
        print("No CUDA GPU: sizes capped at 64 MB per tensor; 'fused' is the dispatch API's torch path "
              "(reference), so the ratio measures dispatch overhead vs eager composition. "
              "GPU numbers (Triton bandwidth, CUDA graphs) are absent.\n")
    print("GB/s counts each tensor read or written once (tensors column × size). "
          "'% copy' = fused GB/s over `y.copy_(x)` GB/s at that size.\n")
    print("| op | MB/tensor | tensors | path | fused µs | eager µs | fused GB/s | eager GB/s | copy GB/s "
          "| % copy | speed-up |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.op} | {r.size_mb:.0f} | {r.tensors} | {r.path} | {r.fused_us:.1f} | {r.eager_us:.1f} | "
              f"{r.fused_gbs:.1f} | {r.eager_gbs:.1f} | {r.copy_gbs:.1f} | {100 * r.fused_frac_copy:.0f}% | "
              f"{r.speedup:.2f}× |")
    print()
    if not srows:
        print(sdesc + "\n")
        return
    print(f"## Few-step flow-map sampling — {sdesc}\n")
    print("| batch | steps | eager ms | graph ms | eager samples/s | graph samples/s | graph speed-up "
          "| note |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in srows:
        print(f"| {r.batch} | {r.steps} | {r.eager_ms:.2f} | {_fmt(r.graph_ms)} | {r.eager_samples_s:.0f} | "
              f"{_fmt(r.graph_samples_s, '.0f')} | {_fmt(r.graph_speedup)}{'×' if r.graph_speedup else ''} | "
              f"{r.note} |")
    print()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmarks, print markdown (and optionally write JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=None,
                    help=f"tensor sizes in MB (default GPU {GPU_SIZES_MB}, CPU {CPU_SIZES_MB})")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default on CPU: 1, for stable ratios on shared machines; "
                         "0 keeps torch's default)")
    ap.add_argument("--no-dit", action="store_true", help="skip the DiT sampling benchmark")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    sizes = args.sizes_mb or (GPU_SIZES_MB if gpu else CPU_SIZES_MB)
    if not gpu and max(sizes) > 64:
        print(f"note: capping CPU sizes at 64 MB (asked for {max(sizes):g} MB)", file=sys.stderr)
        sizes = [s for s in sizes if s <= 64] or [64]
    threads = args.threads if args.threads is not None else (0 if gpu else 1)
    if threads > 0:
        torch.set_num_threads(threads)
    min_run_s = 0.02 if gpu else 0.05
    torch.manual_seed(0)
    t0 = time.perf_counter()
    rows = bench_ops(device, DTYPES[args.dtype], sizes, args.repeats, min_run_s)
    srows, sdesc = ([], "DiT sampling skipped (--no-dit)") if args.no_dit else \
        bench_sampling(device, args.repeats, min_run_s)
    print_tables(rows, srows, sdesc, device, args.dtype)
    print(f"(benchmark wall time {time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "gpu": torch.cuda.get_device_name(device) if gpu else None,
                       "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "ops": [asdict(r) for r in rows], "sampling": [asdict(r) for r in srows],
                       "sampling_model": sdesc}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
