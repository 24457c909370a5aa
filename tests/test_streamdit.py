"""StreamDiT (buffered flow matching) and its distillation: configs and their level patterns, the
teacher loss falls on a fixed batch, the distilled student's one call approaches the teacher's s
micro-steps, resume equals an uninterrupted run, config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowdistill.api import build_distiller_for, train
from flowdistill.config import load_config, to_yaml
from flowdistill.core.rng import StepRNG
from flowdistill.data.bouncing_digits import generate_clips
from flowdistill.distillers import DISTILLERS
from flowdistill.distillers.streamdit import StreamDiT, StreamDiTConfig
from flowdistill.distillers.streamdit_distill import StreamDiTDistill, StreamDiTDistillConfig
from flowdistill.errors import ConfigError
from flowdistill.models.video_dit import VideoDiTFlowNet
from flowdistill.runs import prepare_run_dir
from flowdistill.training.loop import Trainer
from tests.helpers import student_weights

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: A tiny job: 16×16 frames, a 6-frame buffer (2 reference + 4), one-block VideoDiT.
TINY = ["model.name=video_dit", "model.params.in_channels=1", "model.params.sample_size=16",
        "model.params.patch_size=4", "model.params.hidden=32", "model.params.depth=1",
        "model.params.heads=2", "model.params.max_frames=8", "data.name=bouncing_digits",
        "data.params.frames=6", "data.params.size=16", "data.params.digit_size=6",
        "distiller.name=streamdit", "distiller.buffer_frames=6", "distiller.ref_frames=2",
        "distiller.partitions=[[2,2],[1,1]]", "train.batch_size=4", "train.log_every=1000",
        "train.ckpt_every=0", "train.lr=1e-3"]


def _tiny_net(two_time: bool = False) -> VideoDiTFlowNet:
    return VideoDiTFlowNet(sample_size=16, patch_size=4, hidden=32, depth=1, heads=2, max_frames=8,
                           two_time=two_time)


def _clips(n: int, seed: int = 0) -> torch.Tensor:
    return generate_clips(n, 6, size=16, digit_size=6, generator=torch.Generator().manual_seed(seed)).frames


class Spy(torch.nn.Module):
    """Wraps a net; keeps its last output (with its gradient retained) and time input in ``seen``."""

    def __init__(self, net, seen: dict):
        super().__init__()
        self.net, self.seen = net, seen

    def forward(self, x, t, s=None, cond=None):
        v = self.net(x, t, s, cond=cond)
        if v.requires_grad:
            v.retain_grad()
        self.seen["v"], self.seen["t"] = v, t
        return v


def test_registered_and_configs_load():
    assert DISTILLERS.get("streamdit") is StreamDiT
    assert DISTILLERS.get("streamdit_distill") is StreamDiTDistill
    for name in ("mixed", "single", "diagonal", "full_sequence", "distill", "refnoise", "distill_refnoise",
                 "recycle", "k4", "k2_more"):
        cfg = load_config(CONFIGS / f"streamdit_{name}.yaml")
        assert cfg.data.name == "bouncing_digits" and cfg.data.params["frames"] == cfg.distiller.buffer_frames


@pytest.mark.parametrize("name, pattern", [("full_sequence", "one_level"), ("diagonal", "diagonal"),
                                           ("single", "staircase"), ("mixed", "mixed")])
def test_limiting_case_configs_give_their_level_patterns(name, pattern):
    """References at 0; full sequence: every other frame at one level; diagonal: one grid step per
    frame, increasing; [2, 4]: pairs of frames, chunk j inside (g[4j], g[4j + 4]]; mixed: all kinds."""
    cfg = load_config(CONFIGS / f"streamdit_{name}.yaml").distiller
    cfg.warmup_share = 0.0  # the staircase alone (warm-up levels: the next test)
    net = VideoDiTFlowNet(sample_size=32, patch_size=8, hidden=32, depth=1, heads=2, max_frames=16)
    d = StreamDiT(cfg, net)
    levels, pid = d.training_levels(256, StepRNG(0, 0))
    k = cfg.ref_frames
    assert levels.shape == (256, cfg.buffer_frames)
    assert torch.all(levels[:, :k] == 0) and torch.all(levels[:, k:] > 0) and torch.all(levels <= 1)
    free = levels[:, k:]
    if pattern == "one_level":
        assert torch.all(free == free[:, :1])  # ordinary full-sequence flow matching
        assert free[:, 0].min() < 0.1 and free[:, 0].max() > 0.9  # jitter covers (0, 1]
    elif pattern == "diagonal":
        steps = torch.diff(free, dim=1)
        assert torch.all(steps > 0)  # oldest (least noisy) first
        lo = torch.arange(8) / 8  # frame j in (j/8, (j+1)/8]
        assert torch.all(free > lo) and torch.all(free <= lo + 1 / 8 + 1e-6)
    elif pattern == "staircase":
        chunk = torch.arange(8) // 2
        assert torch.all(free > chunk / 4 - 1e-6) and torch.all(free <= (chunk + 1) / 4 + 1e-6)
    else:
        assert set(pid.tolist()) == set(range(len(cfg.partitions)))
        for i, (c, s) in enumerate(cfg.partitions):
            sel = free[pid == i]
            n = 8 // c
            j = torch.arange(8) // c
            # chunk j's level lies in its s micro-steps' range (g[j·s], g[(j+1)·s]] of the N·s grid
            assert torch.all(sel > j * s / (n * s) - 1e-6) and torch.all(sel <= (j + 1) * s / (n * s) + 1e-6)


def test_warmup_share_draws_the_samplers_cold_start_levels():
    """With warmup_share 1 every buffer is at a warm-up step of the sampler without context: the
    references are being generated (above 0 early on) and carry loss, and levels never decrease
    from the oldest frame to the newest (clamped staircase)."""
    cfg = StreamDiTConfig(buffer_frames=6, ref_frames=2, partitions=[[2, 2]], warmup_share=1.0)
    d = StreamDiT(cfg, _tiny_net())
    levels, _ = d.training_levels(64, StepRNG(0, 0))
    assert torch.all(torch.diff(levels, dim=1) >= -1e-6) and torch.all((levels >= 0) & (levels <= 1))
    assert bool((levels[:, 0] > 0).any())
    w = d.frame_weights(levels)
    assert torch.all(w[levels[:, 0] > 0, 0] == 1) and torch.all(w[:, 2:] == 1)
    torch.testing.assert_close(d.warmup_levels(d.parts[0], 0.0), torch.ones(6))  # all noise at first


def test_teacher_loss_falls_on_a_fixed_batch():
    """60 Adam steps on one batch (same clips, noise and levels) more than halve the loss."""
    torch.manual_seed(0)
    cfg = StreamDiTConfig(buffer_frames=6, ref_frames=2, partitions=[[2, 2], [1, 1]], warmup_share=0.0)
    cfg.validate()
    d = StreamDiT(cfg, _tiny_net())
    batch = {"x": _clips(8)}
    opt = torch.optim.Adam(d.student.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        out = d.loss(batch, 0, "student", StepRNG(0, 0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_reference_frames_carry_no_loss():
    """With ref_loss_weight 0 the reference frames' output has zero gradient."""
    cfg = StreamDiTConfig(buffer_frames=6, ref_frames=2, partitions=[[2, 2]], warmup_share=0.0)
    d = StreamDiT(cfg, _tiny_net())
    seen = {}


    d.attach_engine({"student": Spy(d.student, seen)})
    d.loss({"x": _clips(4)}, 0, "student", StepRNG(0, 0))["loss"].backward()
    g = seen["v"].grad
    assert torch.all(g[:, :2] == 0) and g[:, 2:].abs().sum() > 0


