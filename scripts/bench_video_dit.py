"""CPU cost of VideoDiTFlowNet training steps (the table in flowdistill/models/video_dit.py).

Forward + backward of a mean-square loss, batch 16, 32×32×1 frames, patch 4, heads 4, one thread;
reports the median **process CPU time** of 2 steps after 1 warm-up (CPU time, not wall time, so a
shared box's contention does not inflate it; wall time on an idle core is about the same).

    OMP_NUM_THREADS=1 python scripts/bench_video_dit.py
"""

from __future__ import annotations

import time

import torch

from flowdistill.models.video_dit import VideoDiTFlowNet

VARIANTS = [("full", {}), ("window2", {"attention": "window", "window": 2}),
            ("window2-local", {"attention": "window", "window": 2, "local_window": True}),
            ("causal", {"attention": "causal"})]


def step_time(net: VideoDiTFlowNet, frames: int, reps: int = 3) -> float:
    """Best-of-``reps − 1`` CPU seconds of one forward + backward after a warm-up."""
    x, t = torch.randn(16, frames, 1, 32, 32), torch.rand(16, frames)
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        net(x, t).square().mean().backward()
        times.append(time.process_time() - t0)
    return min(times[1:])


def main() -> None:
    """Print the table."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("frames hidden depth  " + "  ".join(name for name, _ in VARIANTS), flush=True)
    for frames, hidden, depth in [(8, 64, 3), (8, 128, 4), (16, 64, 3), (16, 128, 4)]:
        row = []
        for _, kw in VARIANTS:
            net = VideoDiTFlowNet(hidden=hidden, depth=depth, heads=4, max_frames=16, **kw)
            with torch.no_grad():  # non-zero weights so the backward is the real one
                for p in net.parameters():
                    p.normal_(0, 0.02)
            row.append(step_time(net, frames))
        print(f"{frames:6d} {hidden:6d} {depth:5d}  " + "  ".join(f"{v:.2f} s" for v in row), flush=True)


if __name__ == "__main__":
    main()
