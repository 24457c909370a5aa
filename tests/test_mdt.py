"""MDT-dist (flowdistill/distillers/mdt.py, METHODS.md §4): the VM target is exact where the average
velocity is known in closed form, the finite difference is first order against the JVP, the
per-sample normaliser, VD's gradient is fake − real at the student's output, VD's own guidance
scale, the samplers, config errors, and a tiny CLI run; plus the one-sided difference it added to
core/derivatives.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flowdistill.core.derivatives import backward_difference, directional_derivative
from flowdistill.core.guidance import CFGField
from flowdistill.core.rng import StepRNG
from flowdistill.distillers import DISTILLERS
from flowdistill.distillers.mdt import MDT, MDTConfig, normalize_derivative
from flowdistill.errors import ConfigError
from tests.helpers import REPO, main_in_process

TEACHER = REPO / "assets" / "checkerboard_teacher"
CONFIG = REPO / "configs" / "mdt_checkerboard.yaml"


class LinearStraightField(torch.nn.Module):
    """Exact velocity of the straight coupling ``x0 = a·ε`` (as in tests/test_tscd.py):
    ``v(x, t) = (1 − a)·x / g(t)``, ``g(t) = (1 − t)·a + t``. Its trajectories are straight lines, so
    the average velocity to ``t = 0`` is ``v`` itself and is constant along them (``dv/dt = 0``)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, x, t, cond=None):
        return (1 - self.a) * x / ((1 - t) * self.a + t)[:, None]


class GaussianField(torch.nn.Module):
    """Exact velocity of data ``N(0, s²·I)`` on the linear path: ``x_t = g(t)·z`` with
    ``g(t) = √((1 − t)²·s² + t²)``, so ``v(x, t) = g'(t)/g(t)·x`` (curved in ``t``: not straight).
    :meth:`average` is the exact average velocity to data, ``u(x, t) = x·(1 − s/g(t))/t``."""

    def __init__(self, s: float):
        super().__init__()
        self.s = s

    def g(self, t):
        return ((1 - t) ** 2 * self.s**2 + t**2).sqrt()

    def forward(self, x, t, cond=None):
        dg = (t - (1 - t) * self.s**2) / self.g(t)
        return (dg / self.g(t))[:, None] * x

    def average(self, x, t, cond=None):
        return x * ((1 - self.s / self.g(t)) / t)[:, None]


class Student(torch.nn.Module):
    """A one-time student ``scale·f(x, t)`` (``f`` a field's ``forward`` or ``average``), with a
    parameter so optimisers and EMAs have something to move."""

    def __init__(self, fn, scale: float = 1.0):
        super().__init__()
        self.fn = fn
        self.scale = torch.nn.Parameter(torch.tensor(scale, dtype=torch.float64))

    def forward(self, x, t, cond=None):
        return self.scale * self.fn(x, t)


def _mdt(student, teacher, **kw) -> MDT:
    cfg = MDTConfig(**kw)
    cfg.validate()
    return MDT(cfg, student, teacher)


