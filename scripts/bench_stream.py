"""StreamDiT benchmark on the built-in bouncing digits (docs/streamdit.md, issue #16).

Rows (each a trained run, streamed with its own sampling partition; teachers with Heun, 2 network
evaluations a step, unless the row says Euler):

* ``baseline: non-overlapping chunks`` — the mixed model streamed with one chunk of 8 frames
  ([c, s] = [8, 16]), and the full-sequence model (``configs/streamdit_full_sequence.yaml``): chunk
  after chunk, each conditioned on the last K = 2 emitted frames as clean references only (no
  overlap in noise levels);
* ``single partition`` (``configs/streamdit_single.yaml``) and ``mixed partitions``
  (``configs/streamdit_mixed.yaml``), streamed with [c, s] = [2, 4]; the mixed teacher also with
  Euler (16 evaluations a pass), where long streams lose their digits;
* ``distilled student`` (``configs/streamdit_distill.yaml``, 4 Heun micro-steps as the target): one
  call per chunk interval; and the student of the earlier Euler target and the student of the
  consistency objective (``configs/streamdit_distill_consistency.yaml``): the target ablations;
* ``mixed partitions + error recycling`` (``configs/streamdit_recycle.yaml``);
* ``mixed partitions, [4, 4]``: the mixed teacher streamed with N = 2 chunks of 4 frames (the
  partition that keeps its digits over 512 frames), and its student
  (``configs/streamdit_distill_c4.yaml``, 2 calls a pass);
* ``diagonal (c = s = 1)`` (``configs/streamdit_diagonal.yaml``): the rolling limiting case, one
  frame per chunk, one grid step per chunk interval.

For each: ``--streams`` streams of ``--frames`` frames (≥ 1000 frames in all) scored by
:func:`flowdistill.eval.video_metrics.video_report` against as many real frames (test-split
digits), with chunk boundaries marked; ``--long-streams`` streams of ``--long-frames`` frames for
the stability check (frames 400–512 vs 0–112: frame FID, position error, ink per frame); frames
per network call (per stream; the calls are batched over the streams) and frames per second of
the whole batch on this CPU. Writes ``OUT.md`` and ``OUT.json``, and the teacher / student GIFs.

    OMP_NUM_THREADS=1 python scripts/bench_stream.py --jobs 2 --out docs/streamdit_bench
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from flowdistill.api import load_run
from flowdistill.data.bouncing_digits import reference_clips
from flowdistill.eval.video_io import save_gif
from flowdistill.eval.video_metrics import video_report

#: (label, run, streamed partition [c, s] or None = the run's own, teacher solver or None = the run's).
ROWS = (("baseline: non-overlapping chunks, mixed model", "runs/streamdit_mixed", (8, 16), "heun"),
        ("baseline: non-overlapping chunks, full-sequence model", "runs/streamdit_full_sequence", None,
         "heun"),
        ("single partition", "runs/streamdit_single", None, "heun"),
        ("mixed partitions, Euler", "runs/streamdit_mixed", None, "euler"),
        ("mixed partitions", "runs/streamdit_mixed", (2, 4), "heun"),
        ("distilled student", "runs/streamdit_distill", None, None),
        ("mixed partitions, [4, 4]", "runs/streamdit_mixed", (4, 4), "heun"),
        ("distilled student, [4, 4]", "runs/streamdit_distill_c4", None, None),
        ("diagonal (c = s = 1)", "runs/streamdit_diagonal", None, "heun"),
        ("distilled student, Euler target", "runs/streamdit_distill_euler", None, None),
        ("distilled student, consistency objective", "runs/streamdit_distill_consistency", None, None),
        ("mixed partitions + error recycling", "runs/streamdit_recycle", None, "heun"))
#: GIF file per row label (the README's teacher / student streams).
GIFS = {"mixed partitions": "stream_teacher.gif", "distilled student": "stream_student.gif",
        "mixed partitions, [4, 4]": "stream_teacher_c4.gif",
        "distilled student, [4, 4]": "stream_student_c4.gif"}


def boundaries(frames: int, chunk: int) -> torch.Tensor:
    """``[frames − 1]`` bool: transition ``f → f + 1`` crosses a chunk boundary (``(f + 1) % c == 0``)."""
    return (torch.arange(1, frames) % chunk) == 0


def stream_run(run, n: int, frames: int, seed: int, partition=None, solver=None) -> tuple[torch.Tensor, dict]:
    """Stream ``n × frames`` from a loaded run; the clips and the speed figures (calls = network
    evaluations: a Heun step counts two)."""
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    clips, smp = run.distiller.stream(n, frames, g, model=run.student.eval(), partition=partition,
                                      solver=solver)
    sec = time.perf_counter() - t0
    clips = clips.clamp(-1, 1)  # pixel range, as `flowdistill stream` writes them
    nfe = int(smp.nfe)
    return clips, {"solver": smp.solver, "seconds": sec, "calls_per_stream": nfe,
                   "frames_per_call": frames / nfe,
                   "frames_per_second": n * frames / sec}


def ink(clips: torch.Tensor) -> float:
    """Mean ink per frame ``Σ (x + 1)/2`` over the pixels (one bouncing digit ≈ 30, two ≈ 60 on real
    clips): a stream whose digits fade or vanish loses it."""
    return float(((clips.clamp(-1, 1) + 1) / 2).sum(dim=(2, 3, 4)).mean())


def score(clips: torch.Tensor, params: dict, chunk: int, seed: int) -> dict:
    """``video_report`` of ``clips [n, F, ...]``: frame FID/KID on ``min(1000, n·F)`` frames against
    real test-split clips of the same length (twice as many frames: reference and floor), motion
    and jump metrics of the generated and (``_real``) of as many real clips."""
    n, f = clips.shape[:2]
    n_feat = min(1000, n * f)
    m = max(n, -(-2 * n_feat // f))
    real = reference_clips({**params, "frames": f}, m, seed=seed).frames
    rep = video_report(clips, reference_frames=real, boundaries=boundaries(f, chunk), n_feat=n_feat)
    return {k: float(v) for k, v in rep.items()}


def bench_row(label: str, run_dir: str, partition, solver, args) -> dict:
    """One row: the main streams, the speed, the stability streams."""
    if args.jobs > 1:
        torch.set_num_threads(1)
    run = load_run(run_dir)
    part = run.distiller.streaming_partition(partition)
    params = dict(run.cfg.data.params)
    clips, speed = stream_run(run, args.streams, args.frames, args.seed, partition, solver)
    row = {"label": label, "run": run_dir, "partition": [part.ref, part.chunks, part.chunk, part.micro],
           **speed, **score(clips, params, part.chunk, args.seed + 1)}
    long, _ = stream_run(run, args.long_streams, args.long_frames, args.seed + 2, partition, solver)
    w = args.window
    early = score(long[:, :w], params, part.chunk, args.seed + 3)
    late = score(long[:, args.long_frames - w:], params, part.chunk, args.seed + 3)
    early["ink"], late["ink"] = ink(long[:, :w]), ink(long[:, args.long_frames - w:])
    early["ink_real"] = ink(reference_clips({**params, "frames": w}, 64, seed=args.seed + 4).frames)
    row["early"], row["late"] = early, late
    row["late_over_early_fid"] = late["frame_fid"] / max(early["frame_fid"], 1e-12)
    row["late_over_early_pos"] = late["pos_error"] / max(early["pos_error"], 1e-12)
    row["_clips"] = clips
    print(f"{label}: {json.dumps({k: v for k, v in row.items() if not k.startswith('_')}, default=str)}",
          flush=True)
    return row


def markdown(rows: list[dict], args) -> str:
    """The table of the doc."""
    head = ("| row | K,N,c,s solver | frame FID (floor) | KID | pos. error | vel. jump bound./within | "
            "vel. dev bound./within | app. jump bound./within | FID 400–512 / 0–112 | "
            "pos. err 400–512 / 0–112 | ink 400–512 / 0–112 | frames/call | frames/s |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        late, early = r["late"], r["early"]
        vel = r["vel_jump_boundary"] / max(r["vel_jump_within"], 1e-12)
        app = r["app_jump_boundary"] / max(r["app_jump_within"], 1e-12)
        dev = r["vel_dev_boundary"] / max(r["vel_dev_within"], 1e-12)
        lines.append(
            f"| {r['label']} | {','.join(map(str, r['partition']))} {r.get('solver', '')} | "
            f"{r['frame_fid']:.2f} "
            f"({r['frame_fid_floor']:.2f}) | {r['frame_kid']:.4f} | {r['pos_error']:.3f} | "
            f"{r['vel_jump_boundary']:.3f} / {r['vel_jump_within']:.3f} = {vel:.2f}x | "
            f"{r['vel_dev_boundary']:.3f} / {r['vel_dev_within']:.3f} = {dev:.2f}x | "
            f"{r['app_jump_boundary']:.4f} / {r['app_jump_within']:.4f} = {app:.2f}x | "
            f"{late['frame_fid']:.2f} / {early['frame_fid']:.2f} = {r['late_over_early_fid']:.2f}x | "
            f"{late['pos_error']:.3f} / {early['pos_error']:.3f} = {r['late_over_early_pos']:.2f}x | "
            f"{late['ink']:.1f} / {early['ink']:.1f} | "
            f"{r['frames_per_call']:.2f} | {r['frames_per_second']:.1f} |")
    seen = set()
    for r in rows:  # the real clips' motion metrics at each chunk size's boundaries (the floors)
        if "pos_error_real" in r and r["partition"][2] not in seen:
            seen.add(r["partition"][2])
            q = {k[:-5]: v for k, v in r.items() if k.endswith("_real")}
            lines.append(
                f"| real clips, chunks of {r['partition'][2]} | {','.join(map(str, r['partition']))} "
                f"| — | — | "
                f"{q['pos_error']:.3f} | {q['vel_jump_boundary']:.3f} / {q['vel_jump_within']:.3f} | "
                f"{q['vel_dev_boundary']:.3f} / {q['vel_dev_within']:.3f} | "
                f"{q['app_jump_boundary']:.4f} / {q['app_jump_within']:.4f} | — | — | "
                f"{r['early']['ink_real']:.1f} | — | — |")
    lines.append("")
    lines.append(f"{args.streams} streams x {args.frames} frames per row ({args.streams * args.frames} "
                 f"frames) against as many real test-split frames; stability: {args.long_streams} x "
                 f"{args.long_frames} frames, windows of {args.window}; seed {args.seed}; "
                 f"{torch.get_num_threads()} thread(s).")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run every row whose run exists; write the table, the JSON and the GIFs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--frames", type=int, default=128)
    p.add_argument("--long-streams", type=int, default=8)
    p.add_argument("--long-frames", type=int, default=512)
    p.add_argument("--window", type=int, default=112)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/streamdit_bench")
    p.add_argument("--gif-dir", default="docs/img")
    p.add_argument("--gif-frames", type=int, default=48)
    p.add_argument("--gif-streams", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1, help="rows run in this many processes (one thread each)")
    p.add_argument("--rows", default="", help="comma-separated row indices (default: all with a run)")
    p.add_argument("--extra", action="append", default=[], metavar="LABEL=RUN[@C,S]",
                   help="also bench RUN as row LABEL, streamed with partition [C, S] (default: the run's "
                        "own); repeatable")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    pick = [int(i) for i in args.rows.split(",") if i.strip()] or list(range(len(ROWS)))
    todo = [(label, run, part, solver) for i, (label, run, part, solver) in enumerate(ROWS)
            if i in pick and (Path(run) / "student").is_dir()]
    for label, spec in (e.split("=", 1) for e in args.extra):
        run, _, pair = spec.partition("@")
        todo.append((label, run, tuple(int(v) for v in pair.split(",")) if pair else None, None))
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(bench_row, *zip(*todo, strict=True), [args] * len(todo)))
    else:
        rows = [bench_row(*job, args) for job in todo]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(rows, args))
    out.with_suffix(".json").write_text(json.dumps([{k: v for k, v in r.items() if not k.startswith("_")}
                                                    for r in rows], indent=1))
    gifs = Path(args.gif_dir)
    for r in rows:
        name = GIFS.get(r["label"])
        if name:
            save_gif(r["_clips"][: args.gif_streams, : args.gif_frames], gifs / name, fps=12, scale=2)
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
