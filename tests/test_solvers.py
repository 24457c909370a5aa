"""Solver accuracy: measured convergence orders on an analytic field; dopri5 vs torchdiffeq."""

import math

import pytest
import torch

from flowdistill.core.sampling import sample_velocity
from flowdistill.core.solvers import SOLVERS, solve, steps_for_nfe
from flowdistill.core.timesteps import uniform_grid


def _field(x, t, cond=None):
    """dx/dt = −t·x + sin(t): non-autonomous, so every stage's time matters."""
    return -t[:, None] * x + torch.sin(t)[:, None]


def _exact(x1):
    from scipy.integrate import solve_ivp

    sol = solve_ivp(lambda t, y: -t * y + math.sin(t), (1.0, 0.0), [x1], rtol=1e-13, atol=1e-13)
    return sol.y[0, -1]


def measured_order(method: str) -> float:
    x = torch.full((2, 1), 0.7, dtype=torch.float64)
    ref = _exact(0.7)
    errs = []
    for n in (8, 16, 32, 64):
        r = solve(_field, x, uniform_grid(n, dtype=torch.float64), method)
        errs.append(abs(r.x[0, 0].item() - ref))
    return math.log2(errs[-2] / errs[-1])


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_convergence_order(method, order):
    assert measured_order(method) == pytest.approx(order, abs=0.15)


def test_nfe_counts_and_trajectory():
    x = torch.randn(3, 2)
    for name, per in (("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)):
        calls = []

        def f(x, t, cond=None, calls=calls):
            calls.append(1)
            return -x

        r = solve(f, x, uniform_grid(5), name, return_trajectory=True)
        assert r.nfe == 5 * per == len(calls)
        assert len(r.trajectory) == 6 and torch.equal(r.trajectory[0], x)
        assert steps_for_nfe(name, 4 * per) == 4
    with pytest.raises(ValueError, match="multiple"):
        steps_for_nfe("heun", 3)


def test_dopri5_accuracy_and_matches_torchdiffeq():
    import torchdiffeq

    x = torch.full((4, 1), 0.7, dtype=torch.float64)
    r = solve(_field, x, torch.tensor([1.0, 0.0], dtype=torch.float64), "dopri5", rtol=1e-9, atol=1e-9)
    assert abs(r.x[0, 0].item() - _exact(0.7)) < 1e-7
    ref = torchdiffeq.odeint(lambda t, y: _field(y, t.expand(y.shape[0])), x,
                             torch.tensor([1.0, 0.0], dtype=torch.float64), method="dopri5",
                             rtol=1e-9, atol=1e-9)[-1]
    assert torch.allclose(r.x, ref, atol=1e-7)


def test_dopri5_interior_times_and_nfe():
    x = torch.ones(2, 1, dtype=torch.float64)
    f = lambda x, t, cond=None: -x  # noqa: E731
    r = solve(f, x, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), "dopri5", return_trajectory=True,
              rtol=1e-8, atol=1e-8)
    assert len(r.trajectory) == 3
    assert r.trajectory[1][0, 0].item() == pytest.approx(math.exp(0.5), rel=1e-7)
    assert r.x[0, 0].item() == pytest.approx(math.e, rel=1e-7)
    assert r.nfe > 6


def test_sample_velocity_budget():
    x = torch.randn(4, 2)
    r = sample_velocity(lambda x, t, cond=None: -x, x, nfe=8, solver="heun")
    assert r.nfe == 8
    assert "dopri5" in SOLVERS
