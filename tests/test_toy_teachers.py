"""The shipped toy teachers (``assets/<problem>_teacher``) are what their configs train, and load.

Nothing is trained here: the assets are made by ``scripts/train_toy_teacher.py`` (minutes each);
these checks take seconds.
"""

import importlib.util

import pytest
import torch

from flowdistill.api import load_run
from flowdistill.config import load_config
from tests.helpers import REPO

PROBLEMS = ("checkerboard", "8gaussians", "spirals")
MAX_BYTES = 5 * 1024 * 1024


def _script():
    """``scripts/train_toy_teacher.py`` as a module (scripts/ is not a package)."""
    path = REPO / "scripts" / "train_toy_teacher.py"
    spec = importlib.util.spec_from_file_location("train_toy_teacher", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _asset(problem: str):
    """The shipped asset directory of ``problem``."""
    return REPO / "assets" / f"{problem}_teacher"


def test_script_covers_the_problems():
    """The builder knows these problems and reads their configs from the top-level configs/."""
    mod = _script()
    assert tuple(mod.PROBLEMS) == PROBLEMS
    for problem in PROBLEMS:
        assert mod.config_file(problem) == REPO / "configs" / f"teacher_{problem}.yaml"
    with pytest.raises(SystemExit):
        mod.main(["--problem", "moons"])


@pytest.mark.parametrize("problem", PROBLEMS)
def test_shipped_teacher_is_what_its_config_trains(problem):
    """The asset's resolved config equals today's configs/teacher_<problem>.yaml (else retrain it)."""
    asset = _asset(problem)
    assert (asset / "config.yaml").is_file(), f"{asset} missing: run scripts/train_toy_teacher.py"
    current = load_config(REPO / "configs" / f"teacher_{problem}.yaml")
    assert current.data.name == problem
    shipped = load_config(asset / "config.yaml")
    for section in ("model", "data", "train", "distiller"):
        assert getattr(shipped, section) == getattr(current, section), (
            f"{section} differs: rerun python scripts/train_toy_teacher.py --problem {problem}")


@pytest.mark.parametrize("problem", PROBLEMS)
def test_shipped_teacher_loads_and_samples(problem):
    """A run directory that ``load_run`` loads; Euler samples are finite, of the data's shape,
    at the data's scale (unit std per axis, loosely); the weights are safetensors under 5 MB."""
    asset = _asset(problem)
    weights = asset / "student" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and weights.stat().st_size < MAX_BYTES
    assert not list(asset.rglob("*.bin")) and not list(asset.rglob("*.pt"))
    run = load_run(asset)
    x = run.sample(256, 4, seed=0)
    assert x.shape == (256, 2) and torch.isfinite(x).all()
    assert 0.5 < float(x.std(dim=0).mean()) < 1.5


@pytest.mark.parametrize("problem", PROBLEMS)
def test_shipped_teacher_readme_describes_these_weights(problem):
    """README.md names the builder and the sha256 of the weights beside it (not a stale copy)."""
    from flowdistill.data.couplings import file_sha256

    asset = _asset(problem)
    text = (asset / "README.md").read_text()
    assert f"scripts/train_toy_teacher.py --problem {problem}" in text
    digest = file_sha256(asset / "student" / "diffusion_pytorch_model.safetensors")
    assert f"sha256 `{digest}`" in text
