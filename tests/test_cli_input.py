"""Bad config input to the CLI (issue 11, item 5): config files that are not YAML or not text, and
flags between ``key=value`` overrides.

Every case is one line ``error: ...`` on stderr naming the problem, exit status 2, and nothing
that existed before changed (whole trees are compared byte for byte). The CLI runs in-process
(``flowdistill.cli.main``). Teachers, output directories and ``--resume``: ``test_cli_runs.py``;
``--plugin``: ``test_cli_plugin.py``.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from flowdistill.cli import parse_args
from tests.helpers import REPO, TINY, one_line_error, run, snapshot


# -- 1, 2: config files that are not YAML or not text ----------------------------------------------
@pytest.mark.parametrize(
    "text,needles",
    [
        ("out_dir: x\ntrain:\n  steps: [1, 2\n", ["line 4", "expected ',' or ']'", "line 3"]),
        ("train:\n\tsteps: 3\n", ["line 2", "cannot start any token"]),
        ("out_dir: x\nout_dir: y\n", ["line 2", "duplicate key"]),
        ("out_dir: a: b\n", ["line 1", "mapping values are not allowed"]),
    ],
)
@pytest.mark.parametrize("command", ["train-teacher", "distill", "couple", "recipe"])
def test_config_not_valid_yaml(capsys, tmp_path, command, text, needles):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    before = snapshot(tmp_path)
    line = one_line_error(
        run(capsys, command, cfg, f"out_dir={tmp_path / 'out'}"),
        f"{'recipe' if command == 'recipe' else 'config'} file {cfg}",
        "is not valid YAML",
        *needles,
    )
    assert "column" in line
    assert snapshot(tmp_path) == before


def _png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plt.imsave(path, np.linspace(0, 1, 64).reshape(8, 8))


@pytest.mark.parametrize(
    "kind,needle",
    [
        ("png", "a PNG image"),
        ("random", "not a text file"),
        ("nul", "NUL byte at offset 3"),
        ("latin1", "is not UTF-8"),
        ("control", "control character 0x07"),
    ],
)
@pytest.mark.parametrize("command", ["train-teacher", "recipe"])
def test_config_not_text(capsys, tmp_path, command, kind, needle):
    cfg = tmp_path / ("teacher.png" if kind == "png" else "cfg.yaml")
    if kind == "png":
        _png(cfg)
    elif kind == "random":
        cfg.write_bytes(random.Random(0).randbytes(512))
    elif kind == "nul":
        cfg.write_bytes(b"a: \x00\x01\x02")
    elif kind == "latin1":
        cfg.write_bytes("out_dir: caf\u00e9\n".encode("latin-1"))
    else:
        cfg.write_bytes(b"out_dir: a\x07b\n")
    before = snapshot(tmp_path)
    what = "recipe" if command == "recipe" else "config"
    one_line_error(run(capsys, command, cfg), f"{what} file {cfg}", "not a text file", needle, "YAML")
    assert snapshot(tmp_path) == before


def test_config_file_edge_cases(capsys, tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "int.yaml").write_text("5\n")
    (tmp_path / "adir.yaml").mkdir()
    (tmp_path / "interp.yaml").write_text("out_dir: ${oops\n")
    before = snapshot(tmp_path)
    one_line_error(run(capsys, "train-teacher", tmp_path / "list.yaml"), "list.yaml", "mapping", "list")
    one_line_error(run(capsys, "train-teacher", tmp_path / "int.yaml"), "int.yaml", "mapping", "int")
    one_line_error(run(capsys, "train-teacher", tmp_path / "adir.yaml"), "adir.yaml", "is a directory")
    one_line_error(run(capsys, "train-teacher", tmp_path / "interp.yaml"), "interp.yaml", "out_dir")
    one_line_error(run(capsys, "train-teacher", tmp_path / "nope.yaml"), "nope.yaml", "does not exist")
    assert snapshot(tmp_path) == before


def test_a_valid_config_file_still_trains(capsys, tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(f"out_dir: {tmp_path / 'out'}\ntrain:\n  steps: 2\n  ckpt_every: 0\n")
    rc, out, err = run(capsys, "train-teacher", cfg, *TINY)
    assert rc == 0, err
    assert (tmp_path / "out" / "student" / "config.json").is_file()


# -- 6: flags between key=value overrides ----------------------------------------------------------
def test_parse_flags_between_overrides():
    a = parse_args(
        ["distill", "CFG.yaml", "a=1", "--resume", "b=2", "--plugin", "m", "c=3", "--plugin", "n.py"]
    )
    assert (a.config, a.overrides, a.resume, a.overwrite, a.plugin) == (
        "CFG.yaml",
        ["a=1", "b=2", "c=3"],
        True,
        False,
        ["m", "n.py"],
    )
    a = parse_args(["train-teacher", "out_dir=x", "--overwrite", "train.steps=3"])
    assert (a.config, a.overrides, a.overwrite) == ("out_dir=x", ["train.steps=3"], True)
    a = parse_args(["recipe", "c.yaml", "x=1", "--no-report", "y=2"])
    assert (a.recipe, a.overrides, a.no_report) == ("c.yaml", ["x=1", "y=2"], True)
    assert parse_args(["sample", "RUN"]).plugin == []


def test_leftover_arguments_are_still_errors(capsys, tmp_path):
    one_line_error(
        run(capsys, "train-teacher", "out_dir=x", "--bogus", "a=1"), "unrecognized arguments", "--bogus"
    )
    one_line_error(run(capsys, "sample", tmp_path, "extra=1"), "unrecognized arguments", "extra=1")
    assert not (REPO / "x").exists()


def test_flags_between_overrides_train_and_resume(capsys, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"out_dir: {out}\n")
    rc, _, err = run(
        capsys, "train-teacher", cfg, *TINY, "--overwrite", "train.steps=2", "train.ckpt_every=1"
    )
    assert rc == 0, err
    rc, _, err = run(capsys, "train-teacher", cfg, *TINY, "--resume", "train.steps=3", "train.ckpt_every=1")
    assert rc == 0, err
    saved = (out / "config.yaml").read_text()
    assert "steps: 3" in saved and "hidden: 32" in saved  # overrides on both sides of the flag
    assert [p.name for p in sorted((out / "checkpoints").iterdir())][-1] == "step-0000003"
