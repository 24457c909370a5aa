"""The command line as users of diffusers / accelerate / hydra-style tools expect it (issue 12.5):
``config show``, ``--version``, help with defaults and choices, ``eval`` reading the run's ``eval:``
section (skipping NFEs a solver cannot spend), ``--inception-weights``, class labels, ``sample --n N
--out DIR``, runs *and* saved model directories (``assets/digits_teacher``), one "run written" line.

Everything runs in-process (``flowdistill.cli.main``) on tiny nets built without training (random
weights, exported as a run would be), or on the shipped digits teacher at NFE 1.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from flowdistill.cli import DESCRIPTION, build_parser
from flowdistill.config import load_config, to_yaml
from flowdistill.models import build_model
from flowdistill.runs import export_student
from tests.helpers import REPO, main_in_process

DIGITS_TEACHER = REPO / "assets" / "digits_teacher"
TINY = {"data_dim": 2, "hidden": 16, "depth": 1, "time_embed_dim": 8}


@pytest.fixture
def run(capsys, monkeypatch):
    """``run(*args) -> (status, stdout, stderr)`` of ``flowdistill.cli.main`` in this process."""
    monkeypatch.delenv("FLOWDISTILL_TRACEBACK", raising=False)
    return lambda *args: main_in_process(capsys, *(str(a) for a in args))


def one_line_error(result: tuple[int, str, str], *needles: str) -> str:
    """Status 2 and one ``error:`` line on stderr holding every needle; returns the line."""
    code, out, err = result
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def toy_run(root: Path, name: str = "run", num_classes: int = 0, over: tuple[str, ...] = (),
            distiller: str = "flow_matching") -> Path:
    """A finished-looking run on the checkerboard: ``config.yaml`` + an exported student with
    random (non-zero) weights, so class labels change the samples."""
    run_dir = root / name
    cfg = load_config(None, [f"out_dir={run_dir}", "model.name=mlp", "data.name=checkerboard",
                             *(f"model.params.{k}={v}" for k, v in TINY.items()),
                             f"model.params.num_classes={num_classes}", *over], default_distiller=distiller)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(0)
    net = build_model("mlp", **TINY, num_classes=num_classes, two_time=distiller == "freeflow")
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    export_student(net, run_dir, {"distiller": distiller, "data": "checkerboard", "steps": 0})
    return run_dir


def rows_of(out_dir: Path, stem: str = "sweep") -> list[dict]:
    """The rows an eval wrote to ``OUT/STEM.json``."""
    return json.loads((out_dir / f"{stem}.json").read_text())


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG that decodes."""
    with Image.open(path) as im:
        im.load()
        return im.size


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- 1: config show -------------------------------------------------------------------------------
def test_config_show_prints_file_overrides_and_every_default(run, tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("out_dir: runs/x\ndata: {name: spirals}\n")
    code, out, err = run("config", "show", cfg, "train.steps=7", "model.params.hidden=8")
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert shown["out_dir"] == "runs/x" and shown["data"]["name"] == "spirals"  # the file
    assert shown["train"]["steps"] == 7 and shown["model"]["params"] == {"hidden": 8}  # the overrides
    defaults = yaml.safe_load(to_yaml(load_config(None, ["out_dir=runs/x"])))
    assert shown["train"]["batch_size"] == defaults["train"]["batch_size"]  # and every default
    assert shown["eval"] == defaults["eval"] and shown["distiller"] == defaults["distiller"]
    assert shown["distiller"]["name"] == "flow_matching"  # the default when the file names none
    assert out == to_yaml(load_config(cfg, ["train.steps=7", "model.params.hidden=8"]))


def test_config_show_takes_the_distiller_the_file_or_an_override_names(run, tmp_path):
    cfg = tmp_path / "ff.yaml"
    cfg.write_text("out_dir: runs/ff\ndistiller: {name: freeflow, correction_warmup: 9}\n")
    code, out, err = run("config", "show", cfg)
    assert code == 0, err
    dist = yaml.safe_load(out)["distiller"]
    assert dist["name"] == "freeflow" and dist["correction_warmup"] == 9 and "shortcut_weight" in dist
    code, out, err = run("config", "show", "distiller.name=reflow", "out_dir=o")  # no file at all
    assert code == 0, err
    assert yaml.safe_load(out)["distiller"]["name"] == "reflow"


def test_config_show_marks_a_missing_out_dir_and_refuses_unknown_keys(run, tmp_path):
    code, out, err = run("config", "show", "train.steps=3")
    assert code == 0, err
    assert out.splitlines()[0].startswith("out_dir: ???")
    assert yaml.safe_load(out)["out_dir"] == "???"  # omegaconf's "missing", still valid YAML
    one_line_error(run("config", "show", "train.stepz=3"), "train.stepz")
    one_line_error(run("config", "show", "distiller.name=nope"), "nope", "flow_matching")
    one_line_error(run("config", "show", tmp_path / "missing.yaml"), "does not exist")
    one_line_error(run("config"), "required")


PLUGIN = '''
from dataclasses import dataclass

from flowdistill.distillers import register_distiller
from flowdistill.distillers.flow_matching import FlowMatching, FlowMatchingConfig


@dataclass
class ShowConfig(FlowMatchingConfig):
    name: str = "fdplug_cfgshow"
    own_knob: float = 0.25


@register_distiller("fdplug_cfgshow")
class Show(FlowMatching):
    Config = ShowConfig
'''


@pytest.fixture
def clean_distillers(monkeypatch):
    """Distillers and modules a test's plugin adds are dropped afterwards."""
    from flowdistill.distillers import DISTILLERS

    monkeypatch.setattr(DISTILLERS, "_items", dict(DISTILLERS._items))
    yield
    sys.modules.pop("fdplug_cfgshow", None)


def test_config_show_with_a_plugin(run, tmp_path, clean_distillers):
    plugin = tmp_path / "fdplug_cfgshow.py"
    plugin.write_text(PLUGIN)
    one_line_error(run("config", "show", "distiller.name=fdplug_cfgshow"), "fdplug_cfgshow", "--plugin")
    code, out, err = run("config", "show", "--plugin", plugin, "distiller.name=fdplug_cfgshow")
    assert code == 0, err
    assert yaml.safe_load(out)["distiller"]["own_knob"] == 0.25


# -- 2: --version ---------------------------------------------------------------------------------
def test_version(run, monkeypatch):
    from importlib.metadata import version

    code, out, _ = run("--version")
    assert code == 0 and out.strip() == f"flowdistill {version('flowdistill')}"
    # without installed metadata: flowdistill.__version__
    import importlib.metadata

    import flowdistill
    from flowdistill.cli import package_version

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    monkeypatch.setattr(flowdistill, "__version__", "9.9.9", raising=False)
    assert package_version() == "9.9.9"


# -- 3: help ---------------------------------------------------------------------------------------
def _subparsers(parser):
    """``{name: parser}`` of every sub-command, nested ones as ``"config show"``."""
    import argparse

    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                found[name] = sp
                found.update({f"{name} {k}": v for k, v in _subparsers(sp).items()})
    return found


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    subs = _subparsers(parser)
    assert {"train-teacher", "distill", "config show", "couple", "recipe", "sample", "eval", "export",
            "demo"} <= set(subs)
    for name, sp in subs.items():
        text = sp.format_help()
        for action in sp._actions:
            if action.dest in ("help", "command", "config_command") or not action.option_strings \
                    and action.dest in ("overrides",):
                continue
            assert action.help, (name, action.dest)
            d = action.default
            if action.option_strings and d not in (None, False, []):
                assert f"(default: {d})" in " ".join(text.split()), (name, action.dest, d)
    sample = " ".join(subs["sample"].format_help().split())
    assert "--nfe NFE network evaluations per sample (default: 1)" in sample
    assert "default: 64 for images, 2000 for 2-D data" in sample
    for solver in ("euler", "heun", "midpoint", "rk4", "dopri5"):  # the registered solvers
        assert solver in sample
    ev = " ".join(subs["eval"].format_help().split())
    for flag in ("eval.nfe", "eval.n_samples", "eval.seed", "eval.solver"):
        assert f"(default: {flag})" in ev
    assert "--inception-weights PATH" in ev and "--class N" in ev and "--labels A,B,..." in ev


def test_top_level_help_is_prose_and_lists_the_commands(run):
    code, out, _ = run("--help")
    assert code == 0
    flat = " ".join(out.split())
    assert DESCRIPTION in flat and "distils a slow flow-matching or diffusion teacher" in flat
    import flowdistill.cli

    assert flowdistill.cli.__doc__.splitlines()[0] not in flat  # not the module docstring's first line
    for cmd in ("train-teacher", "distill", "config", "sample", "eval", "export", "recipe", "demo"):
        assert cmd in out


def test_solver_choices_are_checked(run, tmp_path):
    one_line_error(run("sample", tmp_path, "--solver", "bogus"), "invalid choice", "euler", "heun")


# -- 4: eval reads the run's eval: section; skipped NFEs ------------------------------------------
def test_eval_takes_nfe_n_and_seed_from_the_runs_eval_section(run, tmp_path):
    r = toy_run(tmp_path, over=("eval.nfe=[3]", "eval.n_samples=200", "eval.seed=5"))
    code, out, err = run("eval", r)
    assert code == 0, err
    rows = rows_of(r / "eval")
    assert [row["nfe"] for row in rows] == [3] and rows[0]["n"] == 200
    assert "| 3 |" in out
    # the flags win over the section
    code, _, err = run("eval", r, "--nfe", "1,2", "--n", "100", "--out", tmp_path / "e2")
    assert code == 0, err
    rows = rows_of(tmp_path / "e2")
    assert [row["nfe"] for row in rows] == [1, 2] and {row["n"] for row in rows} == {100}
    # the section's seed is used: the same sweep with --seed 5 gives the same numbers, another seed not
    run("eval", r, "--out", tmp_path / "s5", "--seed", "5")
    run("eval", r, "--out", tmp_path / "s6", "--seed", "6")
    assert rows_of(tmp_path / "s5") == rows_of(r / "eval") != rows_of(tmp_path / "s6")


def test_eval_skips_an_nfe_the_solver_cannot_spend_with_a_note(run, tmp_path):
    r = toy_run(tmp_path, over=("eval.nfe=[2,3,4]", "eval.n_samples=100", "eval.solver=heun"))
    code, out, err = run("eval", r)
    assert code == 0, err
    assert [row["nfe"] for row in rows_of(r / "eval")] == [2, 4]
    assert "NFE 3 skipped: heun uses 2 evaluations per step" in out
    assert "NFE 3 skipped" in (r / "eval" / "sweep.md").read_text()
    # the section's solver is what samples: heun at NFE 2 is one step, euler at 2 is two
    run("eval", r, "--nfe", "2", "--solver", "euler", "--out", tmp_path / "eu")
    assert rows_of(tmp_path / "eu")[0]["sw2"] != rows_of(r / "eval")[0]["sw2"]
    # every NFE skipped: one line naming the solver, nothing written
    one_line_error(run("eval", r, "--nfe", "1,3", "--out", tmp_path / "none"), "heun", "NFE 1")
    assert not (tmp_path / "none").exists()
    # a method without a solver option refuses an explicit --solver before sampling
    ff = toy_run(tmp_path, "ff", distiller="freeflow")
    one_line_error(run("eval", ff, "--solver", "heun", "--out", tmp_path / "ffe"), "takes no option 'solver'")


# -- 5: class labels; --inception-weights --------------------------------------------------------
def test_class_labels_reach_the_sampler(run, tmp_path):
    r = toy_run(tmp_path, num_classes=3)

    def draw(*flags: str) -> torch.Tensor:
        out = tmp_path / f"s{len(list(tmp_path.glob('s*.safetensors')))}.safetensors"
        code, _, err = run("sample", r, "--n", "64", "--nfe", "2", "--out", out, *flags)
        assert code == 0, err
        return load_file(str(out))["samples"]

    c0, c2, c0_again, mixed, plain = (draw("--class", "0"), draw("--class", "2"), draw("--class", "0"),
                                      draw("--labels", "0,2"), draw())
    assert torch.equal(c0, c0_again) and not torch.allclose(c0, c2) and not torch.allclose(c0, plain)
    torch.testing.assert_close(mixed[0::2], c0[0::2])  # labels in turn over the samples
    torch.testing.assert_close(mixed[1::2], c2[1::2])
    # eval samples with the labels too
    for k in (0, 2):
        code, out, err = run("eval", r, "--nfe", "1", "--n", "100", "--class", str(k),
                             "--out", tmp_path / f"e{k}")
        assert code == 0, err
        assert f"class labels [{k}]" in out
    assert rows_of(tmp_path / "e0")[0]["sw2"] != rows_of(tmp_path / "e2")[0]["sw2"]


def test_bad_class_labels_are_one_line_errors(run, tmp_path):
    uncond, cond = toy_run(tmp_path, "u"), toy_run(tmp_path, "c", num_classes=3)
    one_line_error(run("sample", uncond, "--class", "0", "--out", tmp_path / "x.png"), "unconditional")
    one_line_error(run("eval", uncond, "--labels", "0,1", "--out", tmp_path / "e"), "unconditional")
    one_line_error(run("sample", cond, "--class", "3", "--out", tmp_path / "x.png"),
                   "out of range", "3 classes")
    one_line_error(run("eval", cond, "--labels", "1,7", "--out", tmp_path / "e"), "class label 7")
    one_line_error(run("sample", cond, "--class", "-1"), "non-negative")
    one_line_error(run("sample", cond, "--class", "0", "--labels", "1"), "not allowed with")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "e").exists()


