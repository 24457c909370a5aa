"""Recipes: the format's checks (references, keys, overrides), stage-by-stage resume (skip finished
stages, resume after a kill between stages with the same weights), and multi-stage schedules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowdistill.errors import ConfigError
from flowdistill.recipes import load_recipe, run_recipe
from tests.helpers import REPO, kill_tree, student_weights

TRAIN = ("{steps: %d, batch_size: 128, lr: 2.0e-3, warmup_steps: 0, log_every: 2, ckpt_every: %d, "
         "ema_decay: 0.9}")

TWO_STAGE = """\
out_dir: {out}
vars: {{lr2: 1.0e-3}}
common:
  model: {{name: mlp, params: {{hidden: 32, depth: 2}}}}
  data: {{name: checkerboard}}
stages:
  - name: teacher
    kind: train
    job:
      train: {teacher_train}
  - name: student
    kind: distill
    job:
      teacher: ${{stage:teacher}}
      train: {student_train}
      distiller: {{name: freeflow, derivative: fd, correction_warmup: 0, fake_repeats: 1}}
"""


def _recipe(tmp_path: Path, name: str = "r.yaml", teacher_steps: int = 6, student_steps: int = 6,
            ckpt: int = 2, text: str = TWO_STAGE) -> Path:
    f = tmp_path / name
    f.write_text(text.format(out=tmp_path / "out", teacher_train=TRAIN % (teacher_steps, ckpt),
                             student_train=TRAIN % (student_steps, ckpt)))
    return f


# -- the format ---------------------------------------------------------------------------------
def test_stage_references_resolve_to_earlier_run_dirs_and_overrides_reach_one_stage(tmp_path):
    f = _recipe(tmp_path)
    r = load_recipe(f, ["stages.student.train.steps=9", "lr2=5e-4"])
    teacher, student = r.stages
    assert teacher.run_dir == tmp_path / "out" / "teacher"
    assert student.job.teacher == str(tmp_path / "out" / "teacher")
    assert student.job.train.steps == 9 and teacher.job.train.steps == 6  # only the named stage
    assert student.job.distiller.name == "freeflow" and teacher.job.distiller.name == "flow_matching"
    assert student.job.out_dir == str(tmp_path / "out" / "student")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("${stage:teacher}", "${stage:student}"), r"names a later stage"),
    (lambda t: t.replace("${stage:teacher}", "${stage:nope}"),
     r"names no such stage \(earlier stages: teacher\)"),
    (lambda t: t.replace("${stage:teacher}", "${recipe:nope}"),
     r"\$\{recipe:nope\} is not a recipe variable"),
    (lambda t: t.replace("kind: distill", "kind: dance"), r"stages\.student\.kind' must be one of"),
    (lambda t: t.replace("name: student", "name: teacher"), r"stage 'teacher' appears twice"),
    (lambda t: t.replace("derivative: fd", "derivativ: fd"), r"recipe stage 'student': .*derivativ"),
    (lambda t: t.replace("vars:", "varz:"), r"recipe key 'varz' is unknown"),
    (lambda t: t.replace("kind: train", "kind: distill"), None),  # a flow-matching distil is allowed
])
def test_bad_recipes_are_one_line_errors_naming_the_key(tmp_path, edit, message):
    f = _recipe(tmp_path)
    f.write_text(edit(f.read_text()))
    if message is None:
        load_recipe(f)
        return
    with pytest.raises(ConfigError, match=message) as e:
        load_recipe(f)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing written while checking


def test_bad_overrides_name_the_stage_or_key(tmp_path):
    f = _recipe(tmp_path)
    with pytest.raises(ConfigError, match=r"names no stage \(stages: teacher, student\)"):
        load_recipe(f, ["stages.nope.train.steps=3"])
    with pytest.raises(ConfigError, match=r"recipe key 'nope' is unknown"):
        load_recipe(f, ["nope=3"])
    with pytest.raises(ConfigError, match=r"train.steps"):
        load_recipe(f, ["stages.teacher.train.steps=zero"])


# -- running and resuming ---------------------------------------------------------------------
def test_rerun_skips_finished_stages_and_a_changed_finished_stage_is_refused(tmp_path):
    f = _recipe(tmp_path)
    runs = run_recipe(f, progress=False)
    assert set(runs) == {"teacher", "student"}
    w = runs["student"] / "student" / "diffusion_pytorch_model.safetensors"
    stamp = (runs["teacher"] / "student" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns, \
        w.stat().st_mtime_ns
    run_recipe(f, progress=False)
    assert ((runs["teacher"] / "student" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns,
            w.stat().st_mtime_ns) == stamp
    # each stage's resolved job config lies beside it, loadable as a plain job
    from flowdistill.config import load_config

    assert load_config(tmp_path / "out" / "student.yaml").distiller.name == "freeflow"
    with pytest.raises(ConfigError, match=r"config key 'train.lr' differs from the saved run"):
        run_recipe(f, ["stages.student.train.lr=0.5"], progress=False)
    # more steps for a finished stage continue it from its checkpoint
    run_recipe(f, ["stages.student.train.steps=8"], progress=False)
    from flowdistill.runs import read_meta

    assert read_meta(runs["student"] / "student")["steps"] == 8


def _spawn(recipe: Path) -> subprocess.Popen:
    code = f"from flowdistill.recipes import run_recipe; run_recipe({str(recipe)!r}, progress=False)"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_recipe_killed_between_stages_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL once the first stage has exported (the second has just started or not), rerun:
    the first stage is not retrained and the final student equals an uninterrupted run's."""
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "kill"
    ref_dir.mkdir()
    kill_dir.mkdir()
    ref = _recipe(ref_dir, student_steps=40, ckpt=4)
    killed = _recipe(kill_dir, student_steps=40, ckpt=4)
    proc = _spawn(killed)
    done = kill_dir / "out" / "teacher" / "student" / "diffusion_pytorch_model.safetensors"
    t0 = time.time()
    while not done.is_file() and proc.poll() is None and time.time() - t0 < 240:
        time.sleep(0.05)
    assert done.is_file(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
    stamp = done.stat().st_mtime_ns
    kill_tree(proc.pid)
    assert not (kill_dir / "out" / "student" / "student").exists()  # killed before the second finished
    run_recipe(killed, progress=False)
    assert done.stat().st_mtime_ns == stamp  # the finished stage was skipped
    run_recipe(ref, progress=False)
    a, b = student_weights(kill_dir / "out" / "student"), student_weights(ref_dir / "out" / "student")
    assert a.keys() == b.keys()
    for k in a:  # same seeds, same steps, resumed from exact checkpoints: bit-identical on one thread
        assert torch.equal(a[k], b[k]), k


# -- schedules: two-stage training, progressive 4 → 2 → 1 -------------------------------------
def _weights(run_dir: Path) -> dict:
    return student_weights(run_dir)


def test_a_two_stage_training_starts_stage_two_from_stage_one(tmp_path):
    from flowdistill.api import build_distiller_for
    from flowdistill.data.registry import build_dataset

    f = _recipe(tmp_path, text=TWO_STAGE.replace(
        "  - name: student\n    kind: distill\n    job:\n      teacher: ${{stage:teacher}}\n"
        "      train: {student_train}\n"
        "      distiller: {{name: freeflow, derivative: fd, correction_warmup: 0, fake_repeats: 1}}\n",
        "  - name: finetune\n    kind: train\n    job:\n      init: ${{stage:teacher}}\n"
        "      train: {student_train}\n"))
    r = load_recipe(f, ["stages.finetune.train.lr=${recipe:lr2}"])
    assert r.stage("finetune").job.train.lr == 1.0e-3
    assert r.stage("finetune").job.init == str(r.stage("teacher").run_dir)
    runs = run_recipe(f, ["stages.finetune.train.lr=${recipe:lr2}"], progress=False)
    job = r.stage("finetune").job
    start = build_distiller_for(job, build_dataset(job.data)).student.state_dict()
    first = _weights(runs["teacher"])
    assert all(torch.equal(start[k], first[k]) for k in first)  # stage 2 starts where stage 1 ended
    final = _weights(runs["finetune"])
    assert any(not torch.equal(final[k], first[k]) for k in first)  # and then trains on


PROGRESSIVE = REPO / "configs" / "recipes" / "instaflow_progressive_checkerboard.yaml"


def test_progressive_schedule_recipe_inits_each_stage_from_the_last_and_shares_couplings(tmp_path):
    """The shipped 4 → 2 → 1-step InstaFlow recipe at tiny settings, from a tiny teacher."""
    from flowdistill.api import build_distiller_for, train
    from flowdistill.config import load_config
    from tests.helpers import TINY_TEACHER

    teacher = train(load_config(None, [f"out_dir={tmp_path / 't'}", *TINY_TEACHER, "train.steps=30",
                                       "train.ckpt_every=0"]))
    over = [f"out_dir={tmp_path / 'p'}", f"teacher={teacher}", "couple.n_pairs=256",  # vars.couple
            "couple.shard_size=128", "couple.chunk_size=128", "couple.solver=rk4", "couple.nfe=8",
            "train.steps=4", "train.batch_size=64", "train.warmup_steps=0", "train.ckpt_every=0",
            "train.log_every=2",
            "stages.2rf.train.steps=4", "stages.2rf.train.batch_size=64", "stages.2rf.train.warmup_steps=0",
            "stages.2rf.train.ckpt_every=0"]
    runs = run_recipe(PROGRESSIVE, over, report=False, progress=False)
    r = load_recipe(PROGRESSIVE, over)
    assert [r.stage(k).job.distiller.steps for k in ("k4", "k2", "k1")] == [4, 2, 1]
    for prev, cur in (("k4", "k2"), ("k2", "k1")):
        start = build_distiller_for(r.stage(cur).job).student.state_dict()
        before = _weights(runs[prev])
        assert all(torch.equal(start[k], before[k]) for k in before), cur  # initialised from prev
    timings = json.loads((tmp_path / "p" / "timings.json").read_text())
    assert "k4/couple" in timings and "k2/couple" not in timings and "k1/couple" not in timings  # one store


def test_a_run_saved_before_new_config_keys_still_counts_as_finished(tmp_path):
    """A finished stage whose config.yaml predates keys added later (guidance:, init) is not redone."""
    import yaml

    f = _recipe(tmp_path)
    runs = run_recipe(f, progress=False)
    saved = runs["teacher"] / "config.yaml"
    d = yaml.safe_load(saved.read_text())
    d.pop("guidance"), d.pop("init")
    saved.write_text(yaml.safe_dump(d))
    stamp = (runs["teacher"] / "student" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    run_recipe(f, progress=False)
    assert (runs["teacher"] / "student" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
