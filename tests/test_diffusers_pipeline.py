"""FlowDistillPipeline and `flowdistill export`: a trained run exported as a diffusers pipeline loads
offline with from_pretrained and samples exactly as the run's own sampler."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowdistill.api import load_run, train
from flowdistill.cli import main
from flowdistill.config import load_config
from flowdistill.core.guidance import CFGField
from flowdistill.core.sampling import sample_velocity
from flowdistill.integrations.diffusers import FlowDistillPipeline, FlowDistillScheduler, export_run
from flowdistill.models import MLPFlowNet, UNetFlowNet
from tests.helpers import TINY_TEACHER, cli

FREEFLOW = Path(__file__).resolve().parents[1] / "configs" / "freeflow_checkerboard.yaml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny velocity teacher run and a FreeFlow (two-time) run distilled from it on a shifted grid."""
    root = tmp_path_factory.mktemp("export")
    teacher = root / "teacher"
    train(load_config(None, [f"out_dir={teacher}", *TINY_TEACHER, "train.steps=40", "train.ckpt_every=0"]))
    ff = root / "freeflow"
    train(load_config(FREEFLOW, [f"out_dir={ff}", f"teacher={teacher}", "train.steps=10",
                                 "train.batch_size=64", "train.ckpt_every=0", "train.warmup_steps=0",
                                 "train.log_every=5",
                                 "distiller.sample_grid=shifted"], default_distiller="freeflow"))
    return {"teacher": teacher, "freeflow": ff}


def test_cli_export_loads_offline_and_samples_like_the_run(runs, tmp_path):
    out = tmp_path / "pipe_ff"
    r = cli("export", str(runs["freeflow"]), str(out))
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "model_index.json").read_text())
    assert index["student"] == ["flowdistill.models.mlp", "MLPFlowNet"]
    assert index["scheduler"] == ["flowdistill.integrations.diffusers.scheduler", "FlowDistillScheduler"]
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    pipe = FlowDistillPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.student.config.two_time and pipe.scheduler.config.shift == 3.0  # the run's "shifted" grid
    run = load_run(runs["freeflow"])
    for n in (1, 2, 4):
        ref = run.sample(32, n, seed=5)
        got = pipe(batch_size=32, num_inference_steps=n, generator=torch.Generator().manual_seed(5)).images
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    a = pipe(batch_size=32, num_inference_steps=1, generator=torch.Generator().manual_seed(5)).images
    b = pipe(batch_size=32, num_inference_steps=4, generator=torch.Generator().manual_seed(5)).images
    assert (a - b).abs().max() > 1e-3  # N really changes the sampler


def test_export_velocity_run(runs, tmp_path):
    out = export_run(runs["teacher"], tmp_path / "pipe_teacher")
    pipe = FlowDistillPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert not pipe.student.config.two_time and pipe.scheduler.config.shift == 1.0
    run = load_run(runs["teacher"])
    for n in (1, 3):
        ref = run.sample(16, n, seed=1)
        got = pipe(batch_size=16, num_inference_steps=n, generator=torch.Generator().manual_seed(1),
                   output_type="np").images
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-5, rtol=0)


def test_export_errors(runs, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    for args, needle in (([str(runs["teacher"]), str(busy)], "not empty; pass --overwrite"),
                         ([str(tmp_path / "missing"), str(tmp_path / "o")], "config.yaml missing")):
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1, err
    assert (busy / "keep.txt").exists() and not (tmp_path / "o").exists()
    assert main(["export", str(runs["teacher"]), str(busy), "--overwrite"]) == 0
    assert (busy / "model_index.json").is_file() and not (busy / "keep.txt").exists()


def test_export_records_its_self_check_and_warns_on_mismatch(runs, tmp_path):
    out = export_run(runs["freeflow"], tmp_path / "ok")
    meta = json.loads((out / "flowdistill.json").read_text())
    assert meta["two_time"] and meta["sample_grid"] == "shifted"
    assert meta["max_abs_diff_vs_run_sampler"] < 1e-6
    # a velocity run sampled with Heun: the Euler pipeline cannot reproduce it -> warned, not hidden
    heun = tmp_path / "heun_run"
    shutil.copytree(runs["teacher"], heun)
    cfg_file = heun / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("sample_solver: euler", "sample_solver: heun"))
    with pytest.warns(UserWarning) as rec:
        export_run(heun, tmp_path / "heun_pipe")
    msgs = " | ".join(str(w.message) for w in rec)
    assert "takes Euler steps" in msgs and "does not reproduce the run's own sampler" in msgs


