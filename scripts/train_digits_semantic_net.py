"""Train the self-supervised digits semantic net (``digits_ssl``) and save
``assets/digits_semantic.safetensors``.

Usage: ``OMP_NUM_THREADS=1 python scripts/train_digits_semantic_net.py [--steps 500] [--batch 128]
[--seed 0] [--out PATH] [--eval-only]``

Objective: SimCLR (Chen et al. 2020). Each image of a batch from the digits *train* split (32×32,
labels never used) gives two views ``a(x), a'(x)`` under random augmentations — rotation ±15°, scale
0.85–1.15, shift ±3 px, additive Gaussian noise σ ~ U(0, 0.15); the embeddings (token mean of
:class:`~flowdistill.models.semantic_teachers.DigitsSSLNet`) pass a 2-layer projection head ``g`` and
the NT-Xent loss (temperature τ) pulls the two views of one image together against the other
``2B − 2`` views:

    ℓ(i, j) = −log  exp(cos(g_i, g_j)/τ) / Σ_{k≠i} exp(cos(g_i, g_k)/τ)

The projection head is dropped after training. At the end the script prints the linear-probe
accuracy (logistic regression on the frozen token-mean embedding, train split → 360-image test
split) of the trained net, of the same net at its random init, and of raw pixels, plus the wall time;
``--eval-only`` prints linear-probe and 1-NN (cosine) accuracy of the saved weights, a random init
and raw pixels without training. Deterministic for a given seed on one thread.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from flowdistill.data.digits import digits_tensors
from flowdistill.models.semantic_teachers import DIGITS_SSL_WEIGHTS, DigitsSSLNet, load_digits_ssl_net


def augment(x: Tensor, g: torch.Generator, max_rot: float = 15.0, scale: tuple[float, float] = (0.85, 1.15),
            max_shift_px: float = 3.0, max_noise: float = 0.15) -> Tensor:
    """Random affine (rotation, isotropic scale, shift; background −1 fills in) + Gaussian noise."""
    b, _, h, w = x.shape
    u = torch.rand(b, 4, generator=g)
    ang = (u[:, 0] * 2 - 1) * math.radians(max_rot)
    sc = scale[0] + u[:, 1] * (scale[1] - scale[0])
    shift = (torch.rand(b, 2, generator=g) * 2 - 1) * (2 * max_shift_px / w)  # normalised coords
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    rows = [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)]
    theta = torch.stack(rows, 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    sigma = (u[:, 2] * max_noise).view(b, 1, 1, 1)
    return (out + sigma * torch.randn(out.shape, generator=g)).clamp(-1, 1)


def nt_xent(z1: Tensor, z2: Tensor, tau: float) -> Tensor:
    """SimCLR's normalised-temperature cross entropy over the ``2B`` views (each view's positive is
    its partner; the other ``2B − 2`` are negatives)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / tau
    sim.fill_diagonal_(float("-inf"))
    b = z1.shape[0]
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
    return F.cross_entropy(sim, target)


@torch.no_grad()
def embeddings(net: DigitsSSLNet, x: Tensor, batch: int = 512) -> Tensor:
    """Token-mean embeddings of ``x`` in eval mode."""
    net.eval()
    return torch.cat([net.embed(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


def linear_probe(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor) -> float:
    """Test accuracy of a standardised logistic regression fit on the train features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(train_f.numpy(), train_y.numpy())
    return float(clf.score(test_f.numpy(), test_y.numpy()))


def probe(net: DigitsSSLNet) -> float:
    """Linear-probe accuracy of ``net``'s embedding: digits train split → test split (32×32)."""
    xtr, ytr = digits_tensors("train", 32)
    xte, yte = digits_tensors("test", 32)
    return linear_probe(embeddings(net, xtr), ytr, embeddings(net, xte), yte)


def nearest_neighbour(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor) -> float:
    """Test accuracy of the label of each test feature's cosine-nearest train feature (1-NN)."""
    sim = F.normalize(test_f, dim=1) @ F.normalize(train_f, dim=1).T
    return float((train_y[sim.argmax(1)] == test_y).float().mean())


def evaluate(weights: Path, seed: int) -> None:
    """Print linear-probe and 1-NN test accuracy of the saved net, a random init and raw pixels."""
    (xtr, ytr), (xte, yte) = digits_tensors("train", 32), digits_tensors("test", 32)
    torch.manual_seed(seed)
    random_net = DigitsSSLNet()  # the init the training run starts from
    nets = {"trained": load_digits_ssl_net(weights), f"random init (seed {seed})": random_net,
            "raw pixels": None}
    for name, net in nets.items():
        ftr, fte = ((xtr.flatten(1), xte.flatten(1)) if net is None
                    else (embeddings(net, xtr), embeddings(net, xte)))
        print(f"{name}: linear probe {linear_probe(ftr, ytr, fte, yte):.4f}  "
              f"1-NN {nearest_neighbour(ftr, ytr, fte, yte):.4f}")


def train(steps: int, batch: int, seed: int, lr: float = 2e-3, tau: float = 0.2, dim: int = 64,
          log_every: int = 50) -> DigitsSSLNet:
    """SimCLR on the digits train split; returns the backbone (projection head dropped)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, _ = digits_tensors("train", 32)
    net = DigitsSSLNet(dim)
    head = nn.Sequential(nn.Linear(dim, 128), nn.GELU(), nn.Linear(128, 64))
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=max(0.1, 2 / steps))
    net.train()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        xb = x[idx]
        v1, v2 = augment(xb, g), augment(xb, g)
        loss = nt_xent(head(net.embed(v1)), head(net.embed(v2)), tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps}  nt-xent {loss.item():.4f}  {time.perf_counter() - t0:.0f}s",
                  flush=True)
    return net.eval()


def main() -> None:
    """Train, probe, save."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--tau", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=DIGITS_SSL_WEIGHTS)
    ap.add_argument("--eval-only", action="store_true", help="only evaluate the weights at --out")
    args = ap.parse_args()
    if args.eval_only:
        evaluate(args.out, args.seed)
        return
    torch.manual_seed(args.seed)
    (xtr, ytr), (xte, yte) = digits_tensors("train", 32), digits_tensors("test", 32)
    print(f"probe (raw pixels 32x32): {linear_probe(xtr.flatten(1), ytr, xte.flatten(1), yte):.4f}")
    torch.manual_seed(args.seed)
    print(f"probe (random init): {probe(DigitsSSLNet()):.4f}")
    t0 = time.perf_counter()
    net = train(args.steps, args.batch, args.seed, args.lr, args.tau)
    wall = time.perf_counter() - t0
    acc = probe(net)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={"objective": "simclr", "steps": str(args.steps),
                                             "batch": str(args.batch), "seed": str(args.seed),
                                             "probe_test_acc": f"{acc:.4f}"})
    print(f"probe (trained): {acc:.4f}  train wall {wall:.0f}s  params "
          f"{sum(v.numel() for v in state.values())}  -> {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
