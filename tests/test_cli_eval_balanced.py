"""``flowdistill eval --labels balanced``: sample ``i`` from class ``i mod C`` (the class-conditional
FID protocol of :func:`flowdistill.eval.image_eval.class_labels`), the same draws as ``--labels
0,1,...,C-1``; an unconditional run refuses it in one line."""

from __future__ import annotations

import torch

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


def test_balanced_labels_on_an_image_run(run, tmp_path):  # noqa: F811
    """The image sweep (FID on digits features) with ``--labels``: it used to pass ``cond=None`` beside
    the labels and crash; balanced = the explicit list, and differs from the null label."""
    from flowdistill.config import load_config, to_yaml
    from flowdistill.models import build_model
    from flowdistill.runs import export_student

    r = tmp_path / "img"
    tiny = {"sample_size": 8, "patch_size": 2, "hidden": 16, "depth": 1, "heads": 2, "num_classes": 3}
    cfg = load_config(None, [f"out_dir={r}", "model.name=dit", "data.name=digits", "data.image_size=8",
                             "data.conditional=true", *(f"model.params.{k}={v}" for k, v in tiny.items())],
                      default_distiller="flow_matching")
    r.mkdir()
    (r / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(0)
    net = build_model("dit", **tiny)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.3)
    export_student(net, r, {"distiller": "flow_matching", "data": "digits", "steps": 0})
    outs = {}
    for tag, extra in (("b", ["--labels", "balanced"]), ("l", ["--labels", "0,1,2"]), ("u", [])):
        code, _, err = run("eval", r, "--nfe", "1", *extra, "--out", tmp_path / tag)
        assert code == 0, err
        outs[tag] = [row["fid"] for row in rows_of(tmp_path / tag)]
    assert outs["b"] == outs["l"] != outs["u"]
