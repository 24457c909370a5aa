"""Bad input: a one-line error naming the problem, exit status 2, no traceback, nothing overwritten.

Most cases call ``flowdistill.cli.main`` in process (an interpreter start-up costs ~5 s here); one
test runs ``python -m flowdistill.cli`` as a subprocess, where the exit status and stderr are the
process's own (``tests/test_cli_input.py::test_installed_entry_point`` does the same for the
installed ``flowdistill`` console script).
"""

import pytest

from tests.helpers import TINY_TEACHER, cli, main_in_process


def _one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit status 2 and exactly one non-blank stderr line, ``error: ...``, holding every needle."""
    assert code == 2, (code, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def run(capsys, monkeypatch):
    """``run(*args) -> (status, stdout, stderr)`` of ``flowdistill.cli.main`` in this process."""
    monkeypatch.delenv("FLOWDISTILL_TRACEBACK", raising=False)  # else ValueErrors re-raise
    return lambda *args: main_in_process(capsys, *args)


def _expect_error(run, *args: str, needles=()) -> None:
    """``run(*args)`` fails with the one-line error holding ``needles``."""
    code, _, err = run(*args)
    _one_line_error(code, err, *needles)


@pytest.mark.parametrize("override,needles", [
    ("train.stepz=3", ["train.stepz"]),
    ("train.steps=abc", ["train.steps"]),
    ("train.steps=0", ["train.steps", "positive"]),
    ("train.batch_size=-4", ["batch_size", "positive"]),
    ("data.name=nope", ["nope", "checkerboard"]),
    ("distiller.time_sampler.name=nope", ["nope", "u_shaped"]),
    ("distiller.sample_solver=nope", ["nope", "rk4"]),
    ("distiller.name=nope", ["nope", "flow_matching"]),
    ("model.name=nope", ["nope", "mlp"]),
    ("model.params.bogus=1", ["bogus"]),
])
def test_bad_config(tmp_path, run, override, needles):
    args = [f"out_dir={tmp_path / 'run'}", *TINY_TEACHER, "train.steps=2", override]
    _expect_error(run, "train-teacher", *args, needles=needles)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_existing_run_is_not_overwritten(tmp_path, run):
    args = [f"out_dir={tmp_path / 'run'}", *TINY_TEACHER, "train.steps=3", "train.ckpt_every=3"]
    assert run("train-teacher", *args)[0] == 0
    weights = tmp_path / "run" / "student" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    _expect_error(run, "train-teacher", *args, needles=("already holds a run", "--overwrite"))
    assert weights.read_bytes() == before
    assert run("train-teacher", *args, "--overwrite")[0] == 0


def test_missing_and_corrupt_checkpoints(tmp_path, run):
    _expect_error(run, "sample", str(tmp_path / "nothing"), needles=("config.yaml missing",))
    _expect_error(run, "train-teacher", f"out_dir={tmp_path / 'none'}", *TINY_TEACHER, "--resume",
                  needles=("no run to resume",))
    args = [f"out_dir={tmp_path / 'run'}", *TINY_TEACHER, "train.steps=4", "train.ckpt_every=2"]
    assert run("train-teacher", *args)[0] == 0
    # a value the solver cannot take (Heun spends 2 evaluations per step)
    _expect_error(run, "eval", str(tmp_path / "run"), "--nfe", "3", "--solver", "heun", "--n", "64",
                  needles=("heun", "multiple"))
    ck = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    (ck / "model.safetensors").write_bytes(b"garbage")
    _expect_error(run, "train-teacher", *args[:-2], "train.steps=6", "train.ckpt_every=2", "--resume",
                  needles=("corrupt", ck.name))


def test_bad_sample_arguments(tmp_path, run):
    _expect_error(run, "eval", str(tmp_path), "--nfe", "1,x", needles=("--nfe",))
    _expect_error(run, "sample", str(tmp_path), "--nfe", "0", needles=("positive",))


def test_missing_config_file(tmp_path, run):
    _expect_error(run, "train-teacher", str(tmp_path / "nope.yaml"), needles=("does not exist",))


def test_module_entry_point_exits_2_with_one_line(tmp_path):
    """``python -m flowdistill.cli``: a bad config key is status 2 and one stderr line, as a process."""
    r = cli("train-teacher", f"out_dir={tmp_path / 'run'}", *TINY_TEACHER, "train.stepz=3")
    _one_line_error(r.returncode, r.stderr, "train.stepz")
    assert not (tmp_path / "run").exists()
