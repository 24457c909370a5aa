"""Bad input to the CLI (issue 11, item 5) and ``--plugin``.

Every case is one line ``error: ...`` on stderr naming the problem, exit status 2, and nothing
that existed before changed (whole trees are compared byte for byte). The CLI runs in-process
(``flowdistill.cli.main``) except where the installed entry point itself is the point.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from flowdistill.cli import main, parse_args
from flowdistill.distillers import DISTILLERS
from flowdistill.models import MODELS, MLPFlowNet
from tests.helpers import REPO

TINY = [
    "model.name=mlp",
    "model.params.hidden=32",
    "model.params.depth=1",
    "data.name=checkerboard",
    "train.batch_size=64",
    "train.log_every=1",
    "train.lr=1e-3",
]
DIGITS_TEACHER = REPO / "assets" / "digits_teacher"


# -- helpers ------------------------------------------------------------------------------------
def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit status, stdout, stderr); argparse's SystemExit is caught."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(result: tuple[int, str, str], *needles: str) -> str:
    """Assert status 2 and a single ``error:`` line on stderr holding every needle; return the line."""
    rc, out, err = result
    assert rc == 2, (rc, out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (and ``root`` itself): file bytes, ``None`` for a directory."""
    root = Path(root)
    if not root.exists():
        return {}
    if root.is_file():
        return {".": root.read_bytes()}
    snap: dict[str, bytes | None] = {".": None}
    for p in sorted(root.rglob("*")):
        snap[str(p.relative_to(root))] = None if p.is_dir() else p.read_bytes()
    return snap


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
