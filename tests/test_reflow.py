"""Reflow and InstaFlow: samplers, losses, the teacher check, and the whole chain on a tiny teacher
(straighter paths, better few-step samples, a working one-step student)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flowdistill.api import couple_teacher, train
from flowdistill.config import load_config
from flowdistill.core.losses import premetric, pseudo_huber
from flowdistill.core.registry import UnknownNameError
from flowdistill.core.rng import StepRNG
from flowdistill.core.sampling import sample_velocity
from flowdistill.data.coupling_generation import CoupleSpec
from flowdistill.data.couplings import CouplingError
from flowdistill.data.loader import batch_for
from flowdistill.distillers.reflow import InstaFlow, InstaFlowConfig, Reflow, ReflowConfig, sample_noise_reuse
from flowdistill.errors import ConfigError
from flowdistill.eval.straightness import trajectory_straightness
from flowdistill.models.mlp import MLPFlowNet
from flowdistill.models.perceptual import PERCEPTUAL_NETS, build_perceptual
from tests.helpers import TINY_TEACHER


class LinearStraightField(torch.nn.Module):
    """The exact velocity of the straight coupling ``x0 = a·ε``: ``x_t = ((1−t)a + t)·ε`` and
    ``v = (1 − a)·ε = (1 − a)·x_t / ((1 − t)a + t)``."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, x, t, cond=None):
        return (1 - self.a) * x / ((1 - t) * self.a + t)[:, None]


class CurvedField(torch.nn.Module):
    """A rotating field: trajectories are arcs, not lines."""

    def forward(self, x, t, cond=None):
        return torch.stack([-x[:, 1], x[:, 0]], dim=1) + 0.3 * x


def test_noise_reuse_sampler_and_straightness_on_known_fields():
    eps = torch.randn(64, 2, dtype=torch.float64)
    straight = LinearStraightField(0.3)
    for nfe in (1, 2, 5):  # exact for a straight flow, with either update
        torch.testing.assert_close(sample_noise_reuse(straight, eps, nfe), 0.3 * eps)
        torch.testing.assert_close(sample_velocity(straight, eps, nfe, "euler").x, 0.3 * eps)
    assert trajectory_straightness(straight, eps, nfe=64) < 1e-20
    curved = CurvedField()
    e1 = sample_velocity(curved, eps, 1, "euler").x
    torch.testing.assert_close(sample_noise_reuse(curved, eps, 1), e1)  # first step = Euler's
    # three steps by hand on the grid 1, ⅔, ⅓, 0: x̂ = x_t − t·v(x_t, t), x_{t'} = (1 − t')·x̂ + t'·ε
    ones = torch.ones(64, dtype=torch.float64)
    x = eps
    for t, s in ((1.0, 2 / 3), (2 / 3, 1 / 3), (1 / 3, 0.0)):
        xh = x - t * curved(x, t * ones)
        x = (1 - s) * xh + s * eps
    torch.testing.assert_close(sample_noise_reuse(curved, eps, 3), x)
    # with 2 steps it coincides with Euler (both steps start on the line); from 3 steps on it does not
    torch.testing.assert_close(sample_noise_reuse(curved, eps, 2), sample_velocity(curved, eps, 2, "euler").x)
    assert (x - sample_velocity(curved, eps, 3, "euler").x).abs().max() > 1e-2
    # the straightness integral of a half-circle-like path is clearly positive
    assert trajectory_straightness(curved, eps, nfe=64) > 0.01