def _points(b=64, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(b, generator=g, dtype=torch.float64)
    return x, t


# -- the VM target ----------------------------------------------------------------------------
@pytest.mark.parametrize("derivative", ["fd", "jvp"])
@pytest.mark.parametrize("norm", ["l2", "rms", "none"])
def test_vm_loss_is_zero_for_the_exact_average_velocity_of_a_straight_teacher(derivative, norm):
    """Straight teacher: ``u = v_T`` and ``dv/dt = 0`` exactly (the Euler step of the FD is exact), so
    the target is ``v_T`` and ``L_VM`` of the exact student is 0 for every normaliser (float64
    rounding only); a wrong student (scale 1.1) is not."""
    teacher = LinearStraightField(0.4)
    batch = {"x": torch.randn(256, 2, dtype=torch.float64) * 0.4}
    d = _mdt(Student(teacher.forward), teacher, lambda_vd=0.0, derivative=derivative, dvdt_norm=norm)
    out = d.loss(batch, 0, "student", StepRNG(3, 0))
    assert float(out["vm"]) < 1e-20
    wrong = _mdt(Student(teacher.forward, 1.1), teacher, lambda_vd=0.0, derivative=derivative,
                 dvdt_norm=norm)
    assert float(wrong.loss(batch, 0, "student", StepRNG(3, 0))["vm"]) > 1e-4


def test_vm_target_is_the_exact_average_velocity_of_a_curved_teacher():
    """Gaussian data (curved trajectories): with the exact ``u`` as student, JVP and no normaliser,
    ``v_T − t·du/dt = u`` to rounding — the identity behind VM, checked independently of it."""
    teacher = GaussianField(0.3)
    d = _mdt(Student(teacher.average), teacher, derivative="jvp", dvdt_norm="none")
    x, t = _points()
    target, _ = d.vm_target(x, t, None, teacher(x, t))
    torch.testing.assert_close(target, teacher.average(x, t), rtol=1e-10, atol=1e-10)
    # and the student's own (curved) u is not the teacher's velocity: the correction matters
    assert float((teacher(x, t) - teacher.average(x, t)).abs().max()) > 0.1


def test_finite_difference_is_first_order_in_delta_against_the_jvp():
    """The one-sided FD along one teacher step converges to the JVP with error ∝ Δ: halving Δ
    halves the error (ratio 2 ± 0.2; a central difference would give 4)."""
    teacher = GaussianField(0.3)
    student = Student(teacher.average)
    x, t = _points()
    t = t.clamp_min(0.3)
    v = teacher(x, t)
    _, exact = directional_derivative(lambda a, b: student(a, b), (x, t), (v, torch.ones_like(t)), "jvp")
    errs = []
    for delta in (0.02, 0.01, 0.005):
        d = _mdt(student, teacher, derivative="fd", dvdt_norm="none", delta=delta)
        _, corr = d.vm_target(x, t, None, v)  # t·dv/dt
        dvdt = corr / t[:, None]
        errs.append(float((dvdt - exact).norm()))
    assert errs[0] > 1e-4  # not exact: there is an error to halve
    for a, b in zip(errs, errs[1:], strict=False):
        assert a / b == pytest.approx(2.0, abs=0.2)


def test_backward_difference_reuses_the_given_value_and_has_no_graph():
    x = torch.randn(4, 2, requires_grad=True)
    calls = []

    def fn(a):
        calls.append(1)
        return a.pow(2)

    here = fn(x)
    value, d = backward_difference(fn, (x,), (torch.ones_like(x),), h=1e-3, value=here)
    assert len(calls) == 2 and not d.requires_grad and not value.requires_grad
    torch.testing.assert_close(d, 2 * x.detach() - 1e-3, rtol=1e-3, atol=1e-3)  # (x² − (x − h)²)/h


# -- normalisation -----------------------------------------------------------------------------
def test_normaliser_l2_rms_and_none():
    d = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(normalize_derivative(d, "l2", 0.1), d / torch.tensor([[5.1], [0.1]],
                                                                                   dtype=torch.float64))
    rms = 5.0 / math.sqrt(2)
    torch.testing.assert_close(normalize_derivative(d, "rms", 0.1)[0], d[0] / (rms + 0.1))
    assert torch.equal(normalize_derivative(d, "none", 0.1), d)
    # the public L2 form bounds the correction by 1 in norm whatever D, so per element it fades
    # like 1/√D; the RMS form keeps the per-element scale (here ≈ 1 at D = 2 and D = 64)
    for dim in (2, 64):
        big = torch.randn(512, dim, generator=torch.Generator().manual_seed(dim), dtype=torch.float64)
        l2 = normalize_derivative(big, "l2", 0.1)
        assert float(l2.norm(dim=1).max()) < 1.0
        assert float(l2.pow(2).mean().sqrt()) == pytest.approx(1 / math.sqrt(dim), rel=0.1)
        rms_form = normalize_derivative(big, "rms", 0.1)
        assert float(rms_form.pow(2).mean().sqrt()) == pytest.approx(0.9, abs=0.1)
    with pytest.raises(ValueError, match="dvdt_norm"):
        normalize_derivative(d, "max", 0.1)


def test_corr_clip_bounds_the_correction_per_sample_and_keeps_its_direction():
    """``corr_clip ρ``: after the clip ``‖t·N(d)‖ ≤ ρ·‖v_T‖`` for every sample, clipped samples are
    the unclipped correction rescaled (same direction, norm exactly ``ρ·‖v_T‖``), the others are
    bit-identical; off (None) leaves the target as it was. Curved Gaussian teacher, FD, ``none``."""
    teacher = GaussianField(0.3)
    student = Student(teacher.average, 1.3)  # not the exact u: a correction of varying size
    x, t = _points(b=256)
    v = teacher(x, t)
    _, raw = _mdt(student, teacher, dvdt_norm="none").vm_target(x, t, None, v)
    ratio = raw.norm(dim=1) / v.norm(dim=1)
    rho = float(ratio.median())  # half the samples get clipped
    target, corr = _mdt(student, teacher, dvdt_norm="none", corr_clip=rho).vm_target(x, t, None, v)
    torch.testing.assert_close(target, v - corr, rtol=0, atol=0)
    inside = ratio <= rho
    assert 0 < int(inside.sum()) < 256
    assert torch.equal(corr[inside], raw[inside])
    out = ~inside
    torch.testing.assert_close(corr[out].norm(dim=1), rho * v[out].norm(dim=1), rtol=1e-12, atol=0)
    cos = (corr[out] * raw[out]).sum(1) / (corr[out].norm(dim=1) * raw[out].norm(dim=1))
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=1e-12, atol=1e-12)


