"""Shared core pieces for the consistency / velocity-matching methods: the broadcast helper, target
networks, per-sample solver steps, per-sample guidance scales, segment edges, adaptive weights and
the shortcut target (and that FreeFlow's helpers are exactly these)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from flowdistill.core.broadcast import bcast
from flowdistill.core.flowmap import shortcut_target
from flowdistill.core.guidance import AutoGuidedField, CFGField, sample_guidance_scale
from flowdistill.core.rng import StepRNG
from flowdistill.core.segments import edge_below, segment_edges, segment_indices
from flowdistill.core.solvers import STEP_SOLVERS, step
from flowdistill.core.targets import TargetNetwork
from flowdistill.core.timesteps import build_grid, shift_time
from flowdistill.core.weights import adaptive_weight

# ---- broadcast ------------------------------------------------------------------------------


def test_bcast_shape_dtype_and_values():
    t = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    x = torch.ones(3, 2, 4, 5, dtype=torch.float32)
    b = bcast(t, x)
    assert b.shape == (3, 1, 1, 1) and b.dtype == torch.float32
    # exact: 0.25, 0.5, 1.0 are representable in float32
    assert torch.equal((b * x)[:, 1, 2, 3], torch.tensor([0.25, 0.5, 1.0]))
    assert bcast(torch.tensor(0.5), x).shape == ()
    with pytest.raises(ValueError, match=r"\[3\]"):
        bcast(torch.ones(2), x)


# ---- target networks ------------------------------------------------------------------------


def test_ema_target_update_is_exactly_the_ema_formula():
    torch.manual_seed(0)
    student = nn.Linear(4, 3)
    target = TargetNetwork(student, mode="ema", decay=0.95)
    old = {k: v.clone() for k, v in target.ema.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    target.update(student)
    for name, p in student.named_parameters():
        expected = 0.95 * old[name] + (1 - 0.95) * p.detach()
        # fp32: the in-place mul/add rounds once per op, so agreement is to ~1 ulp of |θ| ≤ ~4
        torch.testing.assert_close(dict(target.ema.named_parameters())[name], expected, rtol=0, atol=1e-6)
        assert not torch.equal(expected, p)  # the update really averaged
    # a second update keeps averaging toward θ
    prev = target.ema.weight.detach().clone()
    target.update(student)
    expected = 0.95 * prev + 0.05 * student.weight.detach()
    torch.testing.assert_close(target.ema.weight, expected, rtol=0, atol=1e-6)  # fp32, as above
    # the EMA is checkpointed with its owner: its weights are in the state dict, the student's are not
    assert set(target.state_dict()) == {"ema.weight", "ema.bias"}
    assert all(not p.requires_grad for p in target.parameters())


def test_online_target_is_the_current_student_without_gradient():
    torch.manual_seed(0)
    student = nn.Linear(4, 3)
    target = TargetNetwork(student, mode="online")
    x = torch.randn(5, 4)
    with torch.no_grad():
        student.weight.mul_(2.0)  # later changes to the student are seen by the target
    y = target(x)
    assert torch.equal(y, student(x).detach())
    assert not y.requires_grad and y.grad_fn is None
    target.update(student)  # no-op online
    assert torch.equal(target(x), y)
    assert target.state_dict() == {}  # the student is owned (and saved) by the distiller
    with pytest.raises(ValueError, match="mode"):
        TargetNetwork(student, mode="slow")


def test_ema_target_state_dict_round_trip():
    torch.manual_seed(0)
    a = TargetNetwork(nn.Linear(2, 2), mode="ema", decay=0.5)
    a.update(nn.Linear(2, 2))
    b = TargetNetwork(nn.Linear(2, 2), mode="ema", decay=0.5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 2)
    assert torch.equal(a(x), b(x))


def test_target_is_checkpointed_with_its_owner_and_stays_in_eval():
    class Owner(nn.Module):
        def __init__(self, mode: str):
            super().__init__()
            self.student = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
            self.target = TargetNetwork(self.student, mode=mode)

    ema, online = Owner("ema"), Owner("online")
    assert set(ema.state_dict()) == {"student.0.weight", "student.0.bias", "target.ema.0.weight",
                                     "target.ema.0.bias"}
    assert set(online.state_dict()) == {"student.0.weight", "student.0.bias"}  # no duplicate copy
    ema.train()
    assert ema.student.training and not ema.target.ema.training  # no dropout in the target
    x = torch.randn(4, 2)
    assert torch.equal(ema.target(x), ema.target(x))


# ---- per-sample solver step -----------------------------------------------------------------

A = -0.7  # v(x, t) = A·x: exact solution x(s) = x(t)·exp(A·(s − t))


def linear_field(x: Tensor, t: Tensor, cond=None) -> Tensor:
    return A * x


def time_field(x: Tensor, t: Tensor, cond=None) -> Tensor:
    """v = x·cos(t)·(1 + t): time-dependent so the midpoint/Heun times matter."""
    tb = bcast(t, x)
    return x * torch.cos(tb) * (1 + tb)


@pytest.mark.parametrize("solver", STEP_SOLVERS)
def test_per_sample_step_equals_each_sample_alone(solver):
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([1.0, 0.8, 0.5, 0.3], dtype=torch.float64)
    s = torch.tensor([0.6, 0.8, 0.0, 0.25], dtype=torch.float64)  # sample 1: s = t
    out = step(time_field, x, t, s, solver)
    for i in range(4):
        alone = step(time_field, x[i:i + 1], t[i:i + 1], s[i:i + 1], solver)
        # float64, elementwise field: the batch computes each row with the same operations
        torch.testing.assert_close(out[i:i + 1], alone, rtol=0, atol=1e-15)
    assert torch.equal(out[1], x[1])  # s = t: identity, exactly


def test_step_s_equal_t_is_exact_identity_for_every_solver():
    x = torch.randn(3, 2, 2)
    t = torch.tensor([1.0, 0.37, 0.0])
    for solver in STEP_SOLVERS:
        assert torch.equal(step(time_field, x, t, t.clone(), solver), x)


def test_ddim_equals_euler_and_heun_is_second_order():
    torch.manual_seed(1)
    x = torch.randn(2, 5, dtype=torch.float64)
    t = torch.tensor([1.0, 0.6], dtype=torch.float64)
    assert torch.equal(step(linear_field, x, t, t - 0.3, "ddim"), step(linear_field, x, t, t - 0.3, "euler"))

    def err(solver: str, h: float) -> float:
        s = t - h
        exact = x * math.exp(A * -h)
        return float((step(linear_field, x, t, s, solver) - exact).abs().max())

    for solver in ("heun", "midpoint"):
        ratio = err(solver, 0.2) / err(solver, 0.1)
        # local error of a 2nd-order method is C·h³ + O(h⁴): halving h divides it by ≈ 8; over a fixed
        # interval (2 steps of h/2 vs 1 of h) by ≈ 4 — check the global form below
        assert 7.0 < ratio < 9.0, (solver, ratio)

    def global_err(solver: str, n: int) -> float:
        xx, tt = x.clone(), torch.ones(2, dtype=torch.float64)
        for _ in range(n):
            xx = step(linear_field, xx, tt, tt - 1.0 / n, solver)
            tt = tt - 1.0 / n
        return float((xx - x * math.exp(-A)).abs().max())

    r2 = global_err("heun", 8) / global_err("heun", 16)
    r1 = global_err("euler", 8) / global_err("euler", 16)
    assert 3.6 < r2 < 4.4, r2  # order 2: error ∝ h², halving h → ≈ 4× (O(h³) terms keep it off exact 4)
    assert 1.8 < r1 < 2.2, r1  # order 1 for contrast


def test_per_sample_heun_converges_at_order_two_on_a_time_dependent_field():
    """Each sample integrates its own interval [s_i, t_i] of dx/dt = x·cos(t)·(1 + t), whose exact flow
    is x(s) = x(t)·exp(F(s) − F(t)), F(τ) = (1 + τ)·sin τ + cos τ."""
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0], [2.0, 1.0]], dtype=torch.float64)
    t0 = torch.tensor([1.0, 0.9, 0.6], dtype=torch.float64)
    s0 = torch.tensor([0.0, 0.3, 0.1], dtype=torch.float64)

    def F(tau: Tensor) -> Tensor:
        return (1 + tau) * torch.sin(tau) + torch.cos(tau)

    exact = x * torch.exp(F(s0) - F(t0))[:, None]

    def run(solver: str, n: int) -> Tensor:
        xx = x.clone()
        for i in range(n):  # n equal per-sample sub-steps from t_i to s_i
            a, b = t0 + (s0 - t0) * i / n, t0 + (s0 - t0) * (i + 1) / n
            xx = step(time_field, xx, a, b, solver)
        return (xx - exact).abs().amax(dim=1)  # per-sample error

    for solver, order in (("heun", 2), ("midpoint", 2), ("euler", 1)):
        ratio = run(solver, 16) / run(solver, 32)
        # error ∝ h^order per sample; higher-order terms keep the ratio within ~10 % of 2^order at h ≤ 1/16
        assert bool(((ratio > 0.9 * 2**order) & (ratio < 1.1 * 2**order)).all()), (solver, ratio)


def test_step_rejects_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="solver"):
        step(linear_field, x, torch.ones(2), torch.zeros(2), "rk4")
    with pytest.raises(ValueError, match=r"\[B\]"):
        step(linear_field, x, torch.ones(3), torch.zeros(3))


# ---- per-sample guidance --------------------------------------------------------------------


class CondField(nn.Module):
    """A class-conditional field with a per-class offset (null label = 3)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.tensor([[1.0, -2.0], [0.5, 0.5], [-1.0, 3.0], [0.0, 0.0]], dtype=torch.float64)

    def forward(self, x, t, cond=None):
        c = torch.full((x.shape[0],), 3) if cond is None else cond
        return -x * bcast(t, x) + self.emb[c]


