"""StreamDiT distillation with the consistency objective (``objective: consistency``): one teacher
micro-step from a random micro-step ``m``, then the target network to the interval's end."""

from __future__ import annotations

import pytest
import torch

from flowdistill.core.rng import StepRNG
from flowdistill.distillers.streamdit_distill import StreamDiTDistill, StreamDiTDistillConfig
from flowdistill.errors import ConfigError
from tests.test_streamdit import CONFIGS, _clips, _distiller_pair, _tiny_net


def _consistency_pair(target: str = "online", solver: str = "euler") -> StreamDiTDistill:
    """The curved random teacher of tests/test_streamdit.py and its student, objective consistency."""
    return _distiller_pair(objective="consistency", target=target, teacher_solver=solver)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_consistency_target_is_one_teacher_step_then_the_target_net(solver):
    d = _consistency_pair(solver=solver)
    lv = d.micro_levels()  # [5, 6]
    x = _clips(2)
    for m in range(4):
        x_m = d.start_states(x, lv[m].expand(2, -1), StepRNG(0, 0))
        pair = torch.stack([lv[m], lv[m + 1]])[None].expand(2, -1, -1)
        end = lv[-1].expand(2, -1)
        got = d.consistency_target(x_m, pair, end, None)
        dt = (lv[m + 1] - lv[m])[None, :, None, None, None]
        with torch.no_grad():
            v = d.teacher(x_m, lv[m].expand(2, -1))
            if solver == "heun":
                v = (v + d.teacher(x_m + dt * v, lv[m + 1].expand(2, -1))) / 2
            y = x_m + dt * v
            rest = (lv[-1] - lv[m + 1])[None, :, None, None, None]
            want = y + rest * d.student(y, lv[m + 1].expand(2, -1), end)
        # same float32 ops on O(1) values, batched vs per-step broadcasting: a few ulps (~1e-7), so 1e-6
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        if m == 3:  # the last micro-step: the teacher's step alone, the target net adds nothing
            # exact: rest = 0 there, so y + 0·u⁻ is y bit for bit
            torch.testing.assert_close(got, d.teacher_target(x_m, pair, None), rtol=0, atol=0)
        torch.testing.assert_close(got[:, :2], x_m[:, :2], rtol=0, atol=0)  # references do not move


def test_consistency_training_closes_the_gap_to_the_teachers_micro_steps():
    """On a fixed batch, 80 Adam steps of the consistency objective cut the student's one-call state
    error against the teacher's full 4 micro-steps from m = 0 (the map it is meant to learn, which
    its loss never sees directly) at least 5x (seen: 56x; with the target net's
    continuation dropped the same 80 steps do not reach 5x)."""
    d = _consistency_pair(target="online")
    batch = {"x": _clips(8, seed=1)}
    lv = d.micro_levels()
    t, s = lv[0].expand(8, -1), lv[-1].expand(8, -1)
    x_t = d.start_states(batch["x"], t, StepRNG(3, 0))
    want = d.teacher_target(x_t, lv, None)

    def err() -> float:
        with torch.no_grad():
            one = x_t + (s - t)[..., None, None, None] * d.student(x_t, t, s)
        return float(((one - want)[:, 2:] ** 2).mean())

    opt = torch.optim.Adam(d.student.parameters(), lr=2e-3)
    before = err()
    for step in range(80):
        out = d.loss(batch, step, "student", StepRNG(step, 0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        d.after_step(step, "student")
    after = err()
    assert before > 1e-4  # the teacher is curved: there is a gap to close
    assert after < before / 5, (before, after)


def test_ema_target_follows_the_student_and_is_checkpointed():
    d = _consistency_pair(target="ema")
    assert d.target is not None and d.target.ema is not None
    key = next(k for k in d.state_dict() if k.startswith("target.ema."))
    p_ema = dict(d.target.ema.named_parameters())
    name = key.removeprefix("target.ema.")
    before = p_ema[name].clone()
    with torch.no_grad():
        dict(d.student.named_parameters())[name].add_(1.0)
    d.after_step(0, "student")
    # d = 0.95: 5 % of the move; 0.95·p + 0.05·(p + 1) in float32 on O(0.1) weights is off by ~1e-8
    torch.testing.assert_close(p_ema[name], before + 0.05, rtol=0, atol=1e-6)
    inference = StreamDiTDistill(d.cfg, _tiny_net(two_time=True), None, inference_only=True)
    assert inference.target is None  # sampling builds no copy


def test_consistency_config_errors_and_config_loads():
    with pytest.raises(ConfigError, match="distiller.objective"):
        StreamDiTDistillConfig(objective="flow_map").validate()
    with pytest.raises(ConfigError, match="states: data"):
        StreamDiTDistillConfig(objective="consistency", states="teacher").validate()
    with pytest.raises(ConfigError, match="distiller.target"):
        StreamDiTDistillConfig(objective="consistency", target="frozen").validate()
    with pytest.raises(ConfigError, match="distiller.target_decay"):
        StreamDiTDistillConfig(target_decay=1.5).validate()
    from flowdistill.config import load_config

    for name in ("distill_consistency", "distill_c4"):
        cfg = load_config(CONFIGS / f"streamdit_{name}.yaml")
        assert cfg.data.params["frames"] == cfg.distiller.buffer_frames
    assert load_config(CONFIGS / "streamdit_distill_consistency.yaml").distiller.objective == "consistency"