def test_inception_weights_reach_the_fid_code(run, tmp_path, monkeypatch):
    """An image dataset scored with Inception features: the weights path goes to compute_fid; a
    missing file is a one-line error before anything is sampled."""
    import flowdistill.eval.fid as fid
    from flowdistill.api import LoadedRun
    from flowdistill.data.registry import DATASETS, DatasetEntry, ReferenceImages

    g = torch.Generator().manual_seed(0)
    images = torch.rand(24, 1, 8, 8, generator=g) * 2 - 1
    ref = ReferenceImages(images[:12], images[12:], "incep-test", "inception")
    entry = DatasetEntry("zz_cli_incep", lambda spec, split: None, "image", lambda spec: (1, 8, 8),
                         lambda spec, n: ref, "inception")
    monkeypatch.setitem(DATASETS._items, "zz_cli_incep", entry)
    model = tmp_path / "teacher"
    shutil.copytree(DIGITS_TEACHER, model)
    cfg = (model / "train_config.yaml").read_text().replace("name: digits", "name: zz_cli_incep")
    (model / "train_config.yaml").write_text(cfg)
    seen = []

    def fake_fid(samples, reference, **kw):
        seen.append(kw)
        return {"fid": 1.0, "kid_mean": 0.0, "kid_std": 0.0, "precision": 1.0, "recall": 1.0,
                "n": len(samples), "n_ref": len(reference)}

    monkeypatch.setattr(fid, "compute_fid", fake_fid)
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not read by the stub")
    code, _, err = run("eval", model, "--nfe", "1", "--n", "12", "--inception-weights", weights,
                       "--out", tmp_path / "ev")
    assert code == 0, err
    assert seen and all(Path(kw["inception_weights"]) == weights for kw in seen)
    assert all(kw["feature_extractor"] == "inception" for kw in seen)
    monkeypatch.setattr(LoadedRun, "sample", lambda *a, **k: pytest.fail("sampled before the check"))
    one_line_error(run("eval", model, "--nfe", "1", "--inception-weights", tmp_path / "nope.pth",
                       "--out", tmp_path / "ev2"), "nope.pth", "not found")


