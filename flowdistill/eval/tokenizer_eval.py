"""Tokenizer evaluation: reconstruction (PSNR, rFID, rKID) and linear probes on noisy latents.

``reconstruction_report(tokenizer, images, seeds=...)``:

    x̂      = clamp(D_pix(mean E(x)), −1, 1)                  (deterministic: the posterior mean)
    PSNR   = mean over images of 10·log10(2² / mean((x̂ − x)²))   (data range [−1, 1]: peak-to-peak 2)
    rFID   = FID(x̂, x) on the digits classifier features, n = len(images) (the test split: 360),
             rKID beside it (DESIGN §7: FID is biased by n, so compare at equal n with KID)
    floor  = FID(x_ref, x): an equal-size random subset of *other real* images (the train split)
             against the same x, mean over ``seeds``: the real-vs-real level at this n

``linear_probe(tokenizer, ...)``: a logistic regression (scikit-learn, fixed seed) on the flattened

    z_t = (1 − t)·ẑ + t·ε,   ẑ = (mean E(x) − μ)/σ,   ε ~ N(0, I) (seeded)

with μ, σ the mean and std of the *probe's training* latents (what a latent generator trained on
normalised latents sees), at each ``t``; returns test accuracy per ``t``. A tokenizer whose noisy
latents stay linearly separable by class decays slowly with ``t`` (RecTok's claim).

``latent_stats`` / ``write_latent_stats``: measure ``shift = mean z``, ``scale = 1/std z`` and write
them into a saved model's ``config.json`` (``shift_factor``, ``scaling_factor``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowdistill.atomic import atomic_file


@torch.no_grad()
def encode_mean(tokenizer: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Posterior means ``mean E(x)`` of ``images`` (no masking), in batches."""
    tokenizer.eval()
    return torch.cat([tokenizer.encode(images[i:i + batch_size]).latent_dist.mode()
                      for i in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def reconstruct(tokenizer: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """``clamp(D_pix(mean E(x)), −1, 1)`` of ``images``, in batches."""
    z = encode_mean(tokenizer, images, batch_size)
    return torch.cat([tokenizer.decode(z[i:i + batch_size]).sample
                      for i in range(0, z.shape[0], batch_size)]).clamp(-1, 1)


def psnr(pred: Tensor, target: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR ``10·log10(range² / MSE)`` in dB (``inf`` where the images are equal)."""
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _floor_pool(images: Tensor) -> Tensor:
    """The digits train split at the images' size: the floor's other real images."""
    from flowdistill.data.digits import digits_tensors

    return digits_tensors("train", int(images.shape[-1]))[0]


def reconstruction_report(tokenizer: nn.Module, images: Tensor, *, seeds: Sequence[int] = (0, 1, 2),
                          floor_images: Tensor | None = None, feature_extractor: str = "digits",
                          **fid_kw: Any) -> dict[str, float]:
    """PSNR, rFID, rKID and the real-vs-real floor of ``tokenizer`` on ``images`` (module docstring).

    ``floor_images``: the pool the floor's reference subsets are drawn from (default: the digits
    train split); ``seeds`` seed those draws and the KID subsets. Returns ``psnr``, ``rfid``,
    ``rkid`` (means over ``seeds``), ``rfid_floor`` (mean), ``rfid_floor_std``, ``rkid_floor``, ``n``.
    """
    from flowdistill.eval.fid import compute_fid

    n = int(images.shape[0])
    rec = reconstruct(tokenizer, images)
    p = psnr(rec, images)
    pool = _floor_pool(images) if floor_images is None else floor_images
    if pool.shape[0] < n:
        raise ValueError(f"the floor needs at least {n} other images, got {pool.shape[0]}")
    rfid, rkid, floor, kfloor = [], [], [], []
    for seed in seeds:
        m = compute_fid(rec, images, seed=seed, feature_extractor=feature_extractor, **fid_kw)
        rfid.append(float(m["fid"]))
        rkid.append(float(m["kid_mean"]))
        idx = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        f = compute_fid(pool[idx], images, seed=seed, feature_extractor=feature_extractor, **fid_kw)
        floor.append(float(f["fid"]))
        kfloor.append(float(f["kid_mean"]))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    std = math.sqrt(mean([(v - mean(floor)) ** 2 for v in floor]))
    return {"psnr": float(p.mean()), "rfid": mean(rfid), "rkid": mean(rkid), "rfid_floor": mean(floor),
            "rfid_floor_std": std, "rkid_floor": mean(kfloor), "n": n}


def probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, seed: int = 0,
                   max_iter: int = 500, c: float = 1.0) -> float:
    """Test accuracy of an L2-regularised logistic regression (scikit-learn, lbfgs, ``C = c``) fitted
    on flattened ``train_x``."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    clf.fit(train_x.flatten(1).double().numpy(), train_y.numpy())
    return float(clf.score(test_x.flatten(1).double().numpy(), test_y.numpy()))


def linear_probe(tokenizer: nn.Module, train_images: Tensor, train_labels: Tensor, test_images: Tensor,
                 test_labels: Tensor, t_values: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
                 seed: int = 0) -> dict[float, float]:
    """Linear-probe accuracy on ``z_t`` at each ``t`` (module docstring); ``ε`` drawn from ``seed``."""
    z_tr, z_te = encode_mean(tokenizer, train_images), encode_mean(tokenizer, test_images)
    mu, sd = z_tr.mean(), z_tr.std().clamp_min(1e-12)
    z_tr, z_te = (z_tr - mu) / sd, (z_te - mu) / sd
    out = {}
    for t in t_values:
        g = torch.Generator().manual_seed(seed)
        e_tr, e_te = torch.randn(z_tr.shape, generator=g), torch.randn(z_te.shape, generator=g)
        out[float(t)] = probe_accuracy((1 - t) * z_tr + t * e_tr, train_labels,
                                       (1 - t) * z_te + t * e_te, test_labels, seed=seed)
    return out


def latent_stats(tokenizer: nn.Module, images: Tensor) -> dict[str, float]:
    """``shift_factor = mean z`` and ``scaling_factor = 1/std z`` over ``images``' posterior means."""
    z = encode_mean(tokenizer, images).double()
    return {"shift_factor": float(z.mean()), "scaling_factor": float(1.0 / z.std().clamp_min(1e-12))}


def write_latent_stats(model_dir: str | Path, stats: dict[str, float]) -> Path:
    """Write ``stats`` (``shift_factor``, ``scaling_factor``) into ``model_dir/config.json`` atomically."""
    path = Path(model_dir) / "config.json"
    conf = json.loads(path.read_text())
    conf.update({k: float(stats[k]) for k in ("shift_factor", "scaling_factor")})
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    return path


__all__ = ["encode_mean", "latent_stats", "linear_probe", "probe_accuracy", "psnr", "reconstruct",
           "reconstruction_report", "write_latent_stats"]
