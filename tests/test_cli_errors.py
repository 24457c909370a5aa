"""Bad input: a one-line error naming the problem, exit status 2, no traceback, nothing overwritten."""

import pytest

from tests.helpers import TINY_TEACHER, cli


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


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
def test_bad_config(tmp_path, override, needles):
    r = cli("train-teacher", f"out_dir={tmp_path / 'run'}", *TINY_TEACHER, "train.steps=2", override)
    _one_line_error(r, *needles)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_existing_run_is_not_overwritten(tmp_path):
    args = [f"out_dir={tmp_path / 'run'}", *TINY_TEACHER, "train.steps=3", "train.ckpt_every=3"]
    assert cli("train-teacher", *args).returncode == 0
    before = (tmp_path / "run" / "student" / "diffusion_pytorch_model.safetensors").read_bytes()
    _one_line_error(cli("train-teacher", *args), "already holds a run", "--overwrite")
    after = (tmp_path / "run" / "student" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert before == after
    assert cli("train-teacher", *args, "--overwrite").returncode == 0


def test_missing_and_corrupt_checkpoints(tmp_path):
    _one_line_error(cli("sample", str(tmp_path / "nothing")), "config.yaml missing")
    _one_line_error(cli("train-teacher", f"out_dir={tmp_path / 'none'}", *TINY_TEACHER, "--resume"),
                    "no run to resume")
    args = [f"out_dir={tmp_path / 'run'}", *TINY_TEACHER, "train.steps=4", "train.ckpt_every=2"]
    assert cli("train-teacher", *args).returncode == 0
    # a value the solver cannot take (Heun spends 2 evaluations per step)
    _one_line_error(cli("eval", str(tmp_path / "run"), "--nfe", "3", "--solver", "heun", "--n", "64"),
                    "heun", "multiple")
    ck = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    (ck / "model.safetensors").write_bytes(b"garbage")
    _one_line_error(cli("train-teacher", *args[:-2], "train.steps=6", "train.ckpt_every=2", "--resume"),
                    "corrupt", ck.name)


def test_bad_sample_arguments(tmp_path):
    _one_line_error(cli("eval", str(tmp_path), "--nfe", "1,x"), "--nfe")
    _one_line_error(cli("sample", str(tmp_path), "--nfe", "0"), "positive")


def test_missing_config_file(tmp_path):
    _one_line_error(cli("train-teacher", str(tmp_path / "nope.yaml")), "does not exist")
