"""A method added outside the package (tests/plugins/velocity_regression.py) goes the whole way through
``--plugin``: distilled from the CLI, sampled, evaluated and benchmarked by scripts/bench_quality.py
(which finds it through its declared ``bench_rows``), with no package file touched."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.helpers import REPO, main_in_process

PLUGIN = str(REPO / "tests" / "plugins" / "velocity_regression.py")
TEACHER = REPO / "assets" / "checkerboard_teacher"
JOB = """\
out_dir: unused
model: {name: mlp}
data: {name: checkerboard}
train: {steps: 40, batch_size: 256, lr: 1.0e-3, warmup_steps: 0, log_every: 10, ckpt_every: 0, ema_decay: 0.0}
distiller: {name: velocity_regression}
"""


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_quality_under_test",
                                                  REPO / "scripts" / "bench_quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not TEACHER.is_dir(), reason="checkerboard teacher asset not shipped")
def test_a_plugin_method_is_distilled_sampled_evaluated_and_benchmarked(tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(JOB)
    run = tmp_path / "run"
    code, out, err = main_in_process(capsys, "distill", str(cfg), f"out_dir={run}",
                                     f"teacher={TEACHER}", "--plugin", PLUGIN)
    assert code == 0, err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0]  # the student moved toward the teacher

    png = tmp_path / "s.png"
    code, out, err = main_in_process(capsys, "sample", str(run), "--plugin", PLUGIN, "--nfe", "2",
                                     "--n", "300", "--out", str(png), "--solver", "heun")
    assert code == 0, err
    assert png.stat().st_size > 0
    code, out, err = main_in_process(capsys, "eval", str(run), "--plugin", PLUGIN, "--nfe", "2,4",
                                     "--n", "500", "--out", str(tmp_path / "eval"))
    assert code == 0, err
    table = json.loads(next((tmp_path / "eval").glob("*.json")).read_text())
    table = table["rows"] if isinstance(table, dict) else table
    assert sorted({r["nfe"] for r in table if r.get("model") != "data"}) == [2, 4]

    bench = _bench_module()
    runs = tmp_path / "bench"
    assert bench.main(["--plugin", PLUGIN, "--methods", "velocity_regression", "--config",
                       f"velocity_regression={cfg}", "--problems", "checkerboard", "--runs", str(runs),
                       "--steps-scale", "0.25", "--n", "400", "--seeds", "2"]) == 0
    rows = json.loads((runs / "quality.json").read_text())["rows"]
    mine = {(r["model"], r["nfe"]) for r in rows if r["metric"] == "sw2"}
    assert {("velocity regression", 2), ("velocity regression", 4)} <= mine  # its declared eval_nfe
    teacher_nfes = {nfe for model, nfe in mine if model.startswith("teacher")}
    assert {2, 4, 128} <= teacher_nfes  # the teacher at equal NFE and at many steps
    assert all(r["seeds"] == 2 and r["floor"] > 0 for r in rows if r["metric"] == "sw2")