def _distiller_pair(seed: int = 0, **cfg_kw) -> StreamDiTDistill:
    """A fixed random teacher (weights drawn large enough that its field is curved) and the
    two-time student started from it (``cfg_kw``: further distiller options)."""
    torch.manual_seed(seed)
    teacher = _tiny_net()
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0, 0.15) if p.ndim > 1 else p.normal_(0, 0.05)
    student = _tiny_net(two_time=True)
    from flowdistill.models import init_from

    init_from(student, teacher)
    cfg = StreamDiTDistillConfig(buffer_frames=6, ref_frames=2, partitions=[[2, 4]], warmup_share=0.0,
                                 **cfg_kw)
    cfg.validate()
    return StreamDiTDistill(cfg, student, teacher)


def test_student_starts_as_the_teacher_and_its_target_is_s_teacher_steps():
    d = _distiller_pair()
    x = _clips(2)
    lv = d.micro_levels()
    x_t = d.start_states(x, lv[0].expand(2, -1), StepRNG(0, 0))
    assert lv.shape == (5, 6) and torch.all(lv[-1][:2] == 0) and lv[-1][2] == 0  # chunk 0 ends at t = 0
    assert torch.all(lv[0][2:] > lv[-1][2:])  # every chunk moves down
    # one student call at init = one teacher Euler step over the whole interval
    t, s = lv[0].expand(2, -1), lv[-1].expand(2, -1)
    with torch.no_grad():
        u = d.student(x_t, t, s)
        v = d.teacher(x_t, t)
    torch.testing.assert_close(u, v, rtol=0, atol=1e-5)
    # the target: 4 Euler micro-steps; reference frames untouched
    target = d.teacher_target(x_t, lv, None)
    torch.testing.assert_close(target[:, :2], x_t[:, :2], rtol=0, atol=0)
    x = x_t.clone()
    for m in range(4):
        dt = (lv[m + 1] - lv[m])[None, :, None, None, None]
        x = x + dt * d.teacher(x, lv[m].expand(2, -1))
    torch.testing.assert_close(target, x, rtol=0, atol=1e-6)


