"""``--plugin`` (issue 11, item 5) and the installed entry point.

A plugin's distiller, model or dataset is named from a config; an import that fails is one line
``error: ...`` on stderr, exit status 2, and nothing that existed before changed. The CLI runs
in-process (``flowdistill.cli.main``) except where the installed entry point itself is the point.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

from flowdistill.cli import parse_args
from flowdistill.distillers import DISTILLERS
from flowdistill.models import MODELS
from tests.helpers import REPO, TINY, one_line_error, run, snapshot


# -- 7: --plugin ---------------------------------------------------------------------------------
@pytest.fixture
def clean_registries(monkeypatch):
    """Registrations and modules that a test's plugins add are dropped afterwards."""
    regs = [DISTILLERS, MODELS]
    with contextlib.suppress(ImportError):
        from flowdistill.data.registry import DATASETS

        regs.append(DATASETS)
    for reg in regs:
        monkeypatch.setattr(reg, "_items", dict(reg._items))
    mods = set(sys.modules)
    yield
    for name in set(sys.modules) - mods:
        if name.startswith("fdplug_"):
            del sys.modules[name]


PLUGIN_DISTILLER = '''
"""A distiller of one's own: flow matching with its loss scaled by a factor of its own config."""
from dataclasses import dataclass

from flowdistill.distillers import register_distiller
from flowdistill.distillers.flow_matching import FlowMatching, FlowMatchingConfig


@dataclass
class ScaledFMConfig(FlowMatchingConfig):
    name: str = "fdplug_scaled_fm"
    loss_scale: float = 1.0


@register_distiller("fdplug_scaled_fm")
class ScaledFM(FlowMatching):
    Config = ScaledFMConfig

    def loss(self, batch, step, group, rng):
        out = super().loss(batch, step, group, rng)
        out["loss"] = out["loss"] * self.cfg.loss_scale
        return out
'''


def test_plugin_distiller(capsys, tmp_path, clean_registries):
    plugin = tmp_path / "fdplug_distiller.py"
    plugin.write_text(PLUGIN_DISTILLER)
    out = tmp_path / "run"
    args = [f"out_dir={out}", *TINY, "train.steps=3", "train.ckpt_every=0", "distiller.name=fdplug_scaled_fm"]
    one_line_error(run(capsys, "distill", *args), "unknown distiller 'fdplug_scaled_fm'", "--plugin MODULE")
    assert not out.exists()
    rc, _, err = run(capsys, "distill", *args, "--plugin", plugin, "distiller.loss_scale=2.5")
    assert rc == 0, err
    saved = (out / "config.yaml").read_text()
    assert "name: fdplug_scaled_fm" in saved and "loss_scale: 2.5" in saved
    assert json.loads((out / "student" / "flowdistill.json").read_text())["distiller"] == "fdplug_scaled_fm"
    # the plugin's own config dataclass types the distiller section
    one_line_error(
        run(
            capsys, "distill", *args, f"out_dir={tmp_path / 'b'}", "--plugin", plugin, "distiller.loss_scal=2"
        ),
        "distiller.loss_scal",
    )
    rc, _, err = run(
        capsys, "sample", out, "--plugin", plugin, "--n", "16", "--out", tmp_path / "s.safetensors"
    )
    assert rc == 0, err
    assert tuple(load_file(str(tmp_path / "s.safetensors"))["samples"].shape) == (16, 2)


PLUGIN_MODEL = '''
"""A network of one's own: a residual MLP velocity field, registered as model "fdplug_resnet"."""
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from flowdistill.models import MODELS


@MODELS.register("fdplug_resnet")
class PluginResNet(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels: int = 2, sample_size: int = 2, width: int = 16, num_classes: int = 0,
                 two_time: bool = False):
        super().__init__()
        self.inp = nn.Linear(in_channels + 1, width)
        self.block = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.out = nn.Linear(width, in_channels)

    def forward(self, x, t, s=None, cond=None):
        h = self.inp(torch.cat([x, t[:, None].to(x.dtype)], dim=1))
        return self.out(h + self.block(h))
'''