def test_lpips_huber_and_perceptual_nets():
    torch.manual_seed(0)
    net = build_perceptual("random_conv")
    for shape in ((6, 1, 8, 8), (6, 2)):
        x, eps = torch.randn(*shape), torch.randn(*shape)
        t = torch.rand(6)
        tc = t.reshape(-1, *([1] * (len(shape) - 1)))
        x_t, target = (1 - tc) * x + tc * eps, eps - x
        v = (target + 0.1 * torch.randn(*shape)).requires_grad_(True)
        got = premetric("lpips_huber")(v, target, x_t=x_t, t=t, net=net)
        want = (1 - t) * pseudo_huber(v, target) + net(x_t - tc * v, x)
        torch.testing.assert_close(got, want)
        assert got.shape == (6,) and (got > 0).all()
        got.sum().backward()
        assert v.grad.abs().sum() > 0
        # the perceptual part vanishes when x̂ = x (v = target), leaving only the Huber term (0 too)
        assert premetric("lpips_huber")(target, target, x_t=x_t, t=t, net=net).abs().max() < 1e-5
    with pytest.raises(ValueError, match="needs x_t, t and a perceptual net"):
        premetric("lpips_huber")(v, target)
    with pytest.raises(UnknownNameError, match="unknown perceptual net 'nope'"):
        build_perceptual("nope")
    with pytest.raises((ValueError, ImportError), match="lpips"):
        build_perceptual("lpips")  # no weights (and no package) offline: a clear message
    assert {"digits", "lpips", "random_conv"} <= set(PERCEPTUAL_NETS.names())


