"""FreeFlow (data-free flow-map distillation): registration, data-freeness, losses, a real
improvement over the teacher's own 1-step sampler, CLI errors, derivative options, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

import flowdistill.api as api
from flowdistill.api import build_distiller_for, load_run, train
from flowdistill.config import load_config, to_yaml
from flowdistill.core.flowmap import flow_map_jump
from flowdistill.core.rng import StepRNG
from flowdistill.core.sampling import sample_velocity
from flowdistill.distillers import DISTILLERS
from flowdistill.distillers.freeflow import FreeFlow, FreeFlowConfig
from flowdistill.errors import ConfigError
from flowdistill.eval.toy_metrics import sliced_wasserstein2
from flowdistill.runs import prepare_run_dir
from flowdistill.training.checkpoint import latest_checkpoint, load_checkpoint
from flowdistill.training.loop import Trainer
from tests.helpers import TINY_TEACHER, cli, student_weights

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "freeflow_checkerboard.yaml"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A small checkerboard teacher, trained once for this module."""
    out = tmp_path_factory.mktemp("ff") / "teacher"
    cfg = load_config(None, [f"out_dir={out}", *TINY_TEACHER, "model.params.hidden=96", "train.steps=500",
                             "train.ckpt_every=0", "train.lr=3e-3", "train.log_every=100"])
    train(cfg)
    return out


def _ff(tmp_path, teacher_dir, name, *extra):
    over = [f"out_dir={tmp_path / name}", f"teacher={teacher_dir}", "train.batch_size=128",
            "train.log_every=1", "train.ckpt_every=0", "train.warmup_steps=0", *extra]
    return load_config(CONFIG, over, default_distiller="freeflow")


def test_registered_and_declares_contract():
    assert DISTILLERS.get("freeflow") is FreeFlow
    assert FreeFlow.needs_data is False and FreeFlow.needs_teacher is True
    assert FreeFlow.student_two_time is True
    with pytest.raises(ConfigError, match="derivative"):
        FreeFlowConfig(derivative="nope").validate()
    with pytest.raises(ConfigError, match="mode"):
        FreeFlowConfig(mode="nope").validate()


def test_data_free_no_source_no_data_drawn(tmp_path, teacher_dir, monkeypatch):
    """No data source is built and no data point is drawn, yet distillation runs."""

    def no_source(*a, **k):
        raise AssertionError("a data source was built for a data-free distiller")

    def no_data(*a, **k):
        raise AssertionError("toy data was sampled during data-free distillation")

    monkeypatch.setattr(api, "build_source", no_source)
    from flowdistill.data.toy2d import ToyDataset

    monkeypatch.setattr(ToyDataset, "sample", no_data)
    seen: list[Trainer] = []

    class Spy(Trainer):
        def fit(self):
            seen.append(self)
            return super().fit()

    monkeypatch.setattr(api, "Trainer", Spy)
    cfg = _ff(tmp_path, teacher_dir, "df", "train.steps=3", "distiller.correction_warmup=0")
    run = train(cfg)
    assert seen and seen[0].source is None
    assert [g.name for g in seen[0].groups] == ["fake", "student"]
    assert (run / "student" / "config.json").is_file()


