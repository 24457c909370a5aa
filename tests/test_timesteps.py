"""Training time samplers and sampling grids."""

import math

import pytest
import torch

from flowdistill.core.timesteps import TIME_SAMPLERS, TimeSamplerConfig, build_grid, shift_time


def _draw(name, n=200_000, **kw):
    return TimeSamplerConfig(name=name, **kw).build()(n, torch.Generator().manual_seed(0))


def test_uniform_moments():
    t = _draw("uniform")
    assert t.min() >= 0 and t.max() <= 1
    assert t.mean().item() == pytest.approx(0.5, abs=5e-3)
    assert t.var().item() == pytest.approx(1 / 12, abs=2e-3)


def test_logit_normal_median():
    t = _draw("logit_normal", mean=1.0, std=1.0)
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=5e-3)


def test_shifted_pushes_mass_to_noise():
    t = _draw("shifted", shift=3.0)
    # P(t' <= 0.5) = P(u <= 0.5 / (3 - 2*0.5)) = 0.25
    assert (t <= 0.5).float().mean().item() == pytest.approx(0.25, abs=5e-3)


def test_u_shaped_density_matches_cosh():
    a = 4.0
    t = _draw("u_shaped", a=a)
    hist = torch.histc(t, bins=10, min=0, max=1) / t.numel()
    edges = torch.linspace(0, 1, 11, dtype=torch.float64)
    # CDF of p(t) ∝ cosh(a (t - 1/2)) is ∝ sinh(a (t - 1/2))
    cdf = torch.sinh(a * (edges - 0.5))
    expected = (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0])
    assert torch.allclose(hist.double(), expected, atol=3e-3)
    assert t.min() >= 1e-5 and t.max() <= 1 - 1e-5


def test_time_range_mapping():
    t = _draw("uniform", t_min=0.01, t_max=0.5)
    assert t.min() >= 0.01 and t.max() <= 0.5


def test_grids():
    g = build_grid("uniform", 4)
    assert torch.allclose(g, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    gs = build_grid("shifted", 4, shift=3.0)
    assert gs[0] == 1 and gs[-1] == 0 and torch.all(gs[1:] < gs[:-1])
    assert torch.allclose(gs, shift_time(g.double(), 3.0).float())
    with pytest.raises(ValueError, match="positive integer"):
        build_grid("uniform", 0)


def test_bad_names_and_values():
    with pytest.raises(KeyError, match="available"):
        TimeSamplerConfig(name="bogus").build()
    with pytest.raises(ValueError):
        TimeSamplerConfig(name="uniform", t_min=0.5, t_max=0.2).build()
    assert "u_shaped" in TIME_SAMPLERS
