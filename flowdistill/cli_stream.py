"""``flowdistill stream RUN``: stream frames from a StreamDiT run (teacher or distilled student).

    flowdistill stream runs/streamdit_mixed --frames 256 --n 4 --seed 0 --out clip.gif --grid frames.png

The run's streaming sampler (:class:`~flowdistill.core.streaming.StreamingSampler` on the run's
sampling partition) emits a chunk whenever the oldest reaches ``t = 0``, for as many frames as
asked, in constant memory. ``--out`` is a GIF (``.gif``; ``--n`` streams side by side) or an MP4
(``.mp4``; needs imageio-ffmpeg or av, else a one-line error); ``--grid`` also writes a frame
grid PNG. A distilled student covers each chunk's ``s`` micro-steps in one call (``N`` calls a
pass); ``--teacher-steps`` makes it step grid index by grid index instead (``N·s`` calls, as its
teacher). Prints frames per network call and frames per second. Nothing here imports torch at
module level (``--help`` stays light).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from flowdistill.errors import FlowDistillError

STREAM_HELP = "stream video frames from a StreamDiT run (GIF / MP4, frame grid)"
SUFFIXES = (".gif", ".mp4")


def _positive(s: str) -> int:
    """A positive integer argument."""
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def _pair(s: str) -> tuple[int, int]:
    """``C,S``: two positive integers."""
    try:
        c, m = (int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be C,S (chunk frames, micro-steps), got {s!r}") from None
    if c < 1 or m < 1:
        raise argparse.ArgumentTypeError(f"C and S must be positive, got {s!r}")
    return c, m


def add_stream_command(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``stream`` on the sub-command parsers ``sub``."""
    sp = sub.add_parser("stream", parents=parents, help=STREAM_HELP,
                        description="Stream frames from a StreamDiT run (distiller streamdit or "
                                    "streamdit_distill) and write them as a GIF or MP4.")
    sp.add_argument("run_dir", metavar="RUN", help="a StreamDiT run directory")
    sp.add_argument("--frames", type=_positive, default=256, help="frames per stream")
    sp.add_argument("--n", type=_positive, default=1, help="independent streams (side by side in the GIF)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the noise")
    sp.add_argument("--out", default="stream.gif", help="FILE.gif or FILE.mp4")
    sp.add_argument("--grid", default=None, metavar="FILE.png", help="also write a frame grid PNG")
    sp.add_argument("--fps", type=_positive, default=12, help="frames per second of the GIF / MP4")
    sp.add_argument("--scale", type=_positive, default=2, help="pixel upscaling of the GIF / MP4")
    sp.add_argument("--partition", type=_pair, default=None, metavar="C,S",
                    help="stream with chunks of C frames and S micro-steps each (default: the run's "
                         "distiller.sample_partition), e.g. 8,16 = one chunk: non-overlapping chunks")
    sp.add_argument("--solver", default=None, choices=("euler", "heun"),
                    help="a teacher's streaming solver (default: the run's distiller.sample_solver; "
                         "heun costs two network calls per step)")
    sp.add_argument("--teacher-steps", action="store_true",
                    help="a distilled student steps micro-step by micro-step (N·s calls a pass, as its "
                         "teacher) instead of one call per chunk interval (N calls)")


def cmd_stream(args: argparse.Namespace) -> None:
    """Load the run, stream, write the clip (and grid), print the speed."""
    import torch

    from flowdistill.api import load_run
    from flowdistill.eval.video_io import save_frame_grid, save_gif, save_mp4

    out = Path(args.out)
    if out.suffix.lower() not in SUFFIXES:
        raise FlowDistillError(f"--out must end in .gif or .mp4, got {out.name}")
    if args.grid is not None and Path(args.grid).suffix.lower() != ".png":
        raise FlowDistillError(f"--grid must end in .png, got {Path(args.grid).name}")
    if out.suffix.lower() == ".mp4" and not _has_mp4_encoder():  # before minutes of streaming
        save_mp4(torch.zeros(1, 1, 2, 2), out)  # raises video_io's one-line error (and writes nothing)
    run = load_run(args.run_dir)
    distiller = run.distiller
    if not hasattr(distiller, "stream"):
        name = run.cfg.distiller.name
        raise FlowDistillError(f"{args.run_dir} is not a streaming run (distiller {name!r}; stream takes "
                               f"streamdit or streamdit_distill runs)")
    if args.teacher_steps and not distiller.student_two_time:
        raise FlowDistillError("--teacher-steps is for distilled (two-time) students; a teacher always steps "
                               "micro-step by micro-step")
    if args.solver == "heun" and distiller.student_two_time:
        raise FlowDistillError("--solver heun is for teachers; a distilled student jumps a chunk interval "
                               "in one call (euler)")
    bar = _Progress(args.frames)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    clips, smp = distiller.stream(args.n, args.frames, g, model=run.student.eval(),
                                  teacher_steps=args.teacher_steps, callback=bar.update,
                                  partition=args.partition, solver=args.solver)
    sec = time.perf_counter() - t0
    bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    clips = clips.clamp(-1, 1)  # pixel range (a net's output may overshoot it slightly)
    video = clips[0] if args.n == 1 else clips
    if out.suffix.lower() == ".mp4":
        save_mp4(video, out, fps=args.fps, scale=args.scale)
    else:
        save_gif(video, out, fps=args.fps, scale=args.scale)
    if args.grid is not None:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        save_frame_grid(clips, args.grid)
    nfe = int(smp.nfe)
    part = distiller.streaming_partition(args.partition)
    grid = f" (grid: {args.grid})" if args.grid else ""
    print(f"{args.n} x {args.frames} frames written to {out}{grid}")
    print(f"partition K={part.ref} N={part.chunks} c={part.chunk} s={part.micro}: {nfe} network calls per "
          f"stream (batched over {args.n}), {args.frames / max(nfe, 1):.3f} frames per network call, "
          f"{args.n * args.frames / sec:.1f} frames per second ({sec:.1f} s on {torch.get_num_threads()} "
          f"thread(s))")


def _has_mp4_encoder() -> bool:
    """Whether imageio-ffmpeg or PyAV is importable (what ``save_mp4`` needs)."""
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("imageio_ffmpeg", "av"))


class _Progress:
    """A tqdm bar over the frames of each stream on a terminal, else nothing (the summary line
    says it all)."""

    def __init__(self, total: int):
        from tqdm.auto import tqdm

        self.total = total
        self.done = 0
        self.bar = tqdm(total=total, unit="frame", disable=not sys.stderr.isatty(), file=sys.stderr)

    def update(self, frames_done: int, num_frames: int | None = None) -> None:
        """The sampler's ``callback(frames_done, num_frames)``: advance to ``frames_done``."""
        done = min(int(frames_done), self.total)
        if done > self.done:
            self.bar.update(done - self.done)
            self.done = done

    def close(self) -> None:
        """Finish the bar."""
        self.bar.close()
