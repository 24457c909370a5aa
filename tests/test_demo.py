"""``flowdistill demo`` (the README's default job) runs end to end and writes what it promises."""

import pytest

from flowdistill import demo
from tests.helpers import cli

OUTPUTS = ("demo.md", "demo.json", "demo_samples.png", "demo_sw2_vs_nfe.png")


def _check_outputs(out):
    """The table names both models, the plots exist, the student is exported."""
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    table = (out / "demo.md").read_text()
    assert "teacher (Euler)" in table and "FreeFlow student" in table
    assert (out / "student" / "student" / "config.json").is_file()


def test_demo_quick_runs_end_to_end(tmp_path):
    """The command itself, distilling the shipped teacher (no teacher is trained)."""
    if demo._shipped_teacher() is None:
        pytest.skip("assets/checkerboard_teacher is not in this checkout")
    r = cli("demo", "--quick", "--out", str(tmp_path / "demo"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "demo"
    _check_outputs(out)
    assert "using the shipped checkerboard teacher" in r.stdout
    assert not (out / "teacher").exists()
    student_cfg = (out / "student" / "config.yaml").read_text()
    assert str(demo.TEACHER_ASSET) in student_cfg  # distilled from the asset


def test_demo_quick_trains_its_teacher_when_asked_or_missing(tmp_path, monkeypatch, capsys):
    """``train_teacher=True``, and a missing asset, train the teacher into OUT/teacher first."""
    demo.run_demo(tmp_path / "asked", quick=True, train_teacher=True)
    assert "training the checkerboard teacher (30 steps)" in capsys.readouterr().out
    _check_outputs(tmp_path / "asked")
    assert (tmp_path / "asked" / "teacher" / "student" / "config.json").is_file()

    monkeypatch.setattr(demo, "TEACHER_ASSET", tmp_path / "no_such_asset")
    demo.run_demo(tmp_path / "missing", quick=True)
    assert f"no shipped teacher at {tmp_path / 'no_such_asset'}" in capsys.readouterr().out
    assert (tmp_path / "missing" / "teacher" / "student" / "config.json").is_file()


def test_demo_threads_follow_idle_cpus(monkeypatch):
    """Busy machine: fewer intra-op threads (down to 1); quiet: torch's count; OMP_NUM_THREADS wins."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(demo, "_cpus", lambda: 8)
    monkeypatch.setattr(demo.torch, "get_num_threads", lambda: 8)
    for load, want in ((0.2, 8), (3.0, 5), (7.6, 1), (40.0, 1)):
        monkeypatch.setattr(demo.os, "getloadavg", lambda load=load: (load, load, load))
        assert demo._demo_threads() == want, load
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert demo._demo_threads() == 8  # the user's setting (torch already applied it) is kept


def test_shipped_teacher_is_what_its_config_trains():
    """The asset's resolved config equals today's teacher_checkerboard.yaml (else retrain the asset)."""
    from flowdistill.config import load_config

    if demo._shipped_teacher() is None:
        pytest.skip("assets/checkerboard_teacher is not in this checkout")
    shipped = load_config(demo.TEACHER_ASSET / "config.yaml")
    current = load_config(demo.CONFIG_DIR / "teacher_checkerboard.yaml")
    for section in ("model", "data", "train", "distiller"):
        assert getattr(shipped, section) == getattr(current, section), (
            f"{section} differs: rerun scripts/train_toy_teacher.py --problem checkerboard")


def test_cli_demo_takes_train_teacher_flag():
    from flowdistill.cli import parse_args

    assert parse_args(["demo", "--quick", "--train-teacher"]).train_teacher is True
    assert parse_args(["demo"]).train_teacher is False
