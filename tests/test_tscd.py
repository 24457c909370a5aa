"""TSCD / LCM / PCM (flowdistill/distillers/tscd.py, METHODS.md §3): the boundary case, the exact
flow map of a straight flow, target networks, edges on a shifted grid, the sampler's calls and γ,
and a tiny CLI run; plus the shared pieces it added to the core (elementwise pseudo-Huber, the
path's forward transition)."""

from __future__ import annotations

import json

import pytest
import torch

from flowdistill.core.losses import premetric, pseudo_huber_elementwise
from flowdistill.core.paths import PATHS
from flowdistill.core.rng import StepRNG
from flowdistill.core.solvers import step as solver_step
from flowdistill.core.timesteps import shift_time
from flowdistill.distillers import DISTILLERS
from flowdistill.distillers.tscd import LCM, PCM, TSCD, TSCDConfig
from flowdistill.errors import ConfigError
from flowdistill.models import init_from
from flowdistill.models.mlp import MLPFlowNet
from tests.helpers import REPO, main_in_process

TEACHER = REPO / "assets" / "checkerboard_teacher"
CONFIG = REPO / "configs" / "tscd_checkerboard.yaml"


class LinearStraightField(torch.nn.Module):
    """Exact velocity of the straight coupling ``x0 = a·ε`` (as in tests/test_reflow.py):
    ``v(x, t) = (1 − a)·x / g(t)``, ``g(t) = (1 − t)·a + t``; its flow map is
    ``X(x, t, s) = x·g(s)/g(t)``, i.e. ``u(x, t, s) = v(x, t)``, and an Euler step is exact."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, x, t, cond=None):
        return (1 - self.a) * x / ((1 - t) * self.a + t)[:, None]


class FlowMapOf(torch.nn.Module):
    """A two-time student ``u(x, t, s) = scale·v(x, t)`` (``scale = 1``: the exact flow map of a
    :class:`LinearStraightField`), with a parameter so optimisers and EMAs have something to move."""

    def __init__(self, field, scale: float = 1.0):
        super().__init__()
        self.field = field
        self.scale = torch.nn.Parameter(torch.tensor(scale, dtype=torch.float64))
        self.calls: list[tuple[float, float]] = []

    def forward(self, x, t, s=None, cond=None):
        self.calls.append((float(t[0]), float(s[0])))
        return self.scale * self.field(x, t)


class CurvedField(torch.nn.Module):
    """A rotating field (curved trajectories), for a teacher whose Euler step is not exact."""

    def forward(self, x, t, cond=None):
        return torch.stack([-x[:, 1], x[:, 0]], dim=1) + 0.3 * x


class NaNOnDiagonal(FlowMapOf):
    """A student undefined at ``s = t`` (NaN there): the boundary target must not come from it."""

    def forward(self, x, t, s=None, cond=None):
        u = 7.0 * super().forward(x, t, s, cond)
        return torch.where((s == t)[:, None], torch.full_like(u, float("nan")), u)


def _tscd(student, teacher, **kw) -> TSCD:
    cfg = TSCDConfig(**kw)
    cfg.validate()
    return TSCD(cfg, student, teacher)


# -- core pieces ------------------------------------------------------------------------------
def test_pseudo_huber_elementwise_is_registered_and_elementwise():
    a = torch.tensor([[0.0, 3.0], [0.1, 0.0]], dtype=torch.float64)
    b = torch.zeros_like(a)
    c = 0.001
    want = ((a - b).pow(2) + c * c).sqrt().sub(c).mean(dim=1)
    torch.testing.assert_close(premetric("pseudo_huber_elementwise")(a, b), want)
    torch.testing.assert_close(pseudo_huber_elementwise(a, b, c=0.5),
                               ((a.pow(2) + 0.25).sqrt() - 0.5).mean(1))
    # elementwise: ≈ mean |d| for |d| ≫ c (not the per-sample norm of rfpp's pseudo-Huber)
    assert abs(float(pseudo_huber_elementwise(a, b)[0]) - 1.5) < 2e-3
    assert float(premetric("pseudo_huber")(a, b, c=c)[0]) == pytest.approx((3.0 - c + c) / 2, abs=2e-3)
    assert float(pseudo_huber_elementwise(b, b).abs().max()) == 0.0
    with pytest.raises(ValueError, match="c > 0"):
        pseudo_huber_elementwise(a, b, c=0.0)


def test_forward_transition_keeps_the_marginal_and_is_identity_at_equal_times():
    path = PATHS.build("linear")
    torch.manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 2.0, dtype=torch.float64)
    s = torch.full((n,), 0.3, dtype=torch.float64)
    t = torch.full((n,), 0.7, dtype=torch.float64)
    x_s = path.sample(x0, torch.randn_like(x0), s)
    x_t = path.forward_transition(x_s, s, t, torch.randn_like(x0))
    assert float(x_t.mean()) == pytest.approx(0.3 * 2.0, abs=0.01)  # α_t·x0
    assert float(x_t.std()) == pytest.approx(0.7, abs=0.01)  # σ_t
    assert torch.equal(path.forward_transition(x_s, s, s, torch.randn_like(x0)), x_s)
    with pytest.raises(ValueError, match="upward"):
        path.forward_transition(x_s, t, s, x_s)


# -- the loss ---------------------------------------------------------------------------------
def test_boundary_target_is_the_teacher_step_exactly():
    """When ``t'`` is the edge, the target is the teacher's step itself (not the net's 0-length jump)."""
    teacher = CurvedField()
    student = NaNOnDiagonal(teacher)  # a 0-length jump through the net would be x + 0·NaN = NaN
    for solver in ("euler", "heun"):
        d = _tscd(student, teacher, segments=5, num_steps=50, grid="shifted", solver=solver)
        grid = d.grid_ascending("cpu", torch.float32)
        edges = d.edges(5, dtype=torch.float32)
        n = torch.tensor([10, 20, 0, 11], dtype=torch.long)  # t' = t_n: edges (10, 20, 0) and not (11)
        t, tp = grid[n + 1], grid[n]
        from flowdistill.core.segments import edge_below
        e = edge_below(tp, edges)
        assert torch.equal(tp[:3], e[:3]) and bool(tp[3] != e[3])
        x_t = torch.randn(4, 2)
        x_tp, target = d.consistency_target(x_t, t, tp, e)
        step = solver_step(teacher, x_t, t, tp, solver)
        assert (target[:3] - step[:3]).abs().max() <= 1e-7
        assert (target[3] - step[3]).abs().max() > 1e-3  # off the edge the target is θ⁻'s jump


def test_loss_vanishes_at_the_exact_flow_map_of_a_straight_teacher():
    teacher = LinearStraightField(0.3)
    batch = {"x": torch.randn(256, 2, dtype=torch.float64)}
    for k in (1, 4):
        exact = _tscd(FlowMapOf(teacher, 1.0), teacher, segments=k, num_steps=20)
        out = exact.loss(batch, 0, "student", StepRNG(0, 0))
        assert float(out["loss"].detach()) < 1e-10 and float(out["mse"]) < 1e-12
        wrong = _tscd(FlowMapOf(teacher, 1.2), teacher, segments=k, num_steps=20)
        assert float(wrong.loss(batch, 0, "student", StepRNG(0, 0))["loss"].detach()) > 1e-3


def test_online_and_ema_targets():
    teacher = LinearStraightField(0.3)
    student = FlowMapOf(teacher, 1.0)
    online = _tscd(student, teacher, target="online")
    assert online.target.net is student and not list(online.target.parameters())
    ema = _tscd(student, teacher, target="ema", target_decay=0.9)
    assert ema.target.net is not student
    assert any(k.startswith("target.ema.") for k in ema.trainable_state_dict())
    with torch.no_grad():
        student.scale.fill_(2.0)
    assert float(ema.target.net.scale) == 1.0  # the copy does not follow until after_step
    ema.after_step(1, "student")
    assert float(ema.target.net.scale) == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    online.after_step(1, "student")  # a no-op
    assert online.target.net is student
    lcm = LCM(LCM.Config(), student, teacher)
    assert lcm.cfg.segments == 1 and lcm.target.mode == "ema" and lcm.cfg.target_decay == 0.95
    assert lcm.cfg.sample_gamma == 1.0  # LCM's multistep sampler
    pcm = PCM(PCM.Config(), student, teacher)
    assert pcm.target.mode == "online" and pcm.cfg.loss == "pseudo_huber_elementwise"
    assert pcm.cfg.huber_c == 0.001
    assert DISTILLERS.get("lcm") is LCM and DISTILLERS.get("pcm") is PCM


def test_edges_on_a_shifted_grid_and_config_errors():
    d = _tscd(FlowMapOf(CurvedField()), CurvedField(), segments=5, num_steps=50, grid="shifted", shift=3.0)
    want = shift_time(torch.arange(5, dtype=torch.float64) / 5, 3.0)
    torch.testing.assert_close(d.edges(), want)
    # every edge is a point of the teacher grid, and the sampler's times are its upper edges then 0
    grid = d.grid_ascending("cpu", torch.float64)
    assert all(bool((grid == e).any()) for e in d.edges())
    torch.testing.assert_close(d.sample_times(5, dtype=torch.float64),
                               torch.cat([torch.ones(1, dtype=torch.float64), want[1:].flip(0),
                                          torch.zeros(1, dtype=torch.float64)]))
    for bad, key in ((dict(segments=0), "segments"), (dict(segments=60), "segments"),
                     (dict(solver="rk4"), "solver"), (dict(target="slow"), "target"),
                     (dict(loss="pseudo_huber"), "loss"), (dict(huber_c=0.0), "huber_c")):
        with pytest.raises(ConfigError, match=key):
            TSCDConfig(**bad).validate()


# -- sampling ---------------------------------------------------------------------------------
def test_sampler_calls_and_gamma():
    teacher = LinearStraightField(0.3)
    student = FlowMapOf(teacher, 1.0)
    d = _tscd(student, teacher, segments=4, num_steps=48, grid="shifted")
    eps = torch.randn(16, 2, dtype=torch.float64)
    for nfe in (1, 2, 4, 8):
        student.calls.clear()
        x = d.sample(eps, nfe)
        assert len(student.calls) == nfe  # one network call per jump
        times = d.sample_times(nfe, dtype=torch.float64).tolist()
        assert [c[0] for c in student.calls] == pytest.approx(times[:-1])
        assert [c[1] for c in student.calls] == pytest.approx(times[1:])
        torch.testing.assert_close(x, 0.3 * eps)  # the exact flow map lands on the coupling
    assert student.calls[0] == (1.0, pytest.approx(float(d.edges(8)[-1])))
    curved = FlowMapOf(CurvedField(), 0.5)
    dc = _tscd(curved, CurvedField(), segments=4, num_steps=48)
    base = dc.sample(eps, 4)
    assert torch.equal(dc.sample(eps, 4, gamma=0.0), base)
    curved.calls.clear()
    g = dc.sample(eps, 4, gamma=0.5, seed=3)
    assert len(curved.calls) == 4 and not torch.allclose(g, base)
    lowered = [0.5 * s for s in dc.sample_times(4).tolist()[1:4]]  # s' = (1 − γ)·s_next
    assert [c[1] for c in curved.calls[:3]] == pytest.approx(lowered)
    assert torch.equal(dc.sample(eps, 4, gamma=0.5, seed=3), g)  # seeded
    with pytest.raises(ConfigError, match="gamma"):
        dc.sample(eps, 4, gamma=1.5)
    with pytest.raises(ConfigError, match="nfe"):
        dc.sample(eps, 49)
    with pytest.raises(ConfigError, match="solver"):
        dc.sample(eps, 2, solver="heun")


# -- training ---------------------------------------------------------------------------------
def test_loss_on_a_fixed_batch_decreases():
    torch.manual_seed(0)
    teacher = MLPFlowNet(data_dim=2, hidden=32, depth=2).eval()
    student = MLPFlowNet(data_dim=2, hidden=32, depth=2, two_time=True)
    init_from(student, teacher)  # u(x, t, t) = v(x, t) at the start
    d = _tscd(student, teacher, segments=2, num_steps=10, loss="l2")
    batch = {"x": torch.randn(256, 2)}
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(d.loss(batch, 0, "student", StepRNG(1, 0))["loss"])

    before = fixed_loss()
    for i in range(100):
        opt.zero_grad()
        d.loss(batch, i, "student", StepRNG(1, 0))["loss"].backward()
        opt.step()
        d.after_step(i, "student")
    assert fixed_loss() < 0.5 * before


@pytest.mark.skipif(not TEACHER.is_dir(), reason="checkerboard teacher asset not shipped")
def test_cli_trains_and_samples_a_tiny_tscd_run(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = main_in_process(capsys, "distill", str(CONFIG), f"teacher={TEACHER}", f"out_dir={run}",
                                   "train.steps=5", "train.batch_size=64", "train.log_every=1",
                                   "train.ckpt_every=0", "distiller.num_steps=16", "distiller.target=ema")
    assert code == 0, err
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log if r.get("loss") is not None]
    png = tmp_path / "s.png"
    code, _, err = main_in_process(capsys, "sample", str(run), "--nfe", "4", "--n", "64", "--out", str(png))
    assert code == 0, err
    assert png.stat().st_size > 0


@pytest.mark.skipif(not TEACHER.is_dir(), reason="checkerboard teacher asset not shipped")
def test_progressive_recipe_runs_8_4_2_1_each_stage_from_the_last(tmp_path):
    from flowdistill.api import build_distiller_for
    from flowdistill.recipes import load_recipe, run_recipe
    from tests.helpers import student_weights

    recipe = REPO / "configs" / "recipes" / "tscd_progressive_checkerboard.yaml"
    over = [f"out_dir={tmp_path / 'p'}", f"teacher={TEACHER}", "train.steps=2", "train.batch_size=32",
            "train.warmup_steps=0", "train.ckpt_every=0", "train.log_every=1"]
    r = load_recipe(recipe, over)
    assert [r.stage(k).job.distiller.segments for k in ("k8", "k4", "k2", "k1")] == [8, 4, 2, 1]
    assert [r.stage(k).job.distiller.target for k in ("k8", "k4", "k2", "k1")] == ["online"] * 3 + ["ema"]
    runs = run_recipe(recipe, over, report=False, progress=False)
    for prev, cur in (("k8", "k4"), ("k4", "k2"), ("k2", "k1")):
        start = build_distiller_for(r.stage(cur).job).student.state_dict()
        before = student_weights(runs[prev])
        assert all(torch.equal(start[k], before[k]) for k in before), cur  # initialised from prev


def test_coupling_error_is_zero_for_the_exact_flow_map_and_sees_a_wrong_coupling():
    from flowdistill.eval.coupling import coupling_error, teacher_ode

    teacher = LinearStraightField(0.3)
    eps = torch.randn(64, 2, dtype=torch.float64)
    ref = teacher_ode(teacher, eps, ref_steps=64)
    torch.testing.assert_close(ref, 0.3 * eps)
    d = _tscd(FlowMapOf(teacher, 1.0), teacher, segments=2, num_steps=16)
    errs = coupling_error(lambda z, k: d.sample(z, k), ref, eps, (1, 2, 4))
    assert max(errs.values()) < 1e-12
    # the right distribution, the wrong coupling (ε ↦ −ODE(ε) is as good a sample of the target)
    flipped = coupling_error(lambda z, k: -d.sample(z, k), ref, eps, (1,))
    assert flipped[1] == pytest.approx(float((2 * ref).norm(dim=1).mean()))


def test_unified_student_draws_its_segmentation_per_sample():
    """``segment_choices=[1, 4]``: every sample's edge is the lower edge of its ``t'`` under k = 1 or
    k = 4, both segmentations occur, and the loss still vanishes at the exact flow map."""
    from flowdistill.core.segments import edge_below, segment_edges

    teacher = LinearStraightField(0.3)
    d = _tscd(FlowMapOf(teacher, 1.0), teacher, segments=4, num_steps=20, segment_choices=[1, 4])
    assert d.cfg.trained_segments == (1, 4)
    grid = d.grid_ascending("cpu", torch.float64)
    tp = grid[torch.randint(20, (512,), generator=torch.Generator().manual_seed(0))]
    e = d.sample_edges(tp, grid, StepRNG(0, 0))
    e1, e4 = edge_below(tp, segment_edges(grid, 1)), edge_below(tp, segment_edges(grid, 4))
    assert bool(((e == e1) | (e == e4)).all())
    differ = e1 != e4
    assert bool((e[differ] == e1[differ]).any()) and bool((e[differ] == e4[differ]).any())
    batch = {"x": torch.randn(256, 2, dtype=torch.float64)}
    assert float(d.loss(batch, 0, "student", StepRNG(0, 0))["loss"].detach()) < 1e-10
    for bad in ([0], [4, 21], [2.5]):
        with pytest.raises(ConfigError, match="segment_choices"):
            TSCDConfig(num_steps=20, segment_choices=bad).validate()