def test_inception_weights_on_a_toy_run_are_noted_not_silently_dropped(run, tmp_path):
    r = toy_run(tmp_path, over=("eval.nfe=[1]", "eval.n_samples=100"))
    w = tmp_path / "w.pth"
    w.write_bytes(b"x")
    code, out, err = run("eval", r, "--inception-weights", w)
    assert code == 0, err
    assert "--inception-weights not used" in out


# -- 6: sample --n N --out ... --------------------------------------------------------------------
def test_sample_n_to_a_directory_writes_one_png_per_sample_and_the_grid(run, tmp_path):
    out = tmp_path / "new" / "samples"  # does not exist yet, no suffix
    code, stdout, err = run("sample", DIGITS_TEACHER, "--n", "7", "--class", "3", "--out", out)
    assert code == 0, err
    pngs = sorted(out.glob("sample_*.png"))
    assert len(pngs) == 7 and all(png_size(p) == (8, 8) for p in pngs)  # each at its own resolution
    assert (out / "grid.png").is_file() and "7 samples" in stdout
    assert len({p.read_bytes() for p in pngs}) == 7  # seven different images
    # again into the now existing directory, fewer samples: no stale ones left behind
    (out / "keep.txt").write_text("mine")
    code, _, err = run("sample", DIGITS_TEACHER, "--n", "3", "--out", out)
    assert code == 0, err
    assert len(list(out.glob("sample_*.png"))) == 3 and (out / "keep.txt").read_text() == "mine"


