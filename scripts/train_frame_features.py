"""Train the frame feature net of frame FID and save ``assets/frame_features.safetensors``.

Usage: ``OMP_NUM_THREADS=1 python scripts/train_frame_features.py [--steps 1500] [--seed 0] [--out PATH]``

Every step draws a fresh batch of single frames from the exact bouncing-digits generator
(train-split digits, 1–2 digits, uniform positions; uint8-quantised as the metric pipeline sees
them) with the targets it knows exactly (:func:`~flowdistill.models.frame_features.frame_targets`:
classes present + occupied 4×4 cells), trained with binary cross-entropy. Held-out accuracy is
measured on 4 000 frames of test-split digits (seed 12345). Finally ``feature_scale`` is set so
that the mean squared feature on 4 000 train frames is 1. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flowdistill.data.bouncing_digits import generate_clips
from flowdistill.models.frame_features import DEFAULT_WEIGHTS, FrameFeatureNet, frame_accuracy, frame_targets


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] frames to the 256 uint8 levels the metrics feed the net."""
    return ((x + 1.0) * 127.5).round().clamp(0, 255) / 127.5 - 1.0


def frames_and_targets(n: int, g: torch.Generator, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` single frames ``[n, 1, 32, 32]`` and their targets ``[n, 26]``."""
    c = generate_clips(n, 1, generator=g, split=split)
    return quantize(c.frames[:, 0]), frame_targets(c.labels, c.positions[:, 0])


def train(steps: int = 1500, seed: int = 0, batch_size: int = 64, lr: float = 2e-3) -> FrameFeatureNet:
    """Train a :class:`FrameFeatureNet` on fresh generated frames (one-cycle AdamW)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = FrameFeatureNet()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    t0, total = time.time(), 0.0
    for step in range(steps):
        x, y = frames_and_targets(batch_size, g, "train")
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1:5d}  loss {total / 100:.4f}  ({time.time() - t0:.0f} s)", flush=True)
            total = 0.0
    model.eval()
    with torch.no_grad():
        x, _ = frames_and_targets(4000, torch.Generator().manual_seed(seed + 1), "train")
        feats, _ = model.features(x)
        model.feature_scale.fill_(float(feats.pow(2).mean().rsqrt()))
    print(f"feature scale {float(model.feature_scale):.5f}")
    return model


def main() -> None:
    """Parse arguments, train, report held-out accuracy and write the safetensors file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    args = ap.parse_args()
    model = train(args.steps, args.seed)
    x, y = frames_and_targets(4000, torch.Generator().manual_seed(12345), "test")
    acc = frame_accuracy(model, x, y)
    print("held-out (test digits, 4000 frames): " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out), metadata={"recipe": f"seed={args.seed} steps={args.steps}"})
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
