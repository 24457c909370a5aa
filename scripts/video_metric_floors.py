"""Measure the video metrics on true bouncing-digit clips: detector accuracy, motion floors, FID floors.

Usage: ``OMP_NUM_THREADS=1 python scripts/video_metric_floors.py [--clips 1000] [--frames 16] [--n 1000]
[--skip-fid] [--out runs/video_floors.json]``

- Detector: :func:`~flowdistill.eval.video_metrics.detect_positions` on ``--clips`` test-split
  clips (seed 0) against the true centres (:func:`detector_error`), overall and for 1 / 2 digits.
- Motion floor: the motion and appearance metrics of those true clips with chunk boundaries every
  4 frames (what a perfect generator scores), and the motion metrics with chunks of 2 frames
  (``motion_real_chunk2``: ``vel_jump_within`` is NaN there, ``vel_dev_*`` is the seam measure).
- Frame FID floor: real (⌈n / frames⌉ clips of test digits, seed 1) vs reference (twice as many
  clips, seed 2; the floor compares its two halves) at ``--n`` frames per set over seeds 0..4 —
  metric and real-vs-real floor, means and standard deviations; uniform noise as a far point.
  ``--frames 1`` gives independent frames, longer clips the correlation of real streams.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flowdistill.data.bouncing_digits import generate_clips
from flowdistill.eval.video_metrics import (
    appearance_jumps,
    detect_positions,
    detector_error,
    frame_fid,
    motion_metrics,
)


def main() -> None:
    """Run the measurements and print / write them as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=1000)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--skip-fid", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    res: dict[str, object] = {"clips": args.clips, "frames": args.frames}
    c = generate_clips(args.clips, args.frames, generator=torch.Generator().manual_seed(0), split="test")
    t0 = time.time()
    det = detect_positions(c.frames)
    res["detect_seconds"] = round(time.time() - t0, 1)
    res["detector"] = detector_error(det, c.positions, c.present)
    for k in (1, 2):
        sel = c.present.sum(1) == k
        res[f"detector_{k}_digit"] = detector_error(det[sel], c.positions[sel], c.present[sel])
    bounds = torch.tensor([(f + 1) % 4 == 0 for f in range(args.frames - 1)])
    mm = motion_metrics(det, size=32, boundaries=bounds)
    mm.update(appearance_jumps(c.frames, det, boundaries=bounds))
    res["motion_real"] = mm
    res["motion_true_positions"] = motion_metrics(c.positions, size=32, boundaries=bounds)
    bounds2 = torch.tensor([(f + 1) % 2 == 0 for f in range(args.frames - 1)])
    res["motion_real_chunk2"] = motion_metrics(det, size=32, boundaries=bounds2)
    print(json.dumps(res, indent=1), flush=True)
    if not args.skip_fid:
        per_set = -(-args.n // args.frames)  # generated clips; the reference has twice as many (two halves)
        real = generate_clips(
            per_set, args.frames, generator=torch.Generator().manual_seed(1), split="test"
        ).frames
        ref = generate_clips(
            2 * per_set, args.frames, generator=torch.Generator().manual_seed(2), split="test"
        ).frames
        res["frame_fid_real"] = frame_fid(real, ref, n=args.n, seeds=(0, 1, 2, 3, 4))
        noise = torch.rand_like(real) * 2 - 1
        res["frame_fid_noise"] = frame_fid(noise, ref, n=args.n, seeds=(0, 1, 2, 3, 4))
        print(json.dumps({k: res[k] for k in ("frame_fid_real", "frame_fid_noise")}, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