@pytest.mark.parametrize("derivative", ["jvp", "fd"])
def test_losses_finite_and_student_starts_as_teacher(tmp_path, teacher_dir, derivative):
    cfg = _ff(tmp_path, teacher_dir, "l", f"distiller.derivative={derivative}",
              "distiller.correction_warmup=0")
    d = build_distiller_for(cfg)
    x, t = torch.randn(64, 2), torch.rand(64)
    with torch.no_grad():  # u(x, t, s) = v_T(x, t) for every s at initialisation
        torch.testing.assert_close(d.student(x, t, t * 0.3), d.teacher(x, t))
    rng = StepRNG(0, 0)
    batch = d.prior_batch(rng, 64, (2,))
    assert set(batch) == {"noise"}
    out = d.loss(batch, 0, "student", rng)
    assert {"loss", "pred", "pred_mse", "corr", "corr_scale"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert all(p.grad is None for p in d.fake.parameters())  # the student step leaves ψ alone
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    fake = d.loss(batch, 0, "fake", StepRNG(0, 0, tag=1))["loss"]
    assert torch.isfinite(fake)


def _map_error(d: FreeFlow, eps: Tensor, ref: Tensor) -> float:
    """``mean ‖X_θ(ε, 1, 0) − ODE_T(ε; 1 → 0)‖²``: how far the one-jump map is from the teacher's."""
    with torch.no_grad():
        ones = torch.ones(eps.shape[0])
        return float((flow_map_jump(d.student, eps, ones, 0 * ones) - ref).pow(2).mean())


def test_prediction_alone_learns_the_teacher_flow_map(tmp_path, teacher_dir):
    """The prediction loss (no correction) pulls the student's jump X(ε, 1, 0) onto the teacher's
    ODE solution: its distance to a 64-step Euler solve drops several-fold in 60 steps."""
    cfg = _ff(tmp_path, teacher_dir, "p", "distiller.mode=prediction", "train.steps=60", "train.lr=1e-3",
              "train.batch_size=256")
    d = build_distiller_for(cfg)
    eps = torch.randn(1000, 2, generator=torch.Generator().manual_seed(7))
    ref = sample_velocity(d.teacher, eps, 64, "euler").x
    before = _map_error(d, eps, ref)
    Path(cfg.out_dir).mkdir(parents=True)
    tr = Trainer(d, cfg.train, cfg.out_dir, sample_shape=(2,))
    assert [g.name for g in tr.groups] == ["student"]  # no fake net without correction
    tr.fit()
    recs = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["pred_mse"]) for r in recs)
    after = _map_error(d, eps, ref)
    assert after < 0.3 * before, (before, after)


def test_distillation_beats_teacher_one_step(tmp_path, teacher_dir):
    cfg = _ff(tmp_path, teacher_dir, "d", "train.steps=150", "train.batch_size=256",
              "distiller.correction_warmup=20", "train.lr=1e-3")
    run = train(cfg)
    student = load_run(run)  # inference-only distiller: no teacher, no fake net
    assert student.distiller.teacher is None and student.distiller.fake is None
    teacher = load_run(teacher_dir)
    from flowdistill.data.toy2d import get_toy

    target, _ = get_toy("checkerboard").sample(3000, torch.Generator().manual_seed(3))
    sw_teacher = sliced_wasserstein2(teacher.sample(3000, 1, seed=1), target)
    sw_student = sliced_wasserstein2(student.sample(3000, 1, seed=1), target)
    assert sw_student < 0.6 * sw_teacher, (sw_student, sw_teacher)
    # NFE = jumps: 2- and 4-step samples are finite and differ from the 1-step ones
    x1, x2 = student.sample(500, 1, seed=2), student.sample(500, 2, seed=2)
    assert torch.isfinite(x2).all() and not torch.allclose(x1, x2)


