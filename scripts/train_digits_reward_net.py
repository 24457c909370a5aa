"""Train the digits *reward* classifier and save ``assets/digits_reward_mlp.safetensors``.

Usage: ``python scripts/train_digits_reward_net.py [--epochs 300] [--seed 1] [--out PATH]``

The reward ``digits_confidence`` (:mod:`flowdistill.models.rewards`) scores a generated digit by
this net's log-probability of the requested class. It is deliberately a different network from
the FID/KID feature CNN (an MLP on 8×8 pixels, its own seed, its own weights), trained on the
fixed train split only (FID is measured against the test split). Inputs are augmented with a
random ±1 pixel shift and Gaussian pixel noise (std 0.2), so its gradient is informative on the
imperfect images a student makes. Prints held-out test accuracy; deterministic for a seed; seconds
on one CPU core.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flowdistill.data.digits import digits_tensors
from flowdistill.models.rewards import DIGITS_REWARD_WEIGHTS, DigitsRewardMLP


def augment(x: torch.Tensor, g: torch.Generator, noise: float = 0.2) -> torch.Tensor:
    """Shift each 8×8 image by up to one pixel per axis (background −1) and add pixel noise."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (b,), generator=g)
    dy = torch.randint(0, 3, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(8)[None])[:, :, None].expand(b, 8, 8)
    cols = (dx[:, None] + torch.arange(8)[None])[:, None, :].expand(b, 8, 8)
    shifted = padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]
    return shifted + noise * torch.randn(shifted.shape, generator=g)


def train(epochs: int = 300, seed: int = 1, lr: float = 3e-3, batch_size: int = 256) -> DigitsRewardMLP:
    """Train :class:`DigitsRewardMLP` on the digits train split (8×8) with shift + noise augmentation."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = digits_tensors("train", 8)
    net = DigitsRewardMLP()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(net(augment(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: DigitsRewardMLP, split: str, size: int = 8) -> float:
    """Top-1 accuracy on a digits split."""
    x, y = digits_tensors(split, size)
    return float((net(x).argmax(1) == y).float().mean())


def main() -> None:
    """Train, report accuracy, save the weights (safetensors)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=DIGITS_REWARD_WEIGHTS)
    a = ap.parse_args()
    net = train(a.epochs, a.seed)
    print(f"test accuracy: 8x8 {accuracy(net, 'test', 8):.4f}, 16x16 {accuracy(net, 'test', 16):.4f}, "
          f"32x32 {accuracy(net, 'test', 32):.4f}")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(a.out))
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