def test_plugin_model(capsys, tmp_path, clean_registries):
    plugin = tmp_path / "fdplug_model.py"
    plugin.write_text(PLUGIN_MODEL)
    out = tmp_path / "run"
    args = [
        f"out_dir={out}",
        "model.name=fdplug_resnet",
        "model.params.width=8",
        "train.steps=3",
        "train.batch_size=32",
        "train.ckpt_every=0",
    ]
    one_line_error(run(capsys, "train-teacher", *args), "unknown model 'fdplug_resnet'", "--plugin")
    rc, _, err = run(
        capsys, "train-teacher", "--plugin", plugin, *args, "--plugin", plugin
    )  # twice: imported once
    assert rc == 0, err
    saved = json.loads((out / "student" / "config.json").read_text())
    assert saved["_class_name"] == "PluginResNet" and saved["width"] == 8
    before = snapshot(tmp_path)
    sys.modules.pop("fdplug_model")  # a fresh process: the saved class is unknown without the plugin
    MODELS._items.pop("fdplug_resnet")
    one_line_error(
        run(capsys, "sample", out, "--n", "8", "--out", tmp_path / "s.safetensors"),
        "PluginResNet",
        "not a registered flowdistill model",
    )
    assert snapshot(tmp_path) == before
    rc, _, err = run(
        capsys, "sample", out, "--plugin", plugin, "--n", "8", "--out", tmp_path / "s.safetensors"
    )
    assert rc == 0, err
    assert tuple(load_file(str(tmp_path / "s.safetensors"))["samples"].shape) == (8, 2)


PLUGIN_DATASET = '''
"""A dataset of one's own: points on the unit circle (an exact sampler), as dataset "fdplug_ring"."""
import math

import torch

from flowdistill.data.registry import register_dataset
from flowdistill.data.sources import SamplerSource


class Ring:
    num_classes = 0

    def sample(self, n, generator=None):
        a = 2 * math.pi * torch.rand(n, generator=generator)
        return torch.stack([a.cos(), a.sin()], dim=1), torch.zeros(n, dtype=torch.long)


@register_dataset("fdplug_ring", kind="toy", sample_shape=lambda spec: (2,))
def ring(spec, split):
    return SamplerSource(Ring(), conditional=spec.conditional)
'''


def test_plugin_dataset(capsys, tmp_path, clean_registries):
    registry = pytest.importorskip("flowdistill.data.registry")
    if not hasattr(registry, "register_dataset"):
        pytest.skip("flowdistill.data.registry has no register_dataset yet")
    plugin = tmp_path / "fdplug_dataset.py"
    plugin.write_text(PLUGIN_DATASET)
    out = tmp_path / "run"
    args = [f"out_dir={out}", *TINY, "data.name=fdplug_ring", "train.steps=3", "train.ckpt_every=0"]
    one_line_error(run(capsys, "train-teacher", *args), "fdplug_ring", "--plugin")
    assert not out.exists()
    rc, _, err = run(capsys, "train-teacher", *args, "--plugin", plugin)
    assert rc == 0, err
    assert "name: fdplug_ring" in (out / "config.yaml").read_text()


def test_plugin_by_module_name(capsys, tmp_path, clean_registries, monkeypatch):
    pkg = tmp_path / "fdplug_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import methods  # noqa: F401\n")
    (pkg / "methods.py").write_text(PLUGIN_DISTILLER)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    rc, _, err = run(
        capsys,
        "distill",
        f"out_dir={out}",
        *TINY,
        "train.steps=2",
        "train.ckpt_every=0",
        "--plugin",
        "fdplug_pkg",
        "distiller.name=fdplug_scaled_fm",
    )
    assert rc == 0, err
    assert "fdplug_scaled_fm" in DISTILLERS


