"""Bad run input to the CLI (issue 11, item 5): a teacher of another architecture, output
directories that cannot be written, and ``--resume`` checks before ``config.yaml`` is rewritten.

Every case is one line ``error: ...`` on stderr naming the problem, exit status 2, and nothing
that existed before changed (whole trees are compared byte for byte). The CLI runs in-process
(``flowdistill.cli.main``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from flowdistill.cli import main
from flowdistill.models import MODELS, MLPFlowNet
from tests.helpers import REPO, TINY, one_line_error, run, snapshot

DIGITS_TEACHER = REPO / "assets" / "digits_teacher"


@contextlib.contextmanager
def read_only(path: Path):
    """Make the directory ``path`` unwritable for this process for the duration of the block.

    Permission bits do not stop root, so as root the directory is made immutable (``chattr +i``,
    which stops root too); where that is not permitted the test is skipped.
    """
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip(
            "running as root (permission bits do not stop root) and chattr is not installed, "
            "so no read-only directory can be made"
        )
    r = subprocess.run([chattr, "+i", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(
            f"running as root (permission bits do not stop root) and `chattr +i` is not "
            f"permitted here ({r.stderr.strip()}), so no read-only directory can be made"
        )
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 4-step checkerboard teacher run with checkpoints at steps 2 and 4."""
    d = tmp_path_factory.mktemp("cli_input") / "run"
    assert main(["train-teacher", f"out_dir={d}", *TINY, "train.steps=4", "train.ckpt_every=2"]) == 0
    return d


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of :func:`tiny_run` that a test may damage."""
    d = tmp_path / "run"
    shutil.copytree(tiny_run, d)
    return d


# -- 3: a teacher of another architecture ---------------------------------------------------------
@pytest.fixture
def unet_teacher(tmp_path) -> Path:
    d = tmp_path / "unet_teacher"
    shutil.copytree(DIGITS_TEACHER, d)
    return d


@pytest.mark.parametrize("model", ["mlp", "dit"])
def test_teacher_of_another_architecture(capsys, tmp_path, unet_teacher, model):
    before = snapshot(tmp_path)
    line = one_line_error(
        run(
            capsys,
            "distill",
            f"out_dir={tmp_path / 'out'}",
            f"teacher={unet_teacher}",
            f"model.name={model}",
            "data.name=digits",
            "data.image_size=8",
            "train.steps=2",
        ),
        f"teacher {unet_teacher}",
        "UNetFlowNet",
        "_class_name",
        "registered as model 'unet'",
        "in_channels=1",
        "sample_size=8",
        "base_channels=32",
        "num_classes=10",
        f"model.name='{model}'",
        MODELS.get(model).__name__,
        "set model.name=unet",
    )
    assert "unexpected keyword" not in line
    assert snapshot(tmp_path) == before  # teacher untouched, no run directory


def test_vector_teacher_for_an_image_student(capsys, tmp_path):
    teacher = tmp_path / "mlp_teacher"
    MLPFlowNet(data_dim=2, hidden=16, depth=1).save_pretrained(str(teacher), safe_serialization=True)
    before = snapshot(tmp_path)
    one_line_error(
        run(
            capsys,
            "distill",
            f"out_dir={tmp_path / 'out'}",
            f"teacher={teacher}",
            "model.name=unet",
            "data.name=digits",
            "data.image_size=8",
            "train.steps=2",
        ),
        "MLPFlowNet",
        "registered as model 'mlp'",
        "data_dim=2",
        "hidden=16",
        "depth=1",
        "model.name='unet'",
        "UNetFlowNet",
        "set model.name=mlp",
    )
    assert snapshot(tmp_path) == before


def test_teacher_sizes_and_paths(capsys, tmp_path, unet_teacher):
    base = [
        f"out_dir={tmp_path / 'out'}",
        "model.name=unet",
        "data.name=digits",
        "data.image_size=8",
        "train.steps=2",
    ]
    (tmp_path / "afile").write_text("x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "in_channels": 3}))
    before = snapshot(tmp_path)
    one_line_error(
        run(capsys, "distill", *base, f"teacher={unet_teacher}", "model.params.base_channels=64"),
        "cannot start from teacher",
        "model.params.base_channels=64 (teacher: 32)",
        "size mismatch",
    )
    one_line_error(
        run(capsys, "distill", *base, f"teacher={foreign}"),
        "UNet2DModel",
        "not a registered flowdistill model",
        "--plugin",
    )
    one_line_error(
        run(capsys, "distill", *base, f"teacher={tmp_path / 'missing'}"), "missing", "does not exist"
    )
    one_line_error(run(capsys, "distill", *base, f"teacher={tmp_path / 'afile'}"), "afile", "is a file")
    assert snapshot(tmp_path) == before


def test_teacher_run_without_student(capsys, tmp_path, run_copy):
    shutil.rmtree(run_copy / "student")
    before = snapshot(tmp_path)
    one_line_error(
        run(capsys, "distill", f"out_dir={tmp_path / 'out'}", f"teacher={run_copy}", "train.steps=2"),
        str(run_copy),
        "without an exported student",
    )
    assert snapshot(tmp_path) == before


# -- 4: output directories that cannot be written -------------------------------------------------
def test_out_dir_is_or_lies_under_a_file(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep me\n")
    before = snapshot(tmp_path)
    args = [*TINY, "train.steps=2"]
    one_line_error(
        run(capsys, "train-teacher", f"out_dir={f / 'run'}", *args),
        f"out_dir {f / 'run'}",
        f"lies under {f}",
        "is a file",
    )
    one_line_error(run(capsys, "train-teacher", f"out_dir={f / 'a' / 'b'}", *args), f"lies under {f}")
    one_line_error(run(capsys, "train-teacher", f"out_dir={f}", *args), f"out_dir {f} is a file")
    one_line_error(run(capsys, "train-teacher", f"out_dir={f}", *args, "--overwrite"), "is a file")
    assert snapshot(tmp_path) == before


def test_other_outputs_under_a_file(capsys, tmp_path, tiny_run):
    f = tmp_path / "afile"
    f.write_text("keep me\n")
    before, run_before = snapshot(tmp_path), snapshot(tiny_run)
    one_line_error(run(capsys, "sample", tiny_run, "--n", "8", "--out", f / "x.png"), "--out", "is a file")
    (tmp_path / "adir.png").mkdir()
    before = snapshot(tmp_path)
    one_line_error(
        run(capsys, "sample", tiny_run, "--n", "8", "--out", tmp_path / "adir.png"), "--out", "is a directory"
    )
    one_line_error(
        run(capsys, "eval", tiny_run, "--n", "8", "--nfe", "1", "--out", f / "ev"),
        f"--out {f / 'ev'} lies under {f}",
    )
    one_line_error(run(capsys, "export", tiny_run, f / "pipe"), f"OUT_DIR {f / 'pipe'} lies under {f}")
    cfg = tmp_path / "couple.yaml"
    cfg.write_text(f"teacher: {tiny_run}\ndistiller:\n  name: reflow\n  couplings: {f / 'pairs'}\n")
    before = snapshot(tmp_path)
    one_line_error(
        run(capsys, "couple", cfg, f"out_dir={tmp_path / 'o'}"), "distiller.couplings", "lies under"
    )
    assert snapshot(tmp_path) == before and snapshot(tiny_run) == run_before


def test_read_only_out_dir(capsys, tmp_path, run_copy):
    args = [f"out_dir={run_copy}", *TINY, "train.steps=4", "train.ckpt_every=2"]
    before = snapshot(tmp_path)
    with read_only(run_copy):
        one_line_error(run(capsys, "train-teacher", *args, "--overwrite"), str(run_copy), "not writable")
        one_line_error(run(capsys, "train-teacher", *args[:-2], "train.steps=6", "--resume"), "not writable")
        one_line_error(
            run(capsys, "train-teacher", f"out_dir={run_copy / 'new'}", *TINY, "train.steps=2"),
            f"out_dir {run_copy / 'new'} cannot be written",
            f"{run_copy} is not writable",
        )
        one_line_error(
            run(capsys, "sample", run_copy, "--n", "8", "--out", run_copy / "s.png"), "not writable"
        )
    assert snapshot(tmp_path) == before  # nothing removed by --overwrite, nothing added


def test_read_only_subdirectory_stops_overwrite_before_removing_anything(capsys, tmp_path, run_copy):
    before = snapshot(tmp_path)
    with read_only(run_copy / "checkpoints"):
        one_line_error(
            run(capsys, "train-teacher", f"out_dir={run_copy}", *TINY, "train.steps=2", "--overwrite"),
            "--overwrite",
            "cannot be replaced",
            str(run_copy / "checkpoints"),
        )
    assert snapshot(tmp_path) == before


# -- 5: --resume reads and checks the checkpoint before config.yaml is rewritten --------------------
def test_resume_corrupt_checkpoint_changes_nothing(capsys, run_copy):
    newest = sorted((run_copy / "checkpoints").iterdir())[-1]
    (newest / "model.safetensors").write_bytes(b"garbage")
    before = snapshot(run_copy)
    one_line_error(
        run(
            capsys,
            "train-teacher",
            f"out_dir={run_copy}",
            *TINY,
            "train.steps=6",
            "train.ckpt_every=2",
            "--resume",
        ),
        "corrupt",
        newest.name,
    )
    assert snapshot(run_copy) == before  # config.yaml keeps steps: 4, metrics.jsonl untouched
    assert "steps: 4" in (run_copy / "config.yaml").read_text()


@pytest.mark.parametrize(
    "change,needle",
    [
        ("model.params.hidden=16", "model.params.hidden"),
        ("train.lr=0.01", "train.lr"),
        ("data.name=spirals", "data.name"),
    ],
)
def test_resume_changed_config_changes_nothing(capsys, run_copy, change, needle):
    before = snapshot(run_copy)
    one_line_error(
        run(
            capsys,
            "train-teacher",
            f"out_dir={run_copy}",
            *TINY,
            "train.steps=6",
            "train.ckpt_every=2",
            change,
            "--resume",
        ),
        "--resume",
        needle,
        "differs from the saved run",
    )
    assert snapshot(run_copy) == before


def test_resume_unreadable_saved_config_changes_nothing(capsys, run_copy):
    (run_copy / "config.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    before = snapshot(run_copy)
    one_line_error(
        run(capsys, "train-teacher", f"out_dir={run_copy}", *TINY, "train.steps=6", "--resume"),
        "saved config",
        str(run_copy / "config.yaml"),
        "not a text file",
    )
    assert snapshot(run_copy) == before


def test_resume_with_more_steps_rewrites_config_after_loading(capsys, run_copy):
    rc, _, err = run(
        capsys,
        "train-teacher",
        f"out_dir={run_copy}",
        *TINY,
        "train.steps=6",
        "train.ckpt_every=2",
        "--resume",
    )
    assert rc == 0, err
    assert "steps: 6" in (run_copy / "config.yaml").read_text()
    assert (run_copy / "checkpoints" / "step-0000006").is_dir()
