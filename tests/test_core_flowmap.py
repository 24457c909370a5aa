"""Shared flow-map pieces: the time-derivative helper (JVP vs finite differences), the
distribution-matching gradient identity, and the flow-map sampler's NFE and exactness."""

import pytest
import torch

from flowdistill.core.derivatives import directional_derivative
from flowdistill.core.dmd import (
    dm_gradient,
    dm_surrogate_loss,
    fake_velocity_target,
    renoise,
)
from flowdistill.core.flowmap import AverageVelocityMap, flow_map_jump, sample_flow_map
from flowdistill.models import MLPFlowNet


def _two_time_net(seed: int = 0, dtype=torch.float64) -> MLPFlowNet:
    torch.manual_seed(seed)
    net = MLPFlowNet(data_dim=2, hidden=32, depth=3, time_embed_dim=16, two_time=True, time_scale=10.0)
    torch.nn.init.normal_(net.in_r.weight, std=0.3)  # make u depend on s (it starts at zero)
    return net.to(dtype)


def test_jvp_and_finite_difference_agree_on_ds():
    net = _two_time_net()
    x = torch.randn(16, 2, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64) * 0.8 + 0.2
    s = t * torch.rand(16, dtype=torch.float64)
    ones = torch.ones_like(s)

    def fn(s_):
        return net(x, t, s_)

    u_j, d_j = directional_derivative(fn, (s,), (ones,), method="jvp")
    u_f, d_f = directional_derivative(fn, (s,), (ones,), method="fd", h=1e-5)
    torch.testing.assert_close(u_j, u_f)
    torch.testing.assert_close(d_j, d_f, rtol=1e-5, atol=1e-6)
    assert d_j.abs().max() > 1e-2  # a real, non-trivial derivative was compared
    assert not d_j.requires_grad and not d_f.requires_grad


def test_jvp_on_several_inputs_matches_finite_difference():
    net = _two_time_net(1)
    x = torch.randn(8, 2, dtype=torch.float64)
    t = torch.full((8,), 0.7, dtype=torch.float64)
    s = torch.full((8,), 0.3, dtype=torch.float64)
    dx = torch.randn(8, 2, dtype=torch.float64)
    tangents = (dx, torch.ones(8, dtype=torch.float64), None)
    _, d_j = directional_derivative(lambda a, b, c: net(a, b, c), (x, t, s), tangents, method="jvp")
    _, d_f = directional_derivative(lambda a, b, c: net(a, b, c), (x, t, s), tangents, method="fd", h=1e-5)
    torch.testing.assert_close(d_j, d_f, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["jvp", "fd"])
def test_primal_output_carries_parameter_gradients(method):
    net = _two_time_net(dtype=torch.float32)
    x, t, s = torch.randn(4, 2), torch.ones(4), torch.rand(4)
    u, _ = directional_derivative(lambda s_: net(x, t, s_), (s,), (torch.ones(4),), method=method)
    u.pow(2).sum().backward()
    assert net.in_x.weight.grad is not None and net.in_x.weight.grad.abs().sum() > 0


def test_unknown_derivative_method():
    with pytest.raises(ValueError, match="jvp.*fd"):
        directional_derivative(lambda a: a, (torch.ones(2),), (None,), method="nope")


def test_dm_surrogate_gradient_is_g_over_D():
    x_hat = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 3, 4, dtype=torch.float64)
    loss = dm_surrogate_loss(x_hat, g)
    assert loss.shape == (5,)
    loss.sum().backward()
    torch.testing.assert_close(x_hat.grad, g / 12)


def test_dm_gradient_direction_and_normaliser():
    """With v = (x_r − x0)/r for each model, v_real − v_fake = (x0_fake − x0_real)/r: descending the
    surrogate moves x̂ from the fake denoised estimate toward the real one; λ = 1/mean|x̂ − x0_real|."""
    torch.manual_seed(0)
    b = 6
    x_hat = torch.randn(b, 2, dtype=torch.float64)
    r = torch.rand(b, dtype=torch.float64) * 0.8 + 0.1
    n = torch.randn(b, 2, dtype=torch.float64)
    x_r = renoise(x_hat, r, n)
    torch.testing.assert_close(x_r, (1 - r[:, None]) * x_hat + r[:, None] * n)
    x0_real, x0_fake = torch.zeros(b, 2, dtype=torch.float64), x_hat.clone()
    v_real = (x_r - x0_real) / r[:, None]
    v_fake = (x_r - x0_fake) / r[:, None]
    g_raw = dm_gradient(x_hat, x_r, r, v_real, v_fake, normalize=False)
    torch.testing.assert_close(g_raw, (x0_fake - x0_real) / r[:, None])
    # a descent step on the surrogate moves x̂ toward x0_real = 0
    x = x_hat.clone().requires_grad_(True)
    dm_surrogate_loss(x, g_raw).sum().backward()
    assert ((x_hat - 0.01 * x.grad).norm(dim=1) < x_hat.norm(dim=1)).all()
    g = dm_gradient(x_hat, x_r, r, v_real, v_fake, normalize=True)
    lam = 1 / (x_hat - x0_real).abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(g, g_raw * lam, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(fake_velocity_target(x_hat, n), n - x_hat)


class _DiracMap(torch.nn.Module):
    """Exact average velocity of the linear path to a point mass at ``m``: ``u = (x − m)/t``."""

    def __init__(self, m):
        super().__init__()
        self.m, self.calls = m, 0

    def forward(self, x, t, s=None, cond=None):
        self.calls += 1
        return (x - self.m) / t[:, None]


@pytest.mark.parametrize("steps", [1, 2, 4, 7])
def test_flow_map_sampler_spends_one_nfe_per_step_and_is_exact(steps):
    m = torch.tensor([0.5, -1.0])
    net = _DiracMap(m)
    eps = torch.randn(10, 2)
    x, traj = sample_flow_map(net, eps, steps, return_trajectory=True)
    assert net.calls == steps and len(traj) == steps + 1
    grid = torch.linspace(1, 0, steps + 1)
    for k, s in enumerate(grid):  # every visited state lies on the exact path (1 − s)·m + s·ε
        torch.testing.assert_close(traj[k], (1 - s) * m + s * eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x, m.expand(10, 2), atol=1e-5, rtol=1e-5)


def test_flow_map_jump_and_wrapper():
    net = _two_time_net(dtype=torch.float32)
    x, t, s = torch.randn(3, 2), torch.full((3,), 0.9), torch.full((3,), 0.2)
    expected = x + (s - t)[:, None] * net(x, t, s)
    torch.testing.assert_close(flow_map_jump(net, x, t, s), expected)
    torch.testing.assert_close(AverageVelocityMap(net)(x, t, s), expected)
