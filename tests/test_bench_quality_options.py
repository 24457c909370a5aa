"""scripts/bench_quality.py's row selection and reference options: ``--rows`` (a label regex),
``--extra LABEL=RUN_DIR@NFES``, ``--teacher-nfe``, and the digits ratio pinned to the teacher at
Heun 64 steps (issue 13)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.helpers import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality_options_under_test",
                                                  REPO / "scripts" / "bench_quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_rows_extra_and_teacher_nfe_parse():
    bench = _bench()
    a = bench.parse_args(["--methods", "pcm", "--rows", "PCM .k=4", "--teacher-nfe", "1,4",
                          "--extra", "k=4 stage=runs/x/k4@4", "--extra", "final=runs/x/k1@1,2"])
    assert a.rows == "PCM .k=4" and a.teacher_nfe == [1, 4]
    # the label may hold '=', the run dir is after the last one; NFEs after the last '@'
    assert {k: (str(p), n) for k, (p, n) in a.extra.items()} == {"k=4 stage": ("runs/x/k4", [4]),
                                                                 "final": ("runs/x/k1", [1, 2])}
    for bad in (["--extra", "nolabel"], ["--extra", "a=runs/x@"], ["--extra", "a=runs/x@0"],
                ["--rows", "("], ["--teacher-nfe", "1,x"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--methods", "pcm", *bad])


def _row(model, nfe, value, metric="fid"):
    return {"model": model, "nfe": nfe, "metric": metric, "value": value}


def test_digits_ratio_is_pinned_to_the_heun_row():
    bench = _bench()
    rows = [_row("teacher", 4, 2.0), _row("teacher", 128, 1.0), _row("teacher (Heun)", 128, 0.8),
            _row("student", 4, 1.0)]
    bench.add_ratios(rows, "teacher", problem_best=True, ref_row=bench.DIGITS_REF)
    assert [r["ratio"] for r in rows] == pytest.approx([2.5, 1.25, 1.0, 1.25])
    # without the Heun row: the teacher's best value, as before
    rows = [_row("teacher", 4, 2.0), _row("teacher", 128, 1.0), _row("student", 4, 1.5)]
    bench.add_ratios(rows, "teacher", problem_best=True, ref_row=bench.DIGITS_REF)
    assert [r["ratio"] for r in rows] == pytest.approx([2.0, 1.0, 1.5])
    # toys: the teacher at 128 steps
    rows = [_row("teacher", 1, 3.0, "sw2"), _row("teacher", 128, 0.5, "sw2"), _row("s", 1, 0.6, "sw2")]
    bench.add_ratios(rows, "teacher", problem_best=False)
    assert [r["ratio"] for r in rows] == pytest.approx([6.0, 1.0, 1.2])


def test_labels_and_teacher_guidance_parse():
    bench = _bench()
    a = bench.parse_args(["--methods", "pcm", "--digits", "--labels", "balanced",
                          "--teacher-guidance", "1.5"])
    assert a.labels == "balanced" and a.teacher_guidance == 1.5
    assert bench.parse_args(["--methods", "pcm"]).labels is None  # default: the null label
    for bad in (["--labels", "uniform"], ["--teacher-guidance", "-1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--methods", "pcm", *bad])


@pytest.mark.skipif(not (REPO / "assets" / "digits_teacher").is_dir(), reason="digits teacher not shipped")
def test_teacher_guidance_is_cfg_on_the_shipped_teacher():
    """One Euler step from the same noise is linear in the velocity, so the teacher guided with
    w = 2 gives exactly 2·(class sample) − (null-label sample): v_∅ + 2·(v_c − v_∅). Tolerance
    1e-5: float32 rounding of three network evaluations."""
    import torch

    from flowdistill.api import load_run

    bench = _bench()
    run = load_run(REPO / "assets" / "digits_teacher")
    cond = torch.arange(8) % 10
    s_c = run.sample(8, 1, seed=3, cond=cond)
    s_null = run.sample(8, 1, seed=3)
    bench.guide_teacher(run, 2.0)
    s_w = run.sample(8, 1, seed=3, cond=cond)
    torch.testing.assert_close(s_w, 2 * s_c - s_null, rtol=0, atol=1e-5)
    assert (s_w - s_c).abs().max() > 1e-2  # and guidance changed the samples


def test_heun_ref_only_keeps_the_pinned_ratio():
    """--heun-ref-only drops the Euler teacher rows; the ratio is still over the Heun-64 row."""
    bench = _bench()
    assert bench.parse_args(["--methods", "pcm", "--digits", "--heun-ref-only"]).heun_ref_only
    rows = [_row("teacher (Heun)", 128, 0.8), _row("student", 4, 1.0)]
    bench.add_ratios(rows, "teacher", problem_best=True, ref_row=bench.DIGITS_REF)
    assert [r["ratio"] for r in rows] == pytest.approx([1.0, 1.25])
