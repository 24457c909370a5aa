"""Tokenizer evaluation (flowdistill/eval/tokenizer_eval.py): PSNR, the reconstruction report and the
linear probe on noisy latents, against hand computations and synthetic data with a known answer."""

from __future__ import annotations

import math
import types

import pytest
import torch
from torch import nn

from flowdistill.eval import tokenizer_eval as te


class IdentityTokenizer(nn.Module):
    """``encode(x).latent_dist.mode() = x``, ``decode(z).sample = z``: a perfect reconstruction."""

    def encode(self, x: torch.Tensor):
        """The "posterior" whose mean is ``x``."""
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mode=lambda: x.clone()))

    def decode(self, z: torch.Tensor):
        """The latent as the image."""
        return types.SimpleNamespace(sample=z.clone())


def test_psnr_identity_and_noise_by_hand():
    """PSNR(x, x) = inf; for a constant error e on [-1, 1] data, PSNR = 10·log10(4 / e²) exactly;
    per image, for two images with different errors."""
    x = torch.rand(2, 1, 4, 4) * 2 - 1
    assert torch.isinf(te.psnr(x, x)).all()
    err = torch.tensor([0.1, 0.5]).view(2, 1, 1, 1)
    got = te.psnr(x + err, x)
    want = torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.25)], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-9)  # 26.02 and 12.04 dB
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g) * 0.2
    mse = noise.double().pow(2).flatten(1).mean(1)
    assert torch.allclose(te.psnr(x + noise, x), 10 * torch.log10(4 / mse), atol=1e-9)


def test_reconstruction_report_of_a_perfect_tokenizer():
    """The identity tokenizer: PSNR inf, rFID ≈ 0 (the same images: only sqrtm's numerical error),
    well under the real-vs-real floor (other digits against these)."""
    from flowdistill.data.digits import digits_tensors

    x = digits_tensors("test", 32)[0][:64]
    rep = te.reconstruction_report(IdentityTokenizer(), x, seeds=(0,))
    assert math.isinf(rep["psnr"]) and rep["n"] == 64
    assert abs(rep["rfid"]) < 1e-3
    assert rep["rfid_floor"] > 1.0 > rep["rfid"]


def _blobs(n: int, classes: int, sep: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` latents ``[n, 2, 2, 2]``: class means ``sep·e_c`` plus unit noise; balanced labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    means = torch.zeros(classes, 8)
    means[torch.arange(classes), torch.arange(classes)] = sep
    return (means[y] + torch.randn(n, 8, generator=g)).view(n, 2, 2, 2), y


def test_linear_probe_separable_and_noise():
    """Well-separated classes (means 10σ apart): accuracy 1 at t = 0 and still near 1 at t = 0.25;
    at t → 1 the latents are pure noise and accuracy falls to chance. Latents independent of the
    labels: chance (1/4; with 400 test points the accuracy's std is ≈ 0.022, so < 0.4 is far out)."""
    tok = IdentityTokenizer()
    xtr, ytr = _blobs(400, 4, 10.0, 0)
    xte, yte = _blobs(400, 4, 10.0, 1)
    acc = te.linear_probe(tok, xtr, ytr, xte, yte, t_values=(0.0, 0.25, 0.999), seed=0)
    assert acc[0.0] == 1.0
    assert acc[0.25] > 0.95
    assert acc[0.999] < 0.4
    g = torch.Generator().manual_seed(3)
    ntr, nte = torch.randn(xtr.shape, generator=g), torch.randn(xte.shape, generator=g)
    acc_noise = te.linear_probe(tok, ntr, ytr, nte, yte, t_values=(0.0,), seed=0)
    assert acc_noise[0.0] < 0.4
    again = te.linear_probe(tok, xtr, ytr, xte, yte, t_values=(0.25,), seed=0)
    assert again[0.25] == acc[0.25]  # fixed ε seed and solver seed: reproducible


def test_latent_stats_written_to_config(tmp_path):
    """shift = mean z, scale = 1/std z land in config.json; other keys stay."""
    (tmp_path / "config.json").write_text('{"latent_channels": 2, "scaling_factor": 1.0}')
    z = torch.randn(50, 2, 2, 2, generator=torch.Generator().manual_seed(0)) * 3 + 1
    stats = te.latent_stats(IdentityTokenizer(), z)
    assert stats["shift_factor"] == pytest.approx(float(z.double().mean()), abs=1e-9)
    assert stats["scaling_factor"] == pytest.approx(float(1 / z.double().std()), rel=1e-9)
    te.write_latent_stats(tmp_path, stats)
    import json

    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["latent_channels"] == 2 and conf["scaling_factor"] == pytest.approx(stats["scaling_factor"])
