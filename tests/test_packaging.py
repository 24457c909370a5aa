"""Shipped data: configs/ and assets/ exist once, at the top of the repository, are found through
flowdistill.resources, and ship in the wheel — a non-editable install outside the repository loads
the configs, the digits teacher and the FID feature classifier."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flowdistill import resources
from flowdistill.resources import asset_path, config_path, configs_dir, list_configs
from tests.helpers import REPO

SHIPPED_CONFIGS = ("teacher_checkerboard.yaml", "teacher_digits.yaml", "freeflow_checkerboard.yaml",
                   "freeflow_8gaussians.yaml", "freeflow_spirals.yaml", "freeflow_digits.yaml",
                   "recipes/reflow_checkerboard.yaml", "recipes/reflow_digits.yaml")
SHIPPED_ASSETS = ("digits_classifier.safetensors", "digits_teacher", "checkerboard_teacher")


def _repo_files(folder: str, pattern: str = "*") -> list[str]:
    base = REPO / folder
    return sorted(p.relative_to(base).as_posix() for p in base.rglob(pattern)
                  if p.is_file() and "__pycache__" not in p.parts and p.name != "__init__.py")


def test_configs_and_assets_are_found_through_the_helper():
    assert configs_dir().resolve() == (REPO / "configs").resolve()  # the editable install maps it
    assert list_configs() == _repo_files("configs", "*.yaml")
    for name in SHIPPED_CONFIGS:
        assert config_path(name).is_file() and config_path(name.removesuffix(".yaml")) == config_path(name)
    for name in SHIPPED_ASSETS:
        assert asset_path(name).exists()
    with pytest.raises(FileNotFoundError, match="shipped: .*freeflow_checkerboard.yaml"):
        config_path("no_such_config")
    with pytest.raises(ValueError, match="relative"):
        asset_path("../pyproject.toml")
    # one source: no second copy inside the package, and every reader goes through the helper
    assert not (REPO / "flowdistill" / "configs").exists()
    from flowdistill import demo
    from flowdistill.models.digits_classifier import DEFAULT_WEIGHTS

    assert demo.CONFIG_DIR == configs_dir() and DEFAULT_WEIGHTS == asset_path("digits_classifier.safetensors")
    assert demo.TEACHER_ASSET == resources.assets_dir() / "checkerboard_teacher"
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "flowdistill").rglob("*.py")
                 if p.name != "resources.py" and "__file__" in (text := p.read_text())
                 and ('"assets"' in text or '"configs"' in text)]
    assert not offenders, offenders


def _source_copy(dst: Path) -> Path:
    """What a source distribution holds, copied out of the shared checkout (so the build's build/
    and egg-info land in a temporary directory, not in the working tree)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    for name in ("flowdistill", "configs", "assets"):
        shutil.copytree(REPO / name, dst / name, ignore=ignore)
    return dst


CHECK = """
import sys
import torch
import flowdistill
import flowdistill.resources as r
from flowdistill.config import load_config
from flowdistill.demo import TEACHER_ASSET
from flowdistill.models.digits_classifier import DEFAULT_WEIGHTS, load_digits_classifier
from flowdistill.models.loading import load_model_dir

site = sys.argv[1]
assert flowdistill.__file__.startswith(site), flowdistill.__file__
assert str(r.configs_dir()).startswith(site) and str(DEFAULT_WEIGHTS).startswith(site)
for name in ("teacher_checkerboard", "freeflow_digits"):
    load_config(r.config_path(name), ["out_dir=x"])
teacher = load_model_dir(r.asset_path("digits_teacher"))
x = teacher(torch.randn(2, 1, 8, 8), torch.full((2,), 0.5), cond=torch.tensor([1, 2]))
assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
feats = load_digits_classifier()(torch.zeros(2, 1, 8, 8))
assert (TEACHER_ASSET / "student" / "config.json").is_file()
print("ok", len(r.list_configs()), r.list_assets())
"""


def test_wheel_ships_configs_and_assets_and_installs_outside_the_repo(tmp_path):
    """``pip wheel`` holds every file of configs/ and assets/ under flowdistill/; ``pip install`` of
    it (non-editable, into a venv that sees the system's torch/diffusers) works from another
    directory: configs load, the digits teacher and the FID classifier load and run."""
    (tmp_path / "src").mkdir()
    src = _source_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = dist.glob("flowdistill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("configs", "assets"):
        files = _repo_files(folder)
        assert files and {f"flowdistill/{folder}/{f}" for f in files} <= names, folder
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    r = subprocess.run([str(py), "-c", CHECK, site], capture_output=True, text=True, timeout=300, cwd=outside,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok"), r.stdout