# -- velocity distillation ---------------------------------------------------------------------
class OneStepParam(torch.nn.Module):
    """``v(x, t)``: a free per-sample tensor ``P`` at ``t = 1`` (the one-step output, with
    gradient) and a fixed field elsewhere, so ``∂L/∂P`` is the gradient at the student's output."""

    def __init__(self, field, p):
        super().__init__()
        self.field = field
        self.p = torch.nn.Parameter(p)

    def forward(self, x, t, cond=None):
        one = (t == 1.0)[:, None]
        return torch.where(one, self.p, self.field(x, t))


def test_vd_gradient_at_the_student_output_is_fake_minus_real():
    """``∂L_VD/∂v_f = 2·(v_fake − v_real)/(B·D)`` with ``v_real`` the VM target at the re-noised
    one-step sample (same ε and t) and ``v_fake`` the student there: a descent step moves
    ``x̂ = ε − v_f`` along ``v_fake − v_real`` (toward the real denoised estimate)."""
    teacher = GaussianField(0.3)
    b, dim = 32, 3
    student = OneStepParam(GaussianField(0.6).average, torch.randn(b, dim, dtype=torch.float64))
    d = _mdt(student, teacher, lambda_vm=0.0, derivative="jvp", dvdt_norm="l2")
    batch = {"x": torch.zeros(b, dim, dtype=torch.float64)}
    out = d.loss(batch, 0, "student", StepRNG(5, 7))
    out["loss"].backward()
    rng = StepRNG(5, 7)  # the same draws as the loss: ε first, then t
    eps = rng.randn(b, dim).double()
    t = rng.times(d.times, b).double()
    with torch.no_grad():
        x_hat = eps - student.p
        x_r = (1 - t)[:, None] * x_hat + t[:, None] * eps
        v_fake = student(x_r, t)
        v_real, _ = d.vm_target(x_r, t, None, teacher(x_r, t))
    assert float((v_fake - v_real).abs().mean()) > 1e-2  # a real gradient, not a vanishing one
    torch.testing.assert_close(student.p.grad, 2 * (v_fake - v_real) / (b * dim), rtol=1e-9, atol=1e-12)
    assert float(out["vd"]) == pytest.approx(float((v_real - v_fake).pow(2).mean()), rel=1e-9)


class CondField(torch.nn.Module):
    """A conditional field ``v(x, t, c) = x + c`` (the null label 3 gives ``x + 3``)."""

    def forward(self, x, t, cond=None):
        return x + cond[:, None].to(x.dtype)


