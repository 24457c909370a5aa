"""``flowdistill eval --labels balanced``: sample ``i`` from class ``i mod C`` (the class-conditional
FID protocol of :func:`flowdistill.eval.image_eval.class_labels`), the same draws as ``--labels
0,1,...,C-1``; an unconditional run refuses it in one line."""

from __future__ import annotations

from tests.test_cli_conventions import one_line_error, rows_of, run, toy_run  # noqa: F401  (fixture run)


def test_balanced_labels_are_every_class_in_turn(run, tmp_path):  # noqa: F811
    r = toy_run(tmp_path, num_classes=3)
    code, out, err = run("eval", r, "--nfe", "1", "--n", "90", "--labels", "balanced",
                         "--out", tmp_path / "b")
    assert code == 0, err
    assert "class labels [0, 1, 2]" in out
    code, _, err = run("eval", r, "--nfe", "1", "--n", "90", "--labels", "0,1,2", "--out", tmp_path / "l")
    assert code == 0, err
    code, _, err = run("eval", r, "--nfe", "1", "--n", "90", "--out", tmp_path / "u")
    assert code == 0, err
    assert rows_of(tmp_path / "b") == rows_of(tmp_path / "l") != rows_of(tmp_path / "u")
    one_line_error(run("eval", toy_run(tmp_path, "unc"), "--labels", "balanced", "--out", tmp_path / "x"),
                   "class-conditional")
    one_line_error(run("eval", r, "--labels", "balanc", "--out", tmp_path / "y"), "--labels")