def test_class_conditional_guided_pipeline_matches_cfg_sampler(tmp_path):
    torch.manual_seed(0)
    student = MLPFlowNet(data_dim=2, hidden=32, depth=2, num_classes=3).eval()
    pipe = FlowDistillPipeline(student=student, scheduler=FlowDistillScheduler())
    pipe.set_progress_bar_config(disable=True)
    labels = torch.tensor([0, 1, 2, 1])
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    for w in (1.0, 2.5):
        got = pipe(batch_size=4, num_inference_steps=3, class_labels=labels, guidance_scale=w,
                   generator=torch.Generator().manual_seed(2)).images
        ref = sample_velocity(CFGField(student, w, 3), noise, 3, cond=labels).x
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 3\]"):
        pipe(batch_size=1, class_labels=[7])
    pipe.save_pretrained(tmp_path / "p")
    again = FlowDistillPipeline.from_pretrained(tmp_path / "p")
    again.set_progress_bar_config(disable=True)
    reloaded = again(batch_size=4, num_inference_steps=3, class_labels=labels, guidance_scale=2.5,
                     generator=torch.Generator().manual_seed(2)).images
    torch.testing.assert_close(reloaded, got)
    uncond = FlowDistillPipeline(student=MLPFlowNet(hidden=8, depth=1), scheduler=FlowDistillScheduler())
    with pytest.raises(ValueError, match="unconditional"):
        uncond(class_labels=[0])


def test_image_student_output_types():
    torch.manual_seed(0)
    student = UNetFlowNet(sample_size=8, in_channels=1, base_channels=8, norm_groups=4, attention=False,
                          two_time=True).eval()
    pipe = FlowDistillPipeline(student=student, scheduler=FlowDistillScheduler())
    pipe.set_progress_bar_config(disable=True)
    kw = {"batch_size": 2, "num_inference_steps": 2}
    pt = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    npy = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    pil = pipe(generator=torch.Generator().manual_seed(0), output_type="pil", **kw).images
    assert pt.shape == (2, 1, 8, 8) and npy.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(npy, ((pt + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert len(pil) == 2 and pil[0].size == (8, 8)
    with pytest.raises(ValueError, match="output_type must be one of pt, np, pil"):
        pipe(output_type="latent")
    with pytest.raises(TypeError, match="FlowDistillScheduler"):
        FlowDistillPipeline(student=student, scheduler=None)


def test_diffusion_pipeline_from_pretrained_and_model_card(runs, tmp_path):
    """The generic ``DiffusionPipeline.from_pretrained`` loads an export (flowdistill imported, and
    through the export's ``pipeline.py`` in a fresh interpreter that never imported flowdistill) and
    samples exactly as the run's own sampler: the same float32 ops in the same order, so the bound
    is float rounding (1e-6), as in the tests above. The model card names method, teacher, data,
    steps and NFE."""
    from diffusers import DiffusionPipeline

    from flowdistill.data.couplings import file_sha256

    out = export_run(runs["freeflow"], tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, FlowDistillPipeline)
    pipe.set_progress_bar_config(disable=True)
    run = load_run(runs["freeflow"])
    for n in (1, 2):
        got = pipe(batch_size=16, num_inference_steps=n, generator=torch.Generator().manual_seed(3)).images
        torch.testing.assert_close(got, run.sample(16, n, seed=3), atol=1e-6, rtol=0)

    code = ("import sys, torch\n"
            "from diffusers import DiffusionPipeline\n"
            f"p = DiffusionPipeline.from_pretrained({str(out)!r}, custom_pipeline='pipeline', "
            "trust_remote_code=True)\n"
            "p.set_progress_bar_config(disable=True)\n"
            "x = p(batch_size=16, num_inference_steps=1, generator=torch.Generator().manual_seed(3)).images\n"
            f"torch.save({{'x': x, 'cls': type(p).__name__}}, {str(tmp_path / 'x.pt')!r})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = torch.load(tmp_path / "x.pt", weights_only=True)
    assert saved["cls"] == "FlowDistillPipeline"
    torch.testing.assert_close(saved["x"], run.sample(16, 1, seed=3), atol=1e-6, rtol=0)

    card = (out / "README.md").read_text()
    teacher_weights = runs["teacher"] / "student" / "diffusion_pytorch_model.safetensors"
    for needle in ("`freeflow`", "`checkerboard`", "| training steps | 10 ", "NFE 1, 2, 4",
                   "recommended `num_inference_steps=1`", str((runs["teacher"] / "student").resolve()),
                   file_sha256(teacher_weights), "DiffusionPipeline.from_pretrained"):
        assert needle in card, needle
    teacher_card = (export_run(runs["teacher"], tmp_path / "pipe_t") / "README.md").read_text()
    assert "`flow_matching`" in teacher_card and "none (trained from data)" in teacher_card
    assert "recommended `num_inference_steps=128`" in teacher_card