def test_vd_guidance_scale_and_the_papers_guidance_form():
    """``vd_guidance_scale`` guides VD's teacher on its own: as a per-call ``w`` of a guided
    teacher, or through a CFG field built from a bare conditional one. The paper's
    ``(1 + w)·v_c − w·v_u`` is the project's scale ``1 + w``."""
    base = CondField()
    x, t = torch.zeros(4, 2, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    c = torch.tensor([0, 1, 2, 1])
    v_c, v_u = base(x, t, c), base(x, t, torch.full_like(c, 3))
    for teacher in (base, CFGField(base, 2.0, null_label=3)):
        student = Student(lambda a, b: a)
        student.config = type("C", (), {"num_classes": 3, "two_time": False})()
        d = _mdt(student, teacher, vd_guidance_scale=5.0)
        field, w = d._vd_teacher
        got = field(x, t, cond=c) if w is None else field(x, t, cond=c, w=w)
        torch.testing.assert_close(got, (1 + 4.0) * v_c - 4.0 * v_u)  # paper's w = 4
    with pytest.raises(ConfigError, match="vd_guidance_scale"):
        _mdt(Student(lambda a, b: a), base, vd_guidance_scale=5.0)  # unconditional student: no null label


def test_ema_target_moves_after_a_step_and_online_has_no_weights():
    teacher = LinearStraightField(0.4)
    student = Student(teacher.forward, 1.0)
    online = _mdt(student, teacher)
    assert not any(k.startswith("target.") for k in online.trainable_state_dict())
    d = _mdt(student, teacher, target="ema", target_decay=0.5)
    with torch.no_grad():
        student.scale.fill_(2.0)
    d.after_step(0, "student")
    assert float(d.target.ema.scale) == pytest.approx(1.5)


# -- sampling ----------------------------------------------------------------------------------
def test_euler_sampler_is_the_deterministic_renoise_and_renoise_uses_fresh_noise():
    """Two steps: ``x_½ = x_1 − ½·v(x_1, 1)`` equals ``(1 − ½)·x̂0 + ½·ε̂`` with ``ε̂`` the noise implied
    by ``x_1`` and ``x̂0`` (here ``ε̂ = x_1``); ``renoise`` uses seeded fresh noise instead; both
    coincide at one step."""
    teacher = GaussianField(0.3)
    student = Student(teacher.average)
    d = _mdt(student, teacher)
    noise = torch.randn(16, 3, dtype=torch.float64)
    one = torch.ones(16, dtype=torch.float64)
    x0 = noise - student(noise, one)
    half = 0.5 * x0 + 0.5 * noise
    want = half - 0.5 * student(half, 0.5 * one)
    torch.testing.assert_close(d.sample(noise, 2), want)
    torch.testing.assert_close(d.sample(noise, 1, sampler="renoise"), d.sample(noise, 1))
    a, b = d.sample(noise, 2, sampler="renoise", seed=1), d.sample(noise, 2, sampler="renoise", seed=2)
    assert not torch.allclose(a, b) and torch.equal(a, d.sample(noise, 2, sampler="renoise", seed=1))
    with pytest.raises(ConfigError, match="sampler"):
        d.sample(noise, 2, sampler="heun")


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [("derivative", "central"), ("target", "slow"), ("dvdt_norm", "max"),
                                       ("sampler", "ddpm"), ("delta", 0.0), ("delta", 1.0),
                                       ("dvdt_c", -1.0), ("lambda_vm", -1.0), ("uncond_share", 2.0),
                                       ("time_std", 0.0), ("vd_guidance_scale", -1.0), ("corr_clip", 0.0),
                                       ("sample_grid", "nope")])
def test_config_errors_name_their_key(key, value):
    if key == "sample_grid":  # a registry name: the registry's error names the unknown grid
        with pytest.raises(Exception, match="nope"):
            MDTConfig(**{key: value}).validate()
        return
    with pytest.raises(ConfigError, match=f"distiller.{key}"):
        MDTConfig(**{key: value}).validate()


def test_both_weights_zero_is_an_error_and_the_time_range_is_official():
    with pytest.raises(ConfigError, match="lambda_vm and distiller.lambda_vd"):
        MDTConfig(lambda_vm=0.0, lambda_vd=0.0).validate()
    s = MDTConfig().time_sampler()
    t = s(100_000, torch.Generator().manual_seed(0))
    assert float(t.min()) >= 0.01 + 1e-5 and float(t.max()) <= 1.0
    # sigmoid(N(1, 1)) has median sigmoid(1) ≈ 0.731
    assert float(t.median()) == pytest.approx(0.01 + 1e-5 + (1 - 0.01 - 1e-5) * 0.7311, abs=0.01)
    assert DISTILLERS.get("mdt") is MDT


# -- end to end --------------------------------------------------------------------------------
@pytest.mark.skipif(not TEACHER.is_dir(), reason="checkerboard teacher asset not shipped")
def test_cli_trains_and_samples_a_tiny_mdt_run(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = main_in_process(capsys, "distill", str(CONFIG), f"teacher={TEACHER}", f"out_dir={run}",
                                   "train.steps=5", "train.batch_size=64", "train.log_every=1",
                                   "train.ckpt_every=0", "distiller.target=ema", "distiller.derivative=jvp")
    assert code == 0, err
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in log if r.get("loss") is not None]
    assert losses and all("vm" in r and "vd" in r for r in losses)
    png = tmp_path / "s.png"
    code, _, err = main_in_process(capsys, "sample", str(run), "--nfe", "2", "--n", "64", "--out", str(png))
    assert code == 0, err
    assert png.stat().st_size > 0
