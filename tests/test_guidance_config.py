"""The ``guidance:`` section of a job config, applied once where the teacher is built.

By value on tiny conditional MLPs: the guidance interval, autoguidance with a weaker model named
in the config, per-sample scales, the teacher a distillation job hands its distiller, a
flow-matching run sampled with its guidance, one-line errors naming the key, and checkpoints that
still leave the (wrapped) teacher out.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowdistill.api import build_distiller_for, load_run
from flowdistill.config import load_config, to_yaml
from flowdistill.core.guidance import (
    AutoGuidedField,
    CFGField,
    GuidanceSpec,
    sample_guidance_scale,
    unguided,
)
from flowdistill.core.sampling import sample_velocity
from flowdistill.errors import ConfigError
from flowdistill.kernels import euler_step
from flowdistill.models.mlp import MLPFlowNet
from flowdistill.models.teachers import guide
from flowdistill.runs import export_student

NULL = 4  # the null label of a 4-class net


def _net(seed: int, num_classes: int = NULL, hidden: int = 32) -> MLPFlowNet:
    torch.manual_seed(seed)
    net = MLPFlowNet(data_dim=2, hidden=hidden, depth=2, num_classes=num_classes).eval()
    with torch.no_grad():  # the zero-initialised output layer would make every velocity 0
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def _inputs(b: int = 6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 2, generator=g)
    t = torch.linspace(0.05, 0.95, b)
    cond = torch.tensor([0, 1, 2, 3, 0, 1][:b])
    return x, t, cond


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cond_teacher")
    _net(0).save_pretrained(str(d))
    return d


def _distill(tmp_path, teacher, *over):
    return load_config(None, [f"out_dir={tmp_path / 'run'}", f"teacher={teacher}", "model.name=mlp",
                              "data.name=checkerboard", "train.steps=2", *over], default_distiller="freeflow")


def test_interval_guides_inside_and_is_conditional_outside():
    net = _net(0)
    spec = load_config(None, ["out_dir=x", "guidance.scale=3", "guidance.interval=[0.3,0.7]"]).guidance
    field = guide(spec, net)
    assert isinstance(field, CFGField) and unguided(field) is net and field.interval == (0.3, 0.7)
    x, t, cond = _inputs()
    with torch.no_grad():
        got = field(x, t, cond)
        v_u, v_c = net(x, t, cond=torch.full_like(cond, NULL)), net(x, t, cond=cond)
    inside = (t >= 0.3) & (t <= 0.7)
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(got[inside], (v_u + 3 * (v_c - v_u))[inside], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[~inside], v_c[~inside], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(v_u, v_c, atol=1e-3)  # the check has teeth


@pytest.mark.parametrize("as_run", [False, True])
def test_autoguidance_with_a_weaker_model_named_in_the_config(tmp_path, as_run):
    good, bad = _net(0), _net(7, hidden=16)
    weak = tmp_path / "weak"
    bad.save_pretrained(str(weak / "student" if as_run else weak))
    spec = load_config(None, ["out_dir=x", "guidance.scale=2.5", f"guidance.autoguidance={weak}"]).guidance
    field = guide(spec, good, sample_shape=(2,))
    assert isinstance(field, AutoGuidedField) and unguided(field) is good
    assert not any(p.requires_grad for p in field.bad.parameters())
    x, t, cond = _inputs()
    with torch.no_grad():
        got = field(x, t, cond)
        v_bad, v_good = bad(x, t, cond=cond), good(x, t, cond=cond)
    torch.testing.assert_close(got, v_bad + 2.5 * (v_good - v_bad), rtol=1e-5, atol=1e-6)


def test_per_sample_scale_range_is_stored_and_w_combines_per_sample():
    net = _net(0)
    spec = GuidanceSpec(scale=4.0, scale_range=[2.0, 6.0])
    field = guide(spec, net)
    assert field.scale_range == (2.0, 6.0) and field.scale == 4.0
    x, t, cond = _inputs()
    w = sample_guidance_scale(torch.Generator().manual_seed(0), x.shape[0], *field.scale_range)
    assert len(set(w.tolist())) == x.shape[0]
    with torch.no_grad():
        got = field(x, t, cond, w=w)
        v_u, v_c = net(x, t, cond=torch.full_like(cond, NULL)), net(x, t, cond=cond)
        for i in range(x.shape[0]):  # sample i is the combination at its own scale
            torch.testing.assert_close(got[i], v_u[i] + w[i] * (v_c[i] - v_u[i]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(field(x, t, cond), v_u + 4.0 * (v_c - v_u), rtol=1e-5, atol=1e-6)


def test_distillation_job_hands_the_distiller_a_guided_teacher(tmp_path, teacher_dir):
    d = build_distiller_for(_distill(tmp_path, teacher_dir, "guidance.scale=3"))
    bare = _net(0)  # the saved teacher's weights
    assert isinstance(d.teacher, CFGField) and d.teacher.scale == 3.0
    assert not d.teacher.training and not any(p.requires_grad for p in d.teacher.parameters())
    x, t, cond = _inputs()
    with torch.no_grad():
        v_u = bare(x, t, cond=torch.full_like(cond, NULL))
        want = v_u + 3 * (bare(x, t, cond=cond) - v_u)
        torch.testing.assert_close(d.teacher(x, t, cond), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d._v_real(x, t, cond), want, rtol=1e-5, atol=1e-6)
    # the fake-velocity net is a trainable copy of the bare teacher, not of its guidance wrapper
    assert isinstance(d.fake, MLPFlowNet) and all(p.requires_grad for p in d.fake.parameters())
    # checkpoints still leave the teacher out (its keys are now teacher.field.*), and load back
    sd = d.trainable_state_dict()
    assert any(k.startswith("teacher.field.") for k in d.state_dict())
    assert not any(k.startswith("teacher.") for k in sd)
    assert any(k.startswith("student.") for k in sd) and any(k.startswith("fake.") for k in sd)
    d.load_trainable_state_dict(sd)
    # no guidance: the bare teacher, unwrapped
    plain = build_distiller_for(_distill(tmp_path, teacher_dir))
    assert isinstance(plain.teacher, MLPFlowNet)


def test_autoguided_teacher_is_left_out_of_checkpoints(tmp_path, teacher_dir):
    weak = tmp_path / "weak"
    _net(5, hidden=16).save_pretrained(str(weak))
    d = build_distiller_for(_distill(tmp_path, teacher_dir, "guidance.scale=2",
                                     f"guidance.autoguidance={weak}"))
    assert isinstance(d.teacher, AutoGuidedField)
    keys = set(d.state_dict())
    assert any(k.startswith("teacher.bad.") for k in keys)
    assert any(k.startswith("teacher.good.") for k in keys)
    assert not any(k.startswith("teacher.") for k in d.trainable_state_dict())


def test_flow_matching_run_is_sampled_with_its_guidance(tmp_path):
    net = _net(3, num_classes=10)
    run = tmp_path / "teacher_run"
    cfg = load_config(None, [f"out_dir={run}", "model.name=mlp", "data.name=checkerboard", "guidance.scale=2",
                             "guidance.interval=[0.0,0.6]"])
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))
    export_student(net, run, {"distiller": "flow_matching", "data": "checkerboard", "steps": 1})
    loaded = load_run(run)
    cond = torch.arange(8) % 10
    got = loaded.sample(8, 4, seed=0, cond=cond)
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    want = sample_velocity(CFGField(net, 2.0, 10, (0.0, 0.6)), noise, 4, "euler", cond=cond).x
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the same by hand: Euler steps of v_u + w(t)·(v_c − v_u), w = 2 for t <= 0.6 and 1 above
    x = noise.clone()
    with torch.no_grad():
        for t0, t1 in ((1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)):
            t = torch.full((8,), t0)
            v_u, v_c = net(x, t, cond=torch.full_like(cond, 10)), net(x, t, cond=cond)
            w = 2.0 if t0 <= 0.6 else 1.0
            x = euler_step(x, v_u + w * (v_c - v_u), t1 - t0)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    unguided_run = load_run(run).distiller
    unguided_run.sample_guidance = None
    assert not torch.allclose(unguided_run.sample(noise, 4, cond=cond, model=net), got, atol=1e-4)


def _one_line(e: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


@pytest.mark.parametrize("over, needles", [
    ("guidance.interval=[0.8,0.2]", ("guidance.interval", "t_lo <= t_hi")),
    ("guidance.interval=[0.1,1.5]", ("guidance.interval",)),
    ("guidance.scale_range=[6,4]", ("guidance.scale_range", "w_min <= w_max")),
    ("guidance.scale=-1", ("guidance.scale", ">= 0")),
    ("distiller.guidance_scale=2", ("distiller.guidance_scale", "guidance.scale=2")),
])
def test_bad_values_are_one_line_errors_naming_the_key(over, needles):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["out_dir=x", over])
    _one_line(e, *needles)


def test_saved_configs_with_the_old_default_key_still_load():
    cfg = load_config(None, ["out_dir=x", "distiller.guidance_scale=1.0"])
    assert cfg.guidance == GuidanceSpec()


def test_build_time_errors_name_the_key(tmp_path, teacher_dir):
    with pytest.raises(ConfigError) as e:
        build_distiller_for(_distill(tmp_path, teacher_dir, f"guidance.autoguidance={tmp_path / 'nope'}"))
    _one_line(e, "guidance.autoguidance", "does not exist")
    uncond = tmp_path / "uncond"
    _net(0, num_classes=0).save_pretrained(str(uncond))
    with pytest.raises(ConfigError) as e:
        build_distiller_for(_distill(tmp_path, uncond, "guidance.scale=3"))
    _one_line(e, "guidance.scale=3.0", "class-conditional teacher", "unconditional")
    with pytest.raises(ConfigError) as e:  # autoguidance with a weaker model of other conditioning
        build_distiller_for(_distill(tmp_path, teacher_dir, f"guidance.autoguidance={uncond}"))
    _one_line(e, "guidance.autoguidance", "num_classes")
    with pytest.raises(ConfigError) as e:  # freeflow draws no per-sample scales
        build_distiller_for(_distill(tmp_path, teacher_dir, "guidance.scale_range=[2,4]"))
    _one_line(e, "guidance.scale_range", "freeflow")
    with pytest.raises(ConfigError) as e:  # a flow-matching model on unconditional data
        build_distiller_for(load_config(None, [f"out_dir={tmp_path / 'fm'}", "data.name=checkerboard",
                                               "guidance.scale=2"]))
    _one_line(e, "guidance.scale=2.0", "class-conditional model")