def test_plugin_package_directory(capsys, tmp_path, clean_registries):
    pkg = tmp_path / "fdplug_dirpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import methods  # noqa: F401\n")
    (pkg / "methods.py").write_text(PLUGIN_DISTILLER)
    rc, _, err = run(
        capsys,
        "distill",
        f"out_dir={tmp_path / 'run'}",
        *TINY,
        "train.steps=2",
        "train.ckpt_every=0",
        "--plugin",
        pkg,
        "distiller.name=fdplug_scaled_fm",
    )
    assert rc == 0, err


def test_plugin_import_failures(capsys, tmp_path, clean_registries):
    (tmp_path / "fdplug_boom.py").write_text("x = 1\nraise RuntimeError('boom at import')\n")
    (tmp_path / "fdplug_syntax.py").write_text("def broken(:\n    pass\n")
    (tmp_path / "fdplug_clash.py").write_text(
        "from flowdistill.distillers import register_distiller\n"
        "from flowdistill.distillers.flow_matching import FlowMatching\n"
        "register_distiller('flow_matching')(type('Again', (FlowMatching,), {}))\n"
    )
    (tmp_path / "fdplug_dep.py").write_text("import fdplug_not_installed_anywhere\n")
    (tmp_path / "json.py").write_text("X = 1\n")
    (tmp_path / "notes.txt").write_text("not python\n")
    before = snapshot(tmp_path)
    base = ["train-teacher", f"out_dir={tmp_path / 'run'}", *TINY, "train.steps=2"]
    one_line_error(
        run(capsys, *base, "--plugin", tmp_path / "fdplug_boom.py"),
        f"--plugin {tmp_path / 'fdplug_boom.py'}",
        "importing it failed",
        "RuntimeError: boom at import",
    )
    one_line_error(
        run(capsys, *base, "--plugin", tmp_path / "fdplug_syntax.py"),
        "fdplug_syntax.py",
        "SyntaxError",
        "line 1",
    )
    one_line_error(
        run(capsys, *base, "--plugin", tmp_path / "fdplug_clash.py"),
        "fdplug_clash.py",
        "ValueError",
        "'flow_matching' is already registered",
    )
    one_line_error(
        run(capsys, *base, "--plugin", tmp_path / "fdplug_dep.py"),
        "fdplug_dep.py",
        "ModuleNotFoundError",
        "fdplug_not_installed_anywhere",
    )
    one_line_error(
        run(capsys, *base, "--plugin", "fdplug_no_such_module"),
        "--plugin fdplug_no_such_module",
        "ModuleNotFoundError",
        "sys.path",
        "path",
    )
    one_line_error(run(capsys, *base, "--plugin", tmp_path / "missing.py"), "missing.py", "no such file")
    one_line_error(run(capsys, *base, "--plugin", tmp_path / "json.py"), "module name 'json' is taken")
    one_line_error(run(capsys, *base, "--plugin", tmp_path / "notes.txt"), "notes.txt", "not a Python file")
    assert "fdplug_boom" not in sys.modules  # a failed import leaves no half-made module behind
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "command", ["train-teacher", "distill", "couple", "recipe", "sample", "eval", "export", "demo"]
)
def test_every_subcommand_takes_plugin(command):
    argv = {"sample": ["R"], "eval": ["R"], "export": ["R", "O"], "recipe": ["c.yaml"]}.get(command, [])
    assert parse_args([command, *argv, "--plugin", "a", "--plugin", "b.py"]).plugin == ["a", "b.py"]


def test_installed_entry_point(tmp_path):
    """The console script: a --plugin module found through PYTHONPATH, and exit status 2."""
    exe = shutil.which("flowdistill")
    cmd = [exe] if exe else [sys.executable, "-m", "flowdistill.cli"]
    (tmp_path / "fdplug_entry.py").write_text("raise ImportError('needs a GPU library')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [*cmd, "sample", str(tmp_path), "--plugin", "fdplug_entry"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines == ["error: --plugin fdplug_entry: importing it failed: ImportError: needs a GPU library"], (
        lines
    )
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        textwrap.dedent("""\
        out_dir: x
        train: {steps: 3
        """)
    )
    r = subprocess.run(
        [*cmd, "train-teacher", str(cfg)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"config file {cfg} is not valid YAML: line 3" in r.stderr