def test_sample_png_grid_holds_all_n_images(run, tmp_path):
    code, _, err = run("sample", DIGITS_TEACHER, "--n", "70", "--out", tmp_path / "g.png")
    assert code == 0, err
    # 70 images: 9 per row, 8 rows of 8x8 pixels with 1-pixel gaps, drawn 4x (64 would be 8x8)
    assert png_size(tmp_path / "g.png") == ((9 * 9 + 1) * 4, (8 * 9 + 1) * 4)


def test_sample_toy_to_a_directory_writes_tensor_and_scatter(run, tmp_path):
    r = toy_run(tmp_path)
    code, _, err = run("sample", r, "--n", "50", "--out", tmp_path / "pts")
    assert code == 0, err
    assert tuple(load_file(str(tmp_path / "pts" / "samples.safetensors"))["samples"].shape) == (50, 2)
    assert png_size(tmp_path / "pts" / "scatter.png")[0] > 0


def test_a_bad_out_extension_fails_before_sampling(run, tmp_path, monkeypatch):
    from flowdistill.api import LoadedRun

    r = toy_run(tmp_path)
    monkeypatch.setattr(LoadedRun, "sample", lambda *a, **k: pytest.fail("sampled"))
    one_line_error(run("sample", r, "--out", tmp_path / "x.jpg"), "--out must end in .png or .safetensors",
                   "x.jpg")
    assert not (tmp_path / "x.jpg").exists()


