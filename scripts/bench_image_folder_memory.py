"""Peak memory of training on an image folder larger than memory (the lazy ``image_folder`` dataset).

Writes ``N`` smooth RGB PNGs (default 20 000 of 96×96: a few hundred MB on disk, 2.2 GB once
decoded to float32) into a temporary folder, then runs, each in a fresh subprocess:

- ``baseline`` — import flowdistill and build the tiny UNet, no data (the process's own floor);
- ``train`` — ``flowdistill.api.train`` with ``data.name=image_folder data.root=DIR`` for a few
  steps (tiny UNet, small batch, ``train.num_workers`` DataLoader workers);
- ``loader`` — ``make_loader`` over the folder with 2 workers for 50 batches (the data path alone);
- ``train`` again under ``RLIMIT_DATA`` (private writable memory per process) below the decoded
  size, which an in-memory dataset could not fit under;
- ``in_memory`` (``--control``, default on) — the former behaviour, ``image_folder_tensors``
  decoding the whole folder, under the same ``RLIMIT_DATA``: expected to fail.

Peak RSS is ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of each subprocess as seen from here (the
largest single process among it and its waited-for DataLoader workers), and the child's own and
its workers' peaks as it reports them. ``RLIMIT_AS`` is not used: CUDA builds of torch reserve
large address ranges at start.

    python scripts/bench_image_folder_memory.py              # N=20000, 96x96
    python scripts/bench_image_folder_memory.py --n 2000 --size 64 --keep /tmp/imgs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TINY_UNET = ["model.name=unet", "model.params.base_channels=8", "model.params.channel_mults=[1,2]",
             "model.params.num_res_blocks=1", "model.params.attention=false"]


def write_pngs(root: Path, n: int, size: int, seed: int = 0, chunk: int = 200) -> None:
    """``n`` smooth RGB images (a few random low-frequency cosines per channel) as PNG files."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    u = np.linspace(0.0, 1.0, size, dtype=np.float32)
    uu, vv = np.meshgrid(u, u, indexing="ij")
    root.mkdir(parents=True, exist_ok=True)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        img = np.full((m, 3, size, size), 0.5, dtype=np.float32)
        for _ in range(3):
            fx, fy = rng.uniform(-2, 2, (2, m, 3, 1, 1)).astype(np.float32)
            phase = rng.uniform(0, 2 * np.pi, (m, 3, 1, 1)).astype(np.float32)
            amp = rng.uniform(0.05, 0.2, (m, 3, 1, 1)).astype(np.float32)
            img += amp * np.cos(2 * np.pi * (fx * uu + fy * vv) + phase)
        pixels = (np.clip(img, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
        for i in range(m):
            Image.fromarray(pixels[i]).save(root / f"{start + i:06d}.png")


def folder_bytes(root: Path) -> int:
    """Total size of the files under ``root``."""
    return sum(p.stat().st_size for p in root.iterdir())


def tree_memory(pid: int) -> tuple[int, int]:
    """(sum of PSS, sum of RSS) in bytes of ``pid`` and all its descendants, from ``/proc``.

    PSS splits pages shared between processes (the forked DataLoader workers share the parent's
    libraries) among them, so its sum is the memory the tree really occupies; the RSS sum counts
    shared pages once per process.
    """
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = {pid}, [pid]
    while frontier:
        cur = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == cur and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    pss = rss = 0
    for q in tree:
        try:
            for line in Path(f"/proc/{q}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return pss, rss


def _report(extra: dict) -> None:
    """Print this process's and its children's peak RSS (MiB) as one JSON line."""
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps({"self_mib": me, "workers_mib": kids, **extra}), flush=True)


def child(mode: str, root: str, size: int, steps: int, batch: int, workers: int, out: str) -> None:
    """One measured run (in its own process)."""
    t0 = time.time()
    if mode == "baseline":
        import flowdistill.api  # noqa: F401  (everything the train run imports)
        from flowdistill.models import build_model

        build_model("unet", in_channels=3, sample_size=size, base_channels=8, channel_mults=[1, 2],
                    num_res_blocks=1, attention=False)
        _report({"seconds": time.time() - t0})
    elif mode == "train":
        from flowdistill.api import train
        from flowdistill.config import load_config

        cfg = load_config(None, [
            f"out_dir={out}", *TINY_UNET, "data.name=image_folder", f"data.root={root}",
            f"data.image_size={size}", f"train.steps={steps}", f"train.batch_size={batch}",
            f"train.num_workers={workers}", f"train.log_every={max(1, steps // 4)}", "train.ckpt_every=0",
            "train.trackers=none", "train.ema_decay=0.9"])
        run = train(cfg)
        recs = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        _report({"seconds": time.time() - t0, "steps": recs[-1]["step"] if recs else 0,
                 "last_loss": recs[-1].get("loss") if recs else None})
    elif mode == "loader":
        from types import SimpleNamespace

        from flowdistill.data.loader import BatchKey, make_loader
        from flowdistill.data.registry import build_dataset

        spec = SimpleNamespace(name="image_folder", root=root, image_size=size, conditional=False)
        src = build_dataset(spec)
        keys = [BatchKey(s, 0, 0, 1, batch) for s in range(steps)]
        total = 0.0
        for b in make_loader(src, keys, seed=0, num_workers=workers):
            total += float(b["x"].mean())
        _report({"seconds": time.time() - t0, "batches": len(keys), "checksum": total})
    elif mode == "in_memory":  # the former behaviour: decode the whole folder into one tensor
        from flowdistill.data.images import image_folder_tensors

        x, _ = image_folder_tensors(root, size)
        _report({"seconds": time.time() - t0, "decoded_mib": x.numel() * 4 / 2**20})
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def measure(mode: str, root: Path, args: argparse.Namespace, steps: int, data_cap: int | None = None) -> dict:
    """Run one child; its peak RSS from getrusage(RUSAGE_CHILDREN) before/after, and its report."""
    out = tempfile.mkdtemp(prefix=f"bench_{mode}_")
    cmd = [sys.executable, __file__, "--child", mode, "--root", str(root), "--size", str(args.size),
           "--steps", str(steps), "--batch", str(args.batch), "--workers", str(args.workers), "--out", out]

    def limit() -> None:
        if data_cap is not None:
            resource.setrlimit(resource.RLIMIT_DATA, (data_cap, data_cap))

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    # RUSAGE_CHILDREN's ru_maxrss is a maximum over all waited-for children: run each child from a
    # fresh intermediate process so that earlier children do not mask this one's peak
    wrapper = ("import resource, subprocess, sys, json;"
               "r = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True);"
               "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr);"
               "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
               "sys.exit(r.returncode)")
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        proc = subprocess.Popen([sys.executable, "-c", wrapper, json.dumps(cmd)], stdout=so, stderr=se,
                                text=True, env=env, preexec_fn=limit)
        tree_pss = tree_rss = 0
        while proc.poll() is None:
            pss, rss = tree_memory(proc.pid)
            tree_pss, tree_rss = max(tree_pss, pss), max(tree_rss, rss)
            time.sleep(0.2)
        so.seek(0)
        se.seek(0)
        r = subprocess.CompletedProcess(proc.args, proc.returncode, so.read(), se.read())
    shutil.rmtree(out, ignore_errors=True)
    res: dict = {"mode": mode, "rc": r.returncode, "wall_s": time.time() - t0,
                 "cap_mib": data_cap / 2**20 if data_cap else None,
                 "tree_pss_mib": tree_pss / 2**20, "tree_rss_mib": tree_rss / 2**20}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            res.update(json.loads(line[7:]))
        elif line.startswith("PEAK "):
            res["peak_mib"] = int(line.split()[1]) / 1024
    if r.returncode != 0:
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        res["error"] = tail[-1] if tail else f"exit {r.returncode}"
    return res


def main() -> None:
    """Generate the folder, run the measurements, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="number of images")
    ap.add_argument("--size", type=int, default=96, help="image side (RGB, float32 decoded)")
    ap.add_argument("--steps", type=int, default=20, help="training steps")
    ap.add_argument("--loader-batches", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8, help="global batch size")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the children")
    ap.add_argument("--cap-gb", type=float, default=1.5, help="RLIMIT_DATA of the capped run (GiB)")
    ap.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                    help="also decode the whole folder in memory under the same RLIMIT_DATA (should fail)")
    ap.add_argument("--keep", type=Path, default=None, help="write (or reuse) the images here and keep them")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.root, args.size, args.steps, args.batch, args.workers, args.out)
        return

    tmp = None
    if args.keep is not None:
        root = args.keep
    else:
        tmp = tempfile.mkdtemp(prefix="bench_image_folder_")
        root = Path(tmp) / "images"
    try:
        if not (root.is_dir() and len(list(root.glob("*.png"))) == args.n):
            t0 = time.time()
            write_pngs(root, args.n, args.size)
            print(f"wrote {args.n} PNGs of {args.size}x{args.size} in {time.time() - t0:.0f} s", flush=True)
        disk = folder_bytes(root)
        decoded = args.n * 3 * args.size * args.size * 4
        cap = int(args.cap_gb * 2**30)
        runs = [measure("baseline", root, args, 0),
                measure("train", root, args, args.steps),
                measure("loader", root, args, args.loader_batches),
                measure("train", root, args, args.steps, data_cap=cap)]
        if args.control:
            runs.append(measure("in_memory", root, args, 0, data_cap=cap))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nimage folder: {args.n} PNGs, 3x{args.size}x{args.size}; {disk / 2**20:.0f} MiB on disk; "
          f"decoded float32 {decoded / 2**20:.0f} MiB; batch {args.batch}, {args.workers} workers, "
          f"OMP_NUM_THREADS={args.threads}")
    print("| run | RLIMIT_DATA | rc | work | ru_maxrss (RUSAGE_CHILDREN) | main process | largest worker "
          "| peak PSS, whole tree | peak PSS / decoded | wall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        work = {"baseline": "import + build UNet", "train": f"api.train {r.get('steps', '?')} steps",
                "loader": f"make_loader {r.get('batches', '?')} batches",
                "in_memory": "image_folder_tensors (all decoded)"}[r["mode"]]
        cap_s = f"{r['cap_mib']:.0f} MiB" if r["cap_mib"] else "none"
        nan = float("nan")
        peak, me, kid = r.get("peak_mib", nan), r.get("self_mib", nan), r.get("workers_mib", nan)
        tree = r["tree_pss_mib"]
        print(f"| {r['mode']} | {cap_s} | {r['rc']} | {work} | {peak:.0f} MiB | {me:.0f} MiB | {kid:.0f} MiB "
              f"| {tree:.0f} MiB | {tree * 2**20 / decoded:.2f} | {r['wall_s']:.0f} s |")
        if "error" in r:
            print(f"|   error: {r['error'][:200]} |")


if __name__ == "__main__":
    main()