@pytest.mark.parametrize("interval", [None, (0.2, 0.7)])
def test_per_sample_guidance_equals_per_sample_scalar_calls(interval):
    torch.manual_seed(0)
    g = CFGField(CondField(), 2.0, null_label=3, interval=interval)
    x = torch.randn(4, 2, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    cond = torch.tensor([0, 1, 2, 0])
    w = torch.tensor([1.0, 3.0, 7.5, 12.0], dtype=torch.float64)
    out = g(x, t, cond, w=w)
    per_tensor = CFGField(CondField(), w, null_label=3, interval=interval)(x, t, cond)
    assert torch.equal(out, per_tensor)
    for i in range(4):
        gi = CFGField(CondField(), float(w[i]), null_label=3, interval=interval)
        alone = gi(x[i:i + 1], t[i:i + 1], cond[i:i + 1])
        # float64 elementwise combine; the w = 1 scalar path skips the combine (v_c vs v_u + 1·(v_c − v_u))
        torch.testing.assert_close(out[i:i + 1], alone, rtol=0, atol=1e-12)
    # the formula itself: v_u + w·(v_c − v_u) inside the interval, v_c outside
    f = CondField()
    v_u, v_c = f(x, t, None), f(x, t, cond)
    lo, hi = interval if interval is not None else (0.0, 1.0)
    inside = (t >= lo) & (t <= hi)
    w_eff = torch.where(inside, w, torch.ones_like(w))
    torch.testing.assert_close(out, v_u + w_eff[:, None] * (v_c - v_u), rtol=0, atol=1e-12)


def test_autoguidance_per_sample_scale():
    good, bad = CondField(), CondField()
    bad.emb = bad.emb * 0.5
    x, t = torch.randn(3, 2, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    cond = torch.tensor([0, 1, 2])
    w = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    out = AutoGuidedField(good, bad, 1.0)(x, t, cond, w=w)
    vb, vg = bad(x, t, cond), good(x, t, cond)
    torch.testing.assert_close(out, vb + w[:, None] * (vg - vb), rtol=0, atol=1e-12)  # float64 rounding


def test_sample_guidance_scale_range_and_determinism():
    w = sample_guidance_scale(torch.Generator().manual_seed(3), 1000, 5.0, 15.0)
    assert w.shape == (1000,) and float(w.min()) >= 5.0 and float(w.max()) < 15.0
    assert abs(float(w.mean()) - 10.0) < 0.3  # U[5, 15] mean 10, std of the mean 2.89/√1000 ≈ 0.09
    assert torch.equal(w, sample_guidance_scale(torch.Generator().manual_seed(3), 1000, 5.0, 15.0))
    # StepRNG: each rank's slice of the global draw, so 1 process and 2 processes agree
    full = sample_guidance_scale(StepRNG(0, 7), 8, 4.0, 5.0)
    halves = [sample_guidance_scale(StepRNG(0, 7, rank=r, world=2), 4, 4.0, 5.0) for r in range(2)]
    assert torch.equal(full, torch.cat(halves))
    assert torch.equal(sample_guidance_scale(None, 3, 2.0, 2.0), torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="w_min"):
        sample_guidance_scale(None, 3, 5.0, 4.0)


# ---- segment edges --------------------------------------------------------------------------


def test_segment_indices_are_floor_of_linspace():
    assert segment_indices(50, 4) == [0, 12, 25, 37]  # floor(linspace(0, 50, 4, endpoint=False))
    assert segment_indices(50, 1) == [0]
    assert segment_indices(6, 6) == list(range(6))
    with pytest.raises(ValueError, match="segments"):
        segment_indices(10, 11)


def test_one_segment_is_lcm_jump_to_lowest_time():
    grid = build_grid("shifted", 50, shift=3.0)
    edges = segment_edges(grid, 1)
    assert edges.tolist() == [float(grid.min())]
    t = grid[:-1]  # every grid time
    assert torch.equal(edge_below(t, edges), torch.full_like(t, float(grid.min())))


@pytest.mark.parametrize("k", [2, 4, 5])
def test_shifted_grid_edges_are_shift_of_j_over_k(k):
    N = 100
    grid = build_grid("shifted", N, shift=3.0, dtype=torch.float64)  # sampling order 1 → 0
    edges = segment_edges(grid, k)
    assert bool((edges[1:] > edges[:-1]).all())
    assert all(bool((grid == e).any()) for e in edges)  # edges ⊂ grid (exact values)
    expected = shift_time(torch.arange(k, dtype=torch.float64) / k, 3.0)
    # k divides N: the edge is shift(n/N) with n/N = j/k, the same float64 formula up to rounding of n/N
    torch.testing.assert_close(edges, expected, rtol=0, atol=1e-14)
    assert float(edges[0]) == float(grid.min()) == 0.0
    assert torch.equal(segment_edges(grid.flip(0), k), edges)  # either grid order


def test_edge_below_on_and_between_edges():
    grid = build_grid("shifted", 12, shift=3.0)
    edges = segment_edges(grid, 4)  # indices 0, 3, 6, 9 ascending
    asc = grid.flip(0)
    assert torch.equal(edges, asc[[0, 3, 6, 9]])
    # on an edge: the edge itself (the zero-length jump); just above: still that edge; below: the one under
    on = edge_below(edges.clone(), edges)
    assert torch.equal(on, edges)
    above = edge_below(asc[[1, 4, 7, 10, 12]], edges)
    assert torch.equal(above, edges[[0, 1, 2, 3, 3]])
    below = edge_below(asc[[2, 5, 8]], edges)
    assert torch.equal(below, edges[[0, 1, 2]])
    with pytest.raises(ValueError, match="lowest"):
        edge_below(torch.tensor([0.5]), torch.tensor([0.6, 0.8]))


# ---- adaptive weights and the shortcut target (moved from FreeFlow) -------------------------


def test_adaptive_weight_formula_and_no_gradient():
    sq = torch.tensor([0.0, 0.01, 1.0, 4.0], requires_grad=True)
    w = adaptive_weight(sq, p=1.0, c=1e-3)
    assert torch.equal(w, 1.0 / (sq.detach() + 1e-3))  # same single fp32 op sequence: pow(-1) vs 1/x
    assert not w.requires_grad
    w5 = adaptive_weight(sq, p=0.5, c=0.1)
    torch.testing.assert_close(w5, (sq.detach() + 0.1) ** -0.5, rtol=0, atol=0)
    assert torch.equal(adaptive_weight(sq, p=0.0), torch.ones(4))


class TwoTime(nn.Module):
    """u(x, t, s) = x·(1 + t) − s (a known two-time net)."""

    def forward(self, x, t, s, cond=None):
        return x * (1 + bcast(t, x)) - bcast(s, x)


def test_shortcut_target_is_two_half_jumps():
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    t = torch.tensor([1.0, 0.5], dtype=torch.float64)
    s = torch.tensor([0.0, 0.5], dtype=torch.float64)
    got = shortcut_target(TwoTime(), x, t, s)
    m = (t + s) / 2
    u1 = x * (1 + t[:, None]) - m[:, None]
    xm = x + (m - t)[:, None] * u1
    u2 = xm * (1 + m[:, None]) - s[:, None]
    assert torch.equal(got, 0.5 * (u1 + u2))
    # s = t: both halves are u(x, t, t), the target is u(x, t, t) itself
    assert torch.equal(got[1], (x[1] * 1.5 - 0.5))


def test_freeflow_helpers_are_the_core_functions():
    from flowdistill.distillers.freeflow import FreeFlow, FreeFlowConfig

    cfg = FreeFlowConfig(adaptive_p=0.75, adaptive_c=0.02, correction=False, mode="prediction")
    ff = FreeFlow(cfg, TwoTime(), teacher=CondField())
    sq = torch.tensor([0.0, 0.3, 2.0])
    assert torch.equal(ff._robust_weight(sq), (sq + 0.02).pow(-0.75))
    x = torch.randn(3, 2)
    t, s = torch.tensor([1.0, 0.7, 0.4]), torch.tensor([0.0, 0.2, 0.4])
    assert torch.equal(ff._shortcut_target(x, t, s, None), shortcut_target(TwoTime(), x, t, s))