def test_student_one_call_approaches_the_teachers_micro_steps():
    """On a fixed buffer state, 60 Adam steps cut the student's one-call state error against the
    teacher's 4 micro-steps at least 20x (at init it is the teacher's 1-step vs 4-step gap; seen:
    about 100x at 60 steps, 500x at 150)."""
    d = _distiller_pair()
    batch = {"x": _clips(8, seed=1)}
    opt = torch.optim.Adam(d.student.parameters(), lr=2e-3)
    errs = []
    for _ in range(60):
        out = d.loss(batch, 0, "student", StepRNG(0, 0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        errs.append(float(out["x_err"]))
    assert errs[0] > 1e-4  # the teacher is curved: there is a gap to close
    assert errs[-1] < errs[0] / 20, (errs[0], errs[-1])


def test_config_errors_name_their_key():
    with pytest.raises(ConfigError, match="distiller.partitions"):
        StreamDiTConfig(buffer_frames=10, ref_frames=2, partitions=[[3, 2]]).validate()
    with pytest.raises(ConfigError, match="distiller.partition_weights"):
        StreamDiTConfig(partitions=[[2, 2]], partition_weights=[1.0, 2.0]).validate()
    with pytest.raises(ConfigError, match="distiller.buffer_frames"):
        StreamDiTConfig(buffer_frames=2, ref_frames=2).validate()
    with pytest.raises(ConfigError, match="exactly one"):
        StreamDiTDistillConfig(partitions=[[2, 2], [1, 1]]).validate()
    with pytest.raises(ConfigError, match="distiller.states"):
        StreamDiTDistillConfig(states="rollout").validate()
    with pytest.raises(ConfigError, match="distiller.teacher_solver"):
        StreamDiTDistillConfig(teacher_solver="rk4").validate()
    with pytest.raises(ConfigError, match="distiller.sample_solver"):
        StreamDiTConfig(sample_solver="midpoint").validate()
    with pytest.raises(ConfigError, match="distiller.ref_recycle"):
        StreamDiTConfig(ref_recycle=1.0).validate()
    d = StreamDiT(StreamDiTConfig(buffer_frames=6, ref_frames=2, partitions=[[2, 2]]), _tiny_net())
    with pytest.raises(ConfigError, match="data.params.frames=6"):
        d.loss({"x": torch.zeros(2, 5, 1, 16, 16)}, 0, "student", StepRNG(0, 0))


def test_resume_equals_uninterrupted(tmp_path):
    extra = [*TINY, "train.steps=6"]
    full = train(load_config(None, [f"out_dir={tmp_path / 'full'}", *extra]))
    cfg = load_config(None, [f"out_dir={tmp_path / 'part'}", *extra, "train.ckpt_every=3"])
    prepare_run_dir(Path(cfg.out_dir), to_yaml(cfg), resume=False, overwrite=False)
    from flowdistill.api import build_source

    tr = Trainer(build_distiller_for(cfg, build_source(cfg.data)), cfg.train, cfg.out_dir,
                 source=build_source(cfg.data))
    while tr.step < 3:
        tr.train_step()
    tr.save()
    del tr
    train(cfg, resume=True)
    a, b = student_weights(full), student_weights(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_video_model_sizes_come_from_the_clip_shape():
    """``model.params`` left empty: a video DiT on bouncing digits gets ``in_channels`` from the
    clip's channel axis ([F, C, H, W] -> C = 1), not from the frame count."""
    from flowdistill.api import _default_params
    from flowdistill.config import load_config

    cfg = load_config(None, ["out_dir=/tmp/x", "model.name=video_dit", "data.name=bouncing_digits",
                             "data.params.frames=10"], default_distiller="streamdit")
    params = _default_params(cfg, 0, False)
    assert params["in_channels"] == 1 and params["sample_size"] == 32


def test_reference_noise_levels_and_weights():
    """``ref_noise``: clean references are noised to one level r ~ U(0, ref_noise) per buffer,
    references being generated (warm-up levels > 0) are left alone, and the references still
    carry no loss (their output's gradient is zero)."""
    cfg = StreamDiTConfig(buffer_frames=6, ref_frames=2, partitions=[[2, 2]], warmup_share=0.5,
                          ref_noise=0.3)
    d = StreamDiT(cfg, _tiny_net())
    rng = StepRNG(0, 0)
    t, _ = d.training_levels(64, rng)
    noised = d.noise_references(t, StepRNG(0, 1))
    clean = (t[:, :2] == 0).all(dim=1)
    assert clean.any() and (~clean).any()
    r = noised[clean, :2]
    assert torch.all(r[:, 0] == r[:, 1]) and float(r.min()) >= 0 and float(r.max()) <= 0.3
    assert float(r.std()) > 0.05  # a spread of levels, not one
    torch.testing.assert_close(noised[~clean], t[~clean], rtol=0, atol=0)
    torch.testing.assert_close(noised[:, 2:], t[:, 2:], rtol=0, atol=0)
    seen = {}


    d.cfg.warmup_share = 0.0
    d.attach_engine({"student": Spy(d.student, seen)})
    d.loss({"x": _clips(4)}, 0, "student", StepRNG(0, 0))["loss"].backward()
    assert float(seen["t"][:, :2].max()) > 0  # the net saw noised references
    assert torch.all(seen["v"].grad[:, :2] == 0) and seen["v"].grad[:, 2:].abs().sum() > 0


def test_distillation_sees_the_references_as_the_sampler_does():
    """``ref_noise``: the student's state and every teacher micro-step see the clean references at
    the sampling level r = ref_noise / 2, the same noised pixels, and the references carry no loss."""
    d = _distiller_pair()
    d.cfg.ref_noise = 0.3
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t, s=None, cond=None):
            calls.append((x[:, :2].clone(), t[:, :2].clone()))
            return self.net(x, t, s, cond=cond) if s is not None else self.net(x, t, cond=cond)

    d.teacher = Recorder(d.teacher)
    d.attach_engine({"student": Recorder(d.student)})
    out = d.loss({"x": _clips(3)}, 0, "student", StepRNG(0, 0))
    assert len(calls) == 5  # 4 teacher micro-steps + the student
    for refs, t in calls:
        assert torch.all(t == 0.15)
        torch.testing.assert_close(refs, calls[0][0], rtol=0, atol=0)  # one noised view for all
    clean = _clips(3)[:, :2]
    assert float((calls[0][0] - 0.85 * clean).abs().mean()) > 0.05  # noise was added
    assert torch.isfinite(out["loss"])


def test_heun_teacher_target_is_s_heun_micro_steps():
    """``teacher_solver: heun``: the target is ``s`` Heun micro-steps of the teacher (two calls each),
    the references do not move, and it differs from the Euler target (the teacher is curved)."""
    d = _distiller_pair()
    x = _clips(2)
    lv = d.micro_levels()
    x_t = d.start_states(x, lv[0].expand(2, -1), StepRNG(0, 0))
    euler = d.teacher_target(x_t, lv, None)
    d.cfg.teacher_solver = "heun"
    target = d.teacher_target(x_t, lv, None)
    torch.testing.assert_close(target[:, :2], x_t[:, :2], rtol=0, atol=0)
    x = x_t.clone()
    with torch.no_grad():
        for m in range(4):
            dt = (lv[m + 1] - lv[m])[None, :, None, None, None]
            v1 = d.teacher(x, lv[m].expand(2, -1))
            v2 = d.teacher(x + dt * v1, lv[m + 1].expand(2, -1))
            x = x + dt * (v1 + v2) / 2
    torch.testing.assert_close(target, x, rtol=0, atol=1e-6)  # same ops in float32
    assert float((target - euler).abs().max()) > 1e-3


def test_sample_solver_sets_the_teachers_streaming_solver():
    """``sample_solver: heun`` (or ``stream(solver=...)``): the teacher streams with Heun at two calls
    per step; a two-time student always jumps with one call."""
    cfg = StreamDiTConfig(buffer_frames=6, ref_frames=2, partitions=[[2, 2]], sample_solver="heun")
    d = StreamDiT(cfg, _tiny_net())
    clips, smp = d.stream(1, 4, torch.Generator().manual_seed(0), model=d.student.eval())
    assert smp.solver == "heun" and clips.shape == (1, 4, 1, 16, 16)
    _, smp_e = d.stream(1, 4, torch.Generator().manual_seed(0), model=d.student.eval(), solver="euler")
    assert smp.nfe == 2 * smp_e.nfe
    assert _distiller_pair().sampler(_distiller_pair().student, solver="heun").solver == "euler"


def test_recycled_references_are_the_nets_own_reconstruction():
    """``ref_recycle``: in the chosen buffers with clean references, the references become
    ``x̃ − r·v(x̃, r)`` with ``x̃`` the references noised to ``r ≤ ref_recycle`` and every other frame
    pure noise at ``t = 1``; buffers not chosen, and warm-up buffers, keep the true references; the
    continuation frames (the targets) are never touched."""
    cfg = StreamDiTConfig(buffer_frames=6, ref_frames=2, partitions=[[2, 2]], warmup_share=0.5,
                          ref_recycle=0.4, ref_recycle_share=0.5)
    torch.manual_seed(0)
    d = StreamDiT(cfg, _tiny_net())
    x = _clips(32)
    t, _ = d.training_levels(32, StepRNG(0, 0))
    seen = {}
    d.attach_engine({"student": Spy(d.student, seen)})
    out = d.recycle_references(x, t, StepRNG(0, 1))
    torch.testing.assert_close(out[:, 2:], x[:, 2:], rtol=0, atol=0)
    changed = (out[:, :2] != x[:, :2]).flatten(1).any(dim=1)
    clean = (t[:, :2] == 0).all(dim=1)
    assert changed.any() and (clean & ~changed).any()  # a share, not all
    assert not (changed & ~clean).any()  # warm-up buffers keep theirs
    r = seen["t"][:, 0]
    assert torch.all(seen["t"][:, :2] == r[:, None]) and torch.all(seen["t"][:, 2:] == 1)
    assert float(r.max()) <= 0.4 and float(r.min()) >= 0
    # the reconstruction x̃ − r·v from the recorded call, where chosen
    rc = r[changed, None, None, None, None]
    x_in_refs = out[changed, :2] + rc * seen["v"][changed, :2]
    assert float((x_in_refs - (1 - rc) * x[changed, :2]).std()) > 0.01  # the net saw noised references
    d.cfg.ref_recycle = 0.0
    assert d.recycle_references(x, t, StepRNG(0, 1)) is x
