"""The reflow → InstaFlow recipe on the 8x8 digits from the shipped teacher, end to end at tiny
settings: stage configs, couplings, timings, the report stage's FID + straightness rows, and the
CLI (`flowdistill recipe`) resuming finished stages."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from flowdistill.api import load_run
from flowdistill.config import load_config
from flowdistill.recipes import load_recipe, run_recipe
from flowdistill.recipes.report import report_rows

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "assets" / "digits_teacher"
RECIPE = REPO / "configs" / "recipes" / "reflow_digits.yaml"


def tiny_overrides(out: Path) -> list[str]:
    """The shipped digits recipe shrunk to seconds: 64 pairs, 3 training steps per stage."""
    over = [f"out_dir={out}", f"teacher={TEACHER}"]
    for stage in ("2rf", "instaflow"):
        pre = f"stages.{stage}."
        over += [f"{pre}distiller.couple.n_pairs=64", f"{pre}distiller.couple.shard_size=32",
                 f"{pre}distiller.couple.chunk_size=32", f"{pre}distiller.couple.nfe=4",
                 f"{pre}train.steps=3", f"{pre}train.batch_size=16", f"{pre}train.warmup_steps=0",
                 f"{pre}train.ckpt_every=0", f"{pre}train.log_every=1"]
    return [*over, "stages.instaflow.distiller.finetune_after=2"]  # the last step uses the digits features


@pytest.mark.skipif(not (TEACHER / "config.json").is_file(), reason="digits teacher asset not shipped")
def test_digits_recipe_runs_end_to_end_and_reports_fid_and_straightness(tmp_path):
    over = tiny_overrides(tmp_path / "chain")
    recipe = load_recipe(RECIPE, over)
    st = recipe.stage("instaflow").job
    assert st.data.name == "digits" and st.distiller.perceptual == "digits"
    runs = run_recipe(RECIPE, over, report=False)
    for stage in ("2rf", "instaflow"):
        cfg = load_config(tmp_path / "chain" / f"{stage}.yaml")
        assert cfg.distiller.name == ("reflow" if stage == "2rf" else "instaflow")
        assert cfg.data.name == "digits"
    timings = json.loads((tmp_path / "chain" / "timings.json").read_text())
    assert set(timings) == {"2rf/couple", "2rf/train", "instaflow/couple", "instaflow/train"}
    assert load_config(runs["instaflow"] / "config.yaml").teacher == str(runs["2rf"])

    teacher = load_run(TEACHER)  # the shipped model directory, sampled as its training run
    assert teacher.cfg.data.name == "digits" and tuple(teacher.sample(2, 1).shape) == (2, 1, 8, 8)

    report = recipe.stage("report")
    report.report["nfe"]["teacher"] = [1, [8, "heun"]]  # small budgets for the test
    report.report["n"] = 48
    rows = report_rows(report)
    got = {(r["model"], r["nfe"], r["solver"]) for r in rows}
    assert {("teacher", 1, "euler"), ("teacher", 8, "heun"), ("2-RF", 2, "euler"),
            ("student (1-step)", 1, "euler")} <= got
    for r in rows:
        assert r["metric"] == "fid" and r["value"] == r["fid"] and r["n"] == 48
        assert math.isfinite(r["fid"]) and r["fid"] >= 0 and math.isfinite(r["fid_floor"])
        assert math.isfinite(r["straightness"]) and r["straightness"] >= 0
    st = {r["model"]: r["straightness"] for r in rows}
    assert st["student (1-step)"] == 0.0 and st["teacher"] > 0  # a one-step path is straight by definition


@pytest.mark.skipif(not (TEACHER / "config.json").is_file(), reason="digits teacher asset not shipped")
def test_cli_recipe_runs_the_chain_and_resumes(tmp_path):
    from tests.helpers import cli

    over = tiny_overrides(tmp_path / "chain")
    r = cli("recipe", str(RECIPE), *over, "--no-report")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "instaflow=" in r.stdout
    assert (tmp_path / "chain" / "instaflow" / "student" / "config.json").is_file()
    before = json.loads((tmp_path / "chain" / "timings.json").read_text())
    again = cli("recipe", str(RECIPE), *over, "--no-report")  # finished stages are skipped
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "chain" / "timings.json").read_text()) == before
    bad = cli("recipe", str(RECIPE), *over, "stages.2rf.distiller.loss=nope")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "nope" in bad.stderr