# -- 7: a saved model directory -------------------------------------------------------------------
def test_eval_and_sample_on_a_shipped_model_directory(run, tmp_path, monkeypatch):
    before = tree(DIGITS_TEACHER)
    monkeypatch.chdir(tmp_path)
    code, out, err = run("eval", DIGITS_TEACHER, "--nfe", "1", "--n", "40")
    assert code == 0, err
    rows = rows_of(tmp_path / "digits_teacher_eval")  # the default --out for a model directory
    assert [(r["model"], r["nfe"], r["n"]) for r in rows] == [("flow_matching", 1, 40)]
    assert rows[0]["fid"] > 0 and "| flow_matching |" in out
    code, _, err = run("sample", DIGITS_TEACHER, "--n", "4", "--out", "s.safetensors")
    assert code == 0, err
    assert tuple(load_file(str(tmp_path / "s.safetensors"))["samples"].shape) == (4, 1, 8, 8)
    assert tree(DIGITS_TEACHER) == before  # the shipped directory is left as it was


def test_load_run_takes_model_directories(tmp_path):
    from flowdistill.api import load_run
    from flowdistill.errors import CheckpointError

    shipped = load_run(DIGITS_TEACHER)
    assert shipped.model_dir and shipped.num_classes == 10
    assert shipped.cfg.data.name == "digits" and shipped.cfg.data.image_size == 8
    assert shipped.cfg.train.steps == 2000  # its train_config.yaml
    bare = tmp_path / "bare"  # no train_config.yaml: flowdistill.json names distiller and data
    shutil.copytree(DIGITS_TEACHER, bare, ignore=shutil.ignore_patterns("train_config.yaml"))
    b = load_run(bare)
    assert b.cfg.distiller.name == "flow_matching" and b.cfg.data.name == "digits"
    assert b.cfg.data.image_size == 8 and b.cfg.model.name == "unet"
    torch.testing.assert_close(b.sample(3, 1, seed=1), shipped.sample(3, 1, seed=1))
    r = toy_run(tmp_path)
    assert load_run(r / "student").run_dir == r and not load_run(r).model_dir  # a run's student/
    with pytest.raises(CheckpointError, match="config.yaml missing.*config.json missing"):
        load_run(tmp_path / "nothing")


# -- 8: "run written to" once per launch -----------------------------------------------------------
@pytest.mark.parametrize("main_process", [True, False])
def test_run_written_is_printed_by_the_main_process_only(run, tmp_path, monkeypatch, main_process):
    import accelerate

    import flowdistill.api

    monkeypatch.setattr(flowdistill.api, "train", lambda cfg, **kw: Path(cfg.out_dir))

    class State:
        is_main_process = main_process

    monkeypatch.setattr(accelerate, "PartialState", State)
    code, out, err = run("train-teacher", f"out_dir={tmp_path / 'r'}")
    assert code == 0, err
    assert out.count("run written to") == (1 if main_process else 0)
