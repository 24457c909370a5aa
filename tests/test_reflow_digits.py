"""The reflow → InstaFlow chain on the 8x8 digits from the shipped teacher, end to end at tiny
settings: stage configs, couplings, timings, and FID + straightness rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from flowdistill.config import load_config
from flowdistill.couplings.pipeline import load_pipeline, load_teacher_run, pipeline_rows, run_pipeline

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "assets" / "digits_teacher"
CONFIG = REPO / "configs" / "reflow_digits.yaml"


def tiny_overrides(out: Path) -> list[str]:
    """The shipped digits chain config shrunk to seconds: 64 pairs, 3 training steps per stage."""
    over = [f"out_dir={out}", f"teacher={TEACHER}"]
    for stage in ("reflow", "instaflow"):
        over += [f"{stage}.distiller.couple.n_pairs=64", f"{stage}.distiller.couple.shard_size=32",
                 f"{stage}.distiller.couple.chunk_size=32", f"{stage}.distiller.couple.nfe=4",
                 f"{stage}.train.steps=3", f"{stage}.train.batch_size=16", f"{stage}.train.warmup_steps=0",
                 f"{stage}.train.ckpt_every=0", f"{stage}.train.log_every=1"]
    return [*over, "instaflow.distiller.finetune_after=2"]  # the last step uses the digits features


@pytest.mark.skipif(not (TEACHER / "config.json").is_file(), reason="digits teacher asset not shipped")
def test_digits_chain_runs_end_to_end_and_reports_fid_and_straightness(tmp_path):
    over = tiny_overrides(tmp_path / "chain")
    pipe = load_pipeline(CONFIG, over)
    assert pipe.data.name == "digits" and pipe.instaflow.distiller.perceptual == "digits"
    runs = run_pipeline(CONFIG, over, report=False)
    for stage in ("reflow", "instaflow"):
        cfg = load_config(tmp_path / "chain" / f"{stage}.yaml")
        assert cfg.distiller.name == stage and cfg.data.name == "digits"
    timings = json.loads((tmp_path / "chain" / "timings.json").read_text())
    assert set(timings) == {"2rf/couple", "2rf/train", "instaflow/couple", "instaflow/train"}

    teacher = load_teacher_run(TEACHER)  # the shipped model directory, sampled as its training run
    assert teacher.cfg.data.name == "digits" and tuple(teacher.sample(2, 1).shape) == (2, 1, 8, 8)

    data = load_config(tmp_path / "chain" / "instaflow.yaml").data
    rows = pipeline_rows(runs, 1, data, n=48, seed=3, many_nfe=8)
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
def test_cli_reflow_runs_the_chain_and_resumes(tmp_path):
    from tests.helpers import cli

    over = tiny_overrides(tmp_path / "chain")
    r = cli("reflow", str(CONFIG), *over, "--no-report")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "student=" in r.stdout and (tmp_path / "chain" / "instaflow" / "student" / "config.json").is_file()
    before = json.loads((tmp_path / "chain" / "timings.json").read_text())
    again = cli("reflow", str(CONFIG), *over, "--no-report")  # finished stages are skipped
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "chain" / "timings.json").read_text()) == before
    bad = cli("reflow", str(CONFIG), *over, "reflow.distiller.loss=nope")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "nope" in bad.stderr