def test_reflow_config_errors_name_the_key(tmp_path):
    base = ["distiller.name=reflow", f"out_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="distiller.loss must be one of"):
        load_config(None, [*base, "distiller.loss=perceptual"])
    with pytest.raises(UnknownNameError, match="unknown solver 'rk9'"):
        load_config(None, [*base, "distiller.sample_solver=rk9"])
    with pytest.raises(ConfigError, match="couple.solver"):
        load_config(None, [*base, "distiller.couple.solver=rk9"])
    with pytest.raises(UnknownNameError, match="perceptual net"):
        load_config(None, [*base, "distiller.loss=lpips_huber", "distiller.perceptual=vgg99"])
    cfg = load_config(None, [*base, "distiller.sample_solver=noise_reuse"])
    assert cfg.distiller.couplings == f"{tmp_path}/couplings"  # follows out_dir
    with pytest.raises(ConfigError, match="distiller.steps"):
        load_config(None, ["distiller.name=instaflow", f"out_dir={tmp_path}", "distiller.steps=0"])


def _net(seed: int) -> MLPFlowNet:
    torch.manual_seed(seed)
    return MLPFlowNet(data_dim=2, hidden=32, depth=2)


def test_distillers_train_on_their_teachers_couplings_only(tmp_path):
    spec = CoupleSpec(n_pairs=200, shard_size=100, chunk_size=100, solver="euler", nfe=4)
    teacher, other = _net(0), _net(1)
    teacher.save_pretrained(str(tmp_path / "t"))
    other.save_pretrained(str(tmp_path / "o"))
    couple_teacher(tmp_path / "t", tmp_path / "ct", spec, (2,), progress=False)
    couple_teacher(tmp_path / "o", tmp_path / "co", spec, (2,), progress=False)
    ok = Reflow(ReflowConfig(couplings=str(tmp_path / "ct")), _net(0),
                MLPFlowNet.from_pretrained(str(tmp_path / "t")))
    batch = batch_for(ok.batch_source(), 0, 0, local_batch=32)
    assert set(batch) == {"x", "noise"}
    out = ok.loss(batch, 0, "student", StepRNG(0, 0))
    assert out["loss"].requires_grad and math.isfinite(out["loss"].item())
    bad = Reflow(ReflowConfig(couplings=str(tmp_path / "co")), _net(0),
                 MLPFlowNet.from_pretrained(str(tmp_path / "t")))
    with pytest.raises(CouplingError, match="generated by another teacher"):
        batch_for(bad.batch_source(), 0, 0, local_batch=32)
    # InstaFlow with k steps trains exactly at the grid times 1/k … 1
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.config = net.config

        def forward(self, x, t, s=None, cond=None):
            seen.append(t.detach().clone())
            return self.net(x, t, cond=cond)

    k = 4
    st = InstaFlow(InstaFlowConfig(couplings=str(tmp_path / "ct"), steps=k), Spy(_net(0)),
                   MLPFlowNet.from_pretrained(str(tmp_path / "t")))
    st.loss(batch_for(st.batch_source(), 0, 1, local_batch=256), 0, "student", StepRNG(0, 1))
    assert set(torch.cat(seen).tolist()) == {0.25, 0.5, 0.75, 1.0}
    # InstaFlow's schedule: L2 on x̂ = ε − v(ε, 1) first, the perceptual loss from finetune_after on
    one = InstaFlow(InstaFlowConfig(couplings=str(tmp_path / "ct"), finetune_after=5), _net(0),
                    MLPFlowNet.from_pretrained(str(tmp_path / "t")))
    b = batch_for(one.batch_source(), 0, 2, local_batch=64)
    with torch.no_grad():
        x_hat = b["noise"] - one.student(b["noise"], torch.ones(64))
        l2 = (x_hat - b["x"]).pow(2).mean()
        perc = build_perceptual("random_conv")(x_hat, b["x"]).mean()
        torch.testing.assert_close(one.loss(b, 4, "student", StepRNG(0, 2))["loss"], l2)
        torch.testing.assert_close(one.loss(b, 5, "student", StepRNG(0, 2))["loss"], perc)


RECIPE = """
out_dir: {out}
vars: {{teacher: {teacher}}}
common:
  model: {{name: mlp}}
  data: {{name: checkerboard}}
  eval: {{n_samples: 2000, seed: 7}}
stages:
  - name: 2rf
    kind: distill
    job:
      teacher: ${{recipe:teacher}}
      train: {{steps: 400, batch_size: 512, lr: 2.0e-3, lr_schedule: cosine, ema_decay: 0.9, log_every: 100,
               ckpt_every: 200}}
      distiller:
        name: reflow
        couple: {{n_pairs: 6000, shard_size: 3000, chunk_size: 3000, solver: rk4, nfe: 48}}
        time_sampler: {{name: u_shaped}}
        loss: pseudo_huber
  - name: instaflow
    kind: distill
    job:
      teacher: ${{stage:2rf}}
      train: {{steps: 300, batch_size: 512, lr: 2.0e-3, lr_schedule: cosine, ema_decay: 0.9, log_every: 100,
               ckpt_every: 0}}
      distiller:
        name: instaflow
        couple: {{n_pairs: 6000, shard_size: 3000, chunk_size: 3000, solver: rk4, nfe: 16}}
        steps: 1
        loss: l2
  - name: report
    kind: report
    runs: {{teacher: "${{recipe:teacher}}", 2-RF: "${{stage:2rf}}",
           "student (1-step)": "${{stage:instaflow}}"}}
    nfe: {{teacher: [1, 2, 128], 2-RF: [2, 128], "student (1-step)": [1]}}
"""


@pytest.mark.slow  # convergence check (~30-45 s on 2 cores); run with -m slow
def test_chain_straightens_the_teacher_and_distils_one_step(tmp_path):
    from flowdistill.recipes import load_recipe, run_recipe
    from flowdistill.recipes.report import report_rows

    teacher = train(load_config(None, [f"out_dir={tmp_path / 'teacher'}", *TINY_TEACHER, "train.steps=400",
                                       "train.ckpt_every=0", "train.lr=3e-3"]))
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(RECIPE.format(out=tmp_path / "chain", teacher=teacher))
    runs = run_recipe(cfg, report=False)
    for stage, name in (("2rf", "reflow"), ("instaflow", "instaflow")):  # plain job configs, rerunnable
        assert load_config(tmp_path / "chain" / f"{stage}.yaml").distiller.name == name
    rows = report_rows(load_recipe(cfg).stage("report"))
    r = {(row["model"], row["nfe"]): row for row in rows}
    s_teacher, s_rf = r[("teacher", 128)]["straightness"], r[("2-RF", 128)]["straightness"]
    assert s_rf <= 0.5 * s_teacher, (s_rf, s_teacher)
    assert r[("2-RF", 2)]["sw2"] < r[("teacher", 2)]["sw2"]
    assert r[("student (1-step)", 1)]["sw2"] < 0.5 * r[("teacher", 1)]["sw2"]
    assert r[("student (1-step)", 1)]["sw2"] <= 1.5 * r[("teacher", 128)]["sw2"], rows
    # rerunning the recipe resumes: stores re-verified and kept, finished runs skipped
    w = Path(runs["instaflow"]) / "student" / "diffusion_pytorch_model.safetensors"
    stamp = w.stat().st_mtime_ns
    run_recipe(cfg, report=False)
    assert w.stat().st_mtime_ns == stamp
