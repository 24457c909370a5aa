"""Affine paths: boundary values, derivatives, and the velocity / x0 / ε conversions."""

import pytest
import torch

from flowdistill.core.paths import PATHS, CosinePath, LinearPath


def _paths():
    return [LinearPath(), CosinePath()]


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.name)
def test_boundaries(path):
    t0, t1 = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    assert path.alpha(t0).item() == pytest.approx(1.0)
    assert path.sigma(t0).item() == pytest.approx(0.0)
    assert path.alpha(t1).item() == pytest.approx(0.0, abs=1e-12)
    assert path.sigma(t1).item() == pytest.approx(1.0, abs=1e-2)


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.name)
def test_derivatives_match_finite_differences(path):
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    assert torch.allclose(path.d_alpha(t), (path.alpha(t + h) - path.alpha(t - h)) / (2 * h), atol=1e-6)
    assert torch.allclose(path.d_sigma(t), (path.sigma(t + h) - path.sigma(t - h)) / (2 * h), atol=1e-6)


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.name)
def test_conversions_round_trip(path):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 3, generator=g, dtype=torch.float64)
    t = torch.rand(16, generator=g, dtype=torch.float64) * 0.9 + 0.05
    xt, v = path.sample_and_target(x0, eps, t)
    assert torch.allclose(xt, path.sample(x0, eps, t))
    assert torch.allclose(path.velocity_to_x0(xt, v, t), x0, atol=1e-9)
    assert torch.allclose(path.velocity_to_eps(xt, v, t), eps, atol=1e-9)
    assert torch.allclose(path.x0_to_velocity(xt, x0, t), v, atol=1e-9)
    assert torch.allclose(path.eps_to_velocity(xt, eps, t), v, rtol=1e-7, atol=1e-7)


def test_vpred_conversion_on_variance_preserving_path():
    p = CosinePath()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g,
                                                                                dtype=torch.float64)
    t = torch.rand(8, generator=g, dtype=torch.float64)
    xt, v = p.sample_and_target(x0, eps, t)
    a, s = p.alpha(t)[:, None], p.sigma(t)[:, None]
    assert torch.allclose(p.vpred_to_velocity(xt, a * eps - s * x0, t), v, atol=1e-9)


def test_linear_target_is_eps_minus_x():
    x, eps, t = torch.randn(5, 2), torch.randn(5, 2), torch.rand(5)
    xt, v = LinearPath().sample_and_target(x, eps, t)
    assert torch.allclose(xt, (1 - t[:, None]) * x + t[:, None] * eps)
    assert torch.allclose(v, eps - x)


def test_registry():
    assert set(PATHS.names()) >= {"linear", "cosine"}
    with pytest.raises(KeyError, match="available: cosine, linear"):
        PATHS.get("nope")
