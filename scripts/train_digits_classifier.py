"""Train the digits feature classifier and save ``assets/digits_classifier.safetensors``.

Usage: ``python scripts/train_digits_classifier.py [--epochs 40] [--seed 0] [--out PATH]``

Trains on the fixed train split only (1 437 images) and prints held-out test accuracy at every
supported size. Each batch is augmented with a random ±1 pixel shift (at 8×8) and presented at a
random size in {8, 16, 32} (upscaled exactly as the digits dataset does, bilinear) after uint8
quantisation, so the classifier sees the same inputs it gets inside the FID pipeline. Finally
``feature_scale`` is set so that the mean squared penultimate feature on the train split is 1.
Runs on CPU in well under a minute; fully deterministic for a given seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flowdistill.data.digits import SIZES, digits_tensors, upscale_digits
from flowdistill.models.digits_classifier import DEFAULT_WEIGHTS, DigitsClassifier, classifier_accuracy


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] images to the 256 uint8 levels the FID pipeline feeds the classifier."""
    return ((x + 1.0) * 127.5).round().clamp(0, 255) / 127.5 - 1.0


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each 8×8 image by up to ``max_shift`` pixels per axis, filling with background (-1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    out = torch.empty_like(x)
    for i in range(b):
        out[i] = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    return out


def train(epochs: int = 40, seed: int = 0, batch_size: int = 64, lr: float = 2e-3) -> DigitsClassifier:
    """Train a ``DigitsClassifier`` on the digits train split with shift and size augmentation."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = digits_tensors("train", 8)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((x.shape[0] + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        total = 0.0
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            xb = random_shift(x[idx], g)
            size = SIZES[int(torch.randint(0, len(SIZES), (1,), generator=g))]
            xb = quantize(upscale_digits(xb, size))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * idx.numel()
        if (epoch + 1) % 10 == 0 or epoch == 0:
            print(f"epoch {epoch + 1:3d}  train loss {total / x.shape[0]:.4f}")
    model.eval()
    with torch.no_grad():
        feats, _ = model.features(quantize(digits_tensors("train", 8)[0]))
        model.feature_scale.fill_(float(feats.pow(2).mean().rsqrt()))
    print(f"feature scale {float(model.feature_scale):.5f}")
    return model


def main() -> None:
    """Parse arguments, train, report held-out accuracy and write the safetensors file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    args = ap.parse_args()
    model = train(args.epochs, args.seed)
    for size in SIZES:
        xt, yt = digits_tensors("test", size)
        acc = classifier_accuracy(model, quantize(xt), yt)
        print(f"held-out test accuracy at {size}x{size}: {100 * acc:.2f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out), metadata={"recipe": f"seed={args.seed} epochs={args.epochs}"})
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