def test_resume_two_groups_equals_uninterrupted(tmp_path, teacher_dir):
    extra = ["train.steps=8", "train.ckpt_every=4", "distiller.correction_warmup=2",
             "distiller.fake_repeats=2"]
    full = train(_ff(tmp_path, teacher_dir, "full", *extra))
    cfg = _ff(tmp_path, teacher_dir, "part", *extra)
    prepare_run_dir(Path(cfg.out_dir), to_yaml(cfg), resume=False, overwrite=False)
    tr = Trainer(build_distiller_for(cfg), cfg.train, cfg.out_dir, sample_shape=(2,))
    while tr.step < 4:
        tr.train_step()
    tr.save()
    ck = load_checkpoint(latest_checkpoint(Path(cfg.out_dir) / "checkpoints"))
    assert any(k.startswith("fake.") for k in ck["model"]) and set(ck["optim"]) == {"fake", "student"}
    assert not any(k.startswith("teacher.") for k in ck["model"])
    del tr
    train(cfg, resume=True)
    a, b = student_weights(full), student_weights(tmp_path / "part")
    assert a.keys() == b.keys() and not any(k.startswith("fake") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    fa = load_checkpoint(latest_checkpoint(full / "checkpoints"))["model"]
    fb = load_checkpoint(latest_checkpoint(tmp_path / "part" / "checkpoints"))["model"]
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=0, atol=1e-6)


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_distill_and_mismatch_errors(tmp_path, teacher_dir):
    base = [str(CONFIG), f"teacher={teacher_dir}", "train.steps=2", "train.batch_size=64",
            "train.ckpt_every=0", "train.log_every=1"]
    r = cli("distill", *base, f"out_dir={tmp_path / 'ok'}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ok" / "student" / "config.json").is_file()
    _one_line_error(cli("distill", *base, f"out_dir={tmp_path / 'a'}", "model.params.data_dim=3"),
                    "student", "shape")
    _one_line_error(cli("distill", *base, f"out_dir={tmp_path / 'b'}", "model.params.num_classes=8"),
                    "conditioning mismatch", "num_classes")
    _one_line_error(cli("distill", *base, f"out_dir={tmp_path / 'c'}", "distiller.name=nope"),
                    "nope", "freeflow", "flow_matching")


def test_correction_only_with_warmup_and_multi_nfe_correction(tmp_path, teacher_dir):
    """mode=correction before its warm-up has nothing to train: those steps leave the student as it
    is (no crash), later ones move it; correction_nfe=[1, 2] corrects 2-jump samples through both
    jumps."""
    cfg = _ff(tmp_path, teacher_dir, "co", "train.steps=4", "distiller.mode=correction",
              "distiller.correction_warmup=2", "train.ema_decay=0")
    run = train(cfg)
    log = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["student/corr"] is not None] == [3, 4]  # steps 2, 3 (logged after)
    assert student_weights(run).keys()
    d = build_distiller_for(_ff(tmp_path, teacher_dir, "mn", "distiller.correction_nfe=[1,2]"))
    eps = torch.randn(6, 2)
    x = d._student_samples(eps, None)
    torch.testing.assert_close(x[0::2], d.sample(eps[0::2], 1))
    torch.testing.assert_close(x[1::2], d.sample(eps[1::2], 2))
    with pytest.raises(ConfigError, match="correction_nfe"):
        FreeFlowConfig(correction_nfe=[0]).validate()


DIGITS_TEACHER = Path(__file__).resolve().parents[1] / "assets" / "digits_teacher"


@pytest.mark.skipif(not (DIGITS_TEACHER / "config.json").is_file(), reason="digits teacher asset not shipped")
def test_digits_config_distils_the_shipped_unet_teacher_at_tiny_settings(tmp_path):
    """The packaged digits config (UNet student from the shipped class-conditional teacher, exact
    JVP, correction, shortcut) runs for a few steps and its student samples images at 1 and 2 jumps;
    the full setting is measured by scripts/bench_quality.py --digits."""
    cfg = load_config(CONFIG.parent / "freeflow_digits.yaml",
                      [f"out_dir={tmp_path / 'ffd'}", f"teacher={DIGITS_TEACHER}", "train.steps=3",
                       "train.batch_size=8", "train.ckpt_every=0", "train.log_every=1",
                       "train.warmup_steps=0", "distiller.correction_warmup=1"], default_distiller="freeflow")
    run = load_run(train(cfg))
    log = [json.loads(ln) for ln in (tmp_path / "ffd" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["student/corr"] is not None for r in log)  # null before the correction is on
    assert all(math.isfinite(r["student/loss"]) for r in log)
    for nfe in (1, 2):
        x = run.sample(4, nfe, seed=0)
        assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
