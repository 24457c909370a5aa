"""The shipped TSCD / LCM / PCM configs and progressive recipes for every problem
(configs/{tscd,lcm,pcm}_<problem>.yaml, configs/recipes/tscd_progressive_<problem>.yaml): each loads
as the method and problem its name says, the recipes chain k = 8 → 4 → 2 → 1 through ``init``, and
each job trains a few steps into a student whose samples are finite."""

from __future__ import annotations

import pytest
import torch

from flowdistill.api import load_run, train
from flowdistill.config import load_config
from flowdistill.recipes import load_recipe
from tests.helpers import REPO

TOYS = ("checkerboard", "8gaussians", "spirals")
PROBLEMS = (*TOYS, "digits")
SEGMENTS = {"tscd": 4, "lcm": 1, "pcm": 4}


def _teacher(problem: str) -> str:
    return str(REPO / "assets" / f"{problem}_teacher")


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("method", sorted(SEGMENTS))
def test_job_config_is_the_method_on_the_problem(method, problem):
    cfg = load_config(REPO / "configs" / f"{method}_{problem}.yaml", [f"teacher={_teacher(problem)}"])
    assert (cfg.data.name, cfg.distiller.name, cfg.distiller.segments) == (problem, method, SEGMENTS[method])
    # LCM keeps its EMA target and γ = 1 sampler; PCM / TSCD the online target
    assert cfg.distiller.target == ("ema" if method == "lcm" else "online")
    assert cfg.distiller.loss == "pseudo_huber_elementwise" and cfg.distiller.huber_c == 0.001
    if problem == "digits":
        # the null-label flow, unguided: what the digits FID protocol samples (configs/tscd_digits.yaml)
        assert cfg.data.conditional is False and cfg.guidance.scale == 1.0 and cfg.model.name == "unet"
        shipped = load_config(REPO / "configs" / f"{method}_{problem}.yaml")
        assert (REPO / shipped.teacher).is_dir()


@pytest.mark.parametrize("problem", PROBLEMS)
def test_progressive_recipe_chains_8_4_2_1(problem):
    recipe = load_recipe(REPO / "configs" / "recipes" / f"tscd_progressive_{problem}.yaml")
    jobs = [s for s in recipe.stages if s.job is not None]
    assert [s.job.distiller.segments for s in jobs] == [8, 4, 2, 1]
    assert all(s.job.data.name == problem for s in jobs)
    # each stage starts from the previous one's student; the first from the teacher
    assert not jobs[0].job.init
    for prev, cur in zip(jobs, jobs[1:], strict=False):
        assert cur.job.init == prev.job.out_dir
    assert jobs[-1].job.distiller.target == "ema" and jobs[-1].job.distiller.sample_gamma == 1.0


@pytest.mark.parametrize("problem", TOYS[1:])
@pytest.mark.parametrize("method", sorted(SEGMENTS))
def test_toy_config_trains_a_few_steps(method, problem, tmp_path):
    cfg = load_config(REPO / "configs" / f"{method}_{problem}.yaml",
                      [f"teacher={_teacher(problem)}", f"out_dir={tmp_path / 'run'}", "train.steps=3",
                       "train.log_every=1", "train.ckpt_every=0", "train.warmup_steps=1"])
    run = load_run(train(cfg))
    x = run.sample(64, 4, seed=0)
    assert x.shape == (64, 2) and torch.isfinite(x).all()


@pytest.mark.parametrize("method", sorted(SEGMENTS))
def test_digits_config_trains_a_few_steps(method, tmp_path):
    cfg = load_config(REPO / "configs" / f"{method}_digits.yaml",
                      [f"out_dir={tmp_path / 'run'}", "train.steps=2", "train.batch_size=16",
                       "train.log_every=1", "train.ckpt_every=0", "train.warmup_steps=1"])
    x = load_run(train(cfg)).sample(8, 4, seed=0)
    assert x.shape == (8, 1, 8, 8) and torch.isfinite(x).all()


def test_cfg_digits_config_is_class_conditional_and_guided(tmp_path):
    """configs/tscd_digits_cfg.yaml: labelled batches, the teacher's own CFG (w = 1.5), and a
    class-conditional student: the same noise under two labels gives two different samples."""
    cfg = load_config(REPO / "configs" / "tscd_digits_cfg.yaml",
                      [f"out_dir={tmp_path / 'run'}", "train.steps=2", "train.batch_size=16",
                       "train.log_every=1", "train.ckpt_every=0", "train.warmup_steps=1"])
    assert cfg.data.conditional is True and cfg.guidance.scale == 1.5 and cfg.distiller.name == "tscd"
    run = load_run(train(cfg))
    assert run.num_classes == 10
    a = run.sample(8, 4, seed=0, cond=torch.zeros(8, dtype=torch.long))
    b = run.sample(8, 4, seed=0, cond=torch.ones(8, dtype=torch.long))
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-3
