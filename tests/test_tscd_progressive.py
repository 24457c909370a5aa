"""Hyper-SD's progressive TSCD with the previous stage as teacher: a distilled two-time flow map used
as a teacher steps by its own jump (flowdistill.models.teachers.FlowMapTeacher, dispatched by
flowdistill.core.solvers.step), methods that need a velocity refuse it in one line, and the shipped
previous-stage-teacher recipe runs with each stage's teacher the previous stage's student."""

from __future__ import annotations

import pytest
import torch

from flowdistill.core.flowmap import flow_map_jump
from flowdistill.core.solvers import STEP_SOLVERS, JumpField
from flowdistill.core.solvers import step as solver_step
from flowdistill.errors import ConfigError
from flowdistill.models.mlp import MLPFlowNet
from flowdistill.models.teachers import FlowMapTeacher, flow_map_teacher, is_flow_map_net
from tests.helpers import REPO

TEACHER = REPO / "assets" / "checkerboard_teacher"
RECIPE = REPO / "configs" / "recipes" / "tscd_progressive_prevteacher_checkerboard.yaml"


def _flow_map_net(seed: int = 0) -> MLPFlowNet:
    """A small two-time MLP with non-trivial weights (its ``s`` branch is zero-initialised, so it is
    perturbed: otherwise ``u(x, t, s)`` would not depend on ``s``)."""
    torch.manual_seed(seed)
    net = MLPFlowNet(data_dim=2, hidden=32, depth=2, two_time=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.double().eval()


def test_flow_map_teacher_step_is_its_jump_exactly():
    """Every step solver name gives ``X(x, t, s) = x + (s − t)·u(x, t, s)`` bit for bit (the flow map
    is the solution operator: no quadrature of its velocity), and a zero-length step is the identity."""
    net = _flow_map_net()
    teacher = FlowMapTeacher(net)
    assert isinstance(teacher, JumpField) and not isinstance(net, JumpField)
    x = torch.randn(16, 2, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64)
    s = t * torch.rand(16, dtype=torch.float64)
    want = flow_map_jump(net, x, t, s)
    for solver in STEP_SOLVERS:
        assert torch.equal(solver_step(teacher, x, t, s, solver), want), solver
    assert torch.equal(solver_step(teacher, x, t, t, "heun"), x)
    # as a field it is the diagonal u(x, t, t); a velocity teacher's Euler step uses it (not a jump)
    torch.testing.assert_close(teacher(x, t), net(x, t, t), rtol=0, atol=0)
    euler_of_diagonal = x + (s - t)[:, None] * net(x, t, t)
    assert not torch.allclose(euler_of_diagonal, want)  # the jump really is another map than Euler's


def test_two_time_teacher_errors_name_the_key(tmp_path):
    """A method that needs a velocity refuses a flow-map teacher; a flow-map teacher is not guided."""
    from flowdistill.api import build_distiller_for, couple_teacher
    from flowdistill.config import load_config
    from flowdistill.core.guidance import GuidanceSpec

    net = _flow_map_net().float()
    d = tmp_path / "fm"
    net.save_pretrained(str(d))
    assert is_flow_map_net(net) and not is_flow_map_net(MLPFlowNet(data_dim=2, hidden=8, depth=1))
    cfg = load_config(REPO / "configs" / "freeflow_checkerboard.yaml", [f"teacher={d}"])
    with pytest.raises(ConfigError, match=r"two-time flow map .* 'freeflow' needs a velocity teacher"):
        build_distiller_for(cfg)
    with pytest.raises(ConfigError, match="coupling generation needs a velocity teacher"):
        couple_teacher(d, tmp_path / "c", None, (2,))
    with pytest.raises(ConfigError, match=r"^guidance\.scale: .*flow map"):
        flow_map_teacher(net, d, "distiller 'tscd'", True, GuidanceSpec(scale=2.0))
    # the accepting method gets the wrapper, frozen
    cfg = load_config(REPO / "configs" / "tscd_checkerboard.yaml",
                      [f"teacher={d}", "model.params.hidden=32", "model.params.depth=2"])
    t = build_distiller_for(cfg).teacher
    assert isinstance(t, FlowMapTeacher) and not any(p.requires_grad for p in t.parameters())


@pytest.mark.skipif(not TEACHER.is_dir(), reason="checkerboard teacher asset not shipped")
def test_prevteacher_recipe_runs_and_each_stage_distils_the_previous_student(tmp_path):
    """The shipped recipe (tiny steps) runs; the k4 stage's teacher is the k8 student by value, its
    boundary target is that student's jump exactly, and the k8 stage keeps the original teacher."""
    from flowdistill.api import build_distiller_for
    from flowdistill.recipes import load_recipe, run_recipe
    from tests.helpers import student_weights

    over = [f"out_dir={tmp_path / 'p'}", f"teacher={TEACHER}", "train.steps=2", "train.batch_size=32",
            "train.warmup_steps=0", "train.ckpt_every=0", "train.log_every=1"]
    r = load_recipe(RECIPE, over)
    assert [r.stage(k).job.distiller.segments for k in ("k8", "k4", "k2", "k1")] == [8, 4, 2, 1]
    runs = run_recipe(RECIPE, over, report=False, progress=False)
    assert not isinstance(build_distiller_for(r.stage("k8").job).teacher, FlowMapTeacher)
    for prev, cur in (("k8", "k4"), ("k4", "k2"), ("k2", "k1")):
        d = build_distiller_for(r.stage(cur).job)
        assert isinstance(d.teacher, FlowMapTeacher), cur
        held, before = d.teacher.net.state_dict(), student_weights(runs[prev])
        assert set(held) == set(before) and all(torch.equal(held[k], before[k]) for k in before), cur
    # k4's boundary target (t' = e) is the k8 student's own jump X_8(x_t, t, e), to float precision
    d = build_distiller_for(r.stage("k4").job)
    grid = d.grid_ascending("cpu", torch.float32)
    e = d.edges(4, dtype=torch.float32)[2].expand(64)
    n = int((grid == e[0]).nonzero())
    t, tp = grid[n + 1].expand(64), grid[n].expand(64)
    x_t = torch.randn(64, 2)
    _, target = d.consistency_target(x_t, t, tp, e)
    torch.testing.assert_close(target, flow_map_jump(d.teacher.net, x_t, t, e), rtol=0, atol=0)
