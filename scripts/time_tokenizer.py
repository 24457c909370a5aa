"""Time one forward + backward of the tokenizer on CPU (the table in flowdistill/models/tokenizer.py).

Usage: ``OMP_NUM_THREADS=1 python scripts/time_tokenizer.py [--batch 64] [--repeats 5]``

Loss per step: ``‖D_pix(z) − x‖² + 1e-6·KL + mean(1 − cos(D_sem(z), f))`` with ``z`` a posterior
sample, no masking, random images and random semantic targets; prints the median of ``--repeats``
timed steps after two warm-up steps for each configuration.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from flowdistill.models.tokenizer import TokenizerModel

CONFIGS = [
    dict(hidden=64, enc_depth=4, dec_depth=4, heads=4, sem_dim=64, sem_hidden=64, sem_depth=2),
    dict(hidden=128, enc_depth=4, dec_depth=4, heads=4, sem_dim=64, sem_hidden=64, sem_depth=2),
    dict(hidden=128, enc_depth=4, dec_depth=4, heads=4, sem_dim=0),
]


def step(model: TokenizerModel, x: torch.Tensor, feats: torch.Tensor, g: torch.Generator) -> None:
    """One forward + backward of the reconstruction + KL (+ semantic) loss."""
    dist = model.encode(x).latent_dist
    z = dist.sample(g)
    loss = F.mse_loss(model.decode(z).sample, x) + 1e-6 * dist.kl().mean()
    if model.sem_decoder is not None:
        loss = loss + (1 - F.cosine_similarity(model.decode_semantic(z), feats, dim=-1)).mean()
    model.zero_grad(set_to_none=True)
    loss.backward()


def main() -> None:
    """Print one table row per configuration."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, 32, 32) * 2 - 1
    feats = torch.randn(args.batch, 64, 64)
    print(f"threads={torch.get_num_threads()} batch={args.batch}")
    for cfg in CONFIGS:
        model = TokenizerModel(latent_channels=16, **cfg)
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        for _ in range(2):
            step(model, x, feats, g)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step(model, x, feats, g)
            times.append(time.perf_counter() - t0)
        print(f"{cfg}  params={n_params:.2f}M  fwd+bwd median={statistics.median(times):.3f}s "
              f"min={min(times):.3f}s")


if __name__ == "__main__":
    main()
