"""The offline CLI chain of issue 15 on tiny SD3, Flux and UNet2DCondition (SD) pipelines:
``flowdistill embed`` → ``flowdistill distill`` (FreeFlow, two-time LoRA student, a few steps) →
``flowdistill export`` → ``load_lora_weights`` on the original pipeline class (+ the exported
scheduler and second time embedding) → the pipeline's own sampling at 1, 2 and 4 steps gives the
run's own sampler's latents on the same noise → ``flowdistill sample`` writes PNGs and the grid;
``flowdistill eval`` on a pipeline run (Inception FID/KID against a folder, CLIP score)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from flowdistill.cli import main
from flowdistill.integrations.diffusers import render
from tests.pipeline_fixtures import (  # noqa: F401  (session fixtures used by name)
    flux_pipeline_dir,
    sd3_pipeline_dir,
    tiny_clip_tokenizer,
    unet_pipeline_dir,
)

pytest.importorskip("peft")

PROMPTS = ["a photo of a cat", "a red car", "a blue house in the sky", "a dog on the tree"]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pipelines" / "freeflow_sd3.yaml"


def _distill(pipe_dir: Path, tmp: Path, steps: int = 3) -> tuple[Path, Path]:
    """``embed`` the prompts, then ``distill`` a short CPU FreeFlow LoRA run; returns (run, cache)."""
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cache, run = tmp / "cache", tmp / "run"
    embed = ["embed", str(pipe_dir), str(tmp / "prompts.txt"), "--out", str(cache), "--batch-size", "2"]
    assert main(embed) == 0
    over = [f"out_dir={run}", f"teacher.diffusers={pipe_dir}", "teacher.dtype=float32", f"data.root={cache}",
            "data.image_size=32", "model.params.rank=4", "model.params.gradient_checkpointing=false",
            f"train.steps={steps}", "train.batch_size=2", "train.ckpt_every=0", "train.log_every=1",
            "train.trackers=none", "train.cpu=true", "train.lr=1e-2", "guidance.scale=2.0"]
    assert main(["distill", str(CONFIG), *over]) == 0
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == steps and all(math.isfinite(r["loss"]) for r in logs)
    return run, cache


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, request):
    """``distilled(kind) -> (run, cache)``: embed + distil on the tiny ``kind`` pipeline, once per module."""
    done: dict[str, tuple[Path, Path]] = {}

    def get(kind: str) -> tuple[Path, Path]:
        """The run of ``kind`` (made on first use)."""
        if kind not in done:
            pipe_dir = Path(request.getfixturevalue(f"{kind}_pipeline_dir"))
            done[kind] = _distill(pipe_dir, tmp_path_factory.mktemp(f"chain_{kind}"))
        return done[kind]

    return get


def _swap_in(kind: str, pipe_dir: Path, export: Path):
    """What the model card tells a user to do: the original pipeline class, ``load_lora_weights``, the
    exported scheduler, the second time embedding driven by the scheduler."""
    import diffusers

    from flowdistill.integrations.diffusers.scheduler import FlowDistillScheduler
    from flowdistill.integrations.diffusers.two_time import load_second_time
    from flowdistill.integrations.diffusers.vp_scheduler import FlowDistillVPScheduler

    cls = getattr(diffusers, json.loads((pipe_dir / "model_index.json").read_text())["_class_name"])
    pipe = cls.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(export)
    sched_cls = FlowDistillVPScheduler if kind == "unet" else FlowDistillScheduler
    pipe.scheduler = sched_cls.from_pretrained(export)
    load_second_time(render.denoiser(pipe), export)
    render.follow_scheduler_time(pipe)
    return pipe


@pytest.mark.parametrize("kind", ["sd3", "flux", "unet"])
def test_cli_chain_embed_distill_export_load_sample(kind, request, tmp_path, distilled):
    from flowdistill.api import load_run
    from flowdistill.integrations.diffusers.prompt_cache import PromptEmbeddingStore

    pipe_dir = Path(request.getfixturevalue(f"{kind}_pipeline_dir"))
    run_dir, cache = distilled(kind)
    export = tmp_path / "export"
    assert main(["export", str(run_dir), str(export)]) == 0
    files = sorted(p.name for p in export.iterdir())
    assert files == ["README.md", "flowdistill.json", "pytorch_lora_weights.safetensors",
                     "scheduler_config.json", "second_time.safetensors"]
    info = json.loads((export / "flowdistill.json").read_text())
    assert info["max_abs_diff_vs_run_sampler"] is not None  # the export checked itself
    card = (export / "README.md").read_text()
    assert "load_lora_weights" in card and info["scheduler_class"] in card

    pipe = _swap_in(kind, pipe_dir, export)
    run = load_run(run_dir)
    cond = PromptEmbeddingStore(cache).get_many(torch.arange(2))
    kw = render.run_guidance(pipe, export)
    moved = 0.0
    for nfe in (1, 2, 4):
        want = run.sample(2, nfe, seed=7, cond=cond)
        noise = render.draw_noise(want.shape[1:], 2, seed=7)  # load_run's own seeded draw
        got = render.generate(pipe, nfe, noise, embeds=cond, guidance=kw)
        scale = max(1.0, want.abs().max().item())  # ε-prediction UNets with random weights reach |x| ~ 100
        assert (got - want).abs().max().item() <= 1e-5 * scale, (kind, nfe)
        moved = max(moved, (want - noise).abs().max().item())
    assert moved > 1e-2  # the samples are not the noise

    out = tmp_path / "samples"
    assert main(["sample", str(export), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--nfe", "1,2,4",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "nfe1", "nfe2", "nfe4"]
    assert sorted(p.name for p in (out / "nfe4").iterdir()) == ["p00_0.png", "p01_0.png"]
    assert Image.open(out / "nfe1" / "p00_0.png").size == (32, 32)
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > grid.size[1]  # three NFE columns beside the label column, two prompt rows


def test_lcm_one_time_student_from_a_latent_cache(sd3_pipeline_dir, tmp_path):  # noqa: F811
    """LCM (a one-time LoRA read as jumps to 0, γ = 1 re-noising between steps) on a latent cache of
    an image-caption folder: the export reproduces the run's sampler through the SD3 pipeline and its
    FlowDistillScheduler (segment_steps, gamma) at 1, 2 and 4 steps."""
    from flowdistill.api import load_run
    from flowdistill.integrations.diffusers.prompt_cache import LatentStore

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, caption in enumerate(PROMPTS):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(imgs / f"i{i}.png")
        (imgs / f"i{i}.txt").write_text(caption)
    lat, run_dir, export = tmp_path / "lat", tmp_path / "run", tmp_path / "exp"
    assert main(["embed", str(sd3_pipeline_dir), "--images", str(imgs), "--out", str(lat),
                 "--resolution", "32", "--batch-size", "2"]) == 0
    over = [f"out_dir={run_dir}", f"teacher.diffusers={sd3_pipeline_dir}", "teacher.dtype=float32",
            f"data.root={lat}", "data.image_size=32", "model.params.rank=4",
            "model.params.gradient_checkpointing=false", "train.steps=2", "train.batch_size=2",
            "train.ckpt_every=0", "train.trackers=none", "train.cpu=true", "train.lr=1e-2"]
    assert main(["distill", str(CONFIG.parent / "lcm_sd3.yaml"), *over]) == 0
    assert main(["export", str(run_dir), str(export)]) == 0
    info = json.loads((export / "flowdistill.json").read_text())
    assert info["scheduler"]["gamma"] == 1.0 and not info["two_time"]
    assert info["max_abs_diff_vs_run_sampler"] <= 1e-5
    pipe = render.load_run_pipeline(export)
    run = load_run(run_dir)
    got = LatentStore(lat).get_many(torch.arange(2))
    cond = {k: got[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}
    for nfe in (1, 2, 4):
        want = run.sample(2, nfe, seed=3, cond=cond)
        out = render.generate(pipe, nfe, render.draw_noise(want.shape[1:], 2, seed=3), embeds=cond,
                              guidance=render.run_guidance(pipe, export))
        assert (out - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), nfe


def _tiny_clip(path: Path) -> Path:
    """A random tiny CLIP model + processor saved offline (the fixtures' tokenizer, 32 px images)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tiny_clip_tokenizer()
    torch.manual_seed(0)
    text = {"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}  # pooled at its own EOS
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 2}
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(path)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(path)
    return path


def test_clip_score_is_the_cosine_of_the_projected_embeddings(tmp_path):
    from flowdistill.eval.clip_score import clip_score, load_clip

    model, proc = load_clip(_tiny_clip(tmp_path / "clip"))
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    prompts = PROMPTS[:3]
    got = clip_score(x, prompts, model, proc)
    imgs = [((xi + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy() for xi in x]
    batch = proc(text=prompts, images=imgs, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    want = (100 * cos.clamp_min(0)).mean().item()
    assert got["n"] == 3 and 0 <= got["clip_score"] <= 100
    assert abs(got["clip_score"] - want) < 1e-4  # CLIPModel's own embeddings, 100·max(cos, 0)
    other = clip_score(x, prompts[::-1], model, proc)["clip_score"]
    assert abs(other - got["clip_score"]) > 1e-4  # the prompt of each image counts


def test_clip_score_without_transformers_names_the_extra(monkeypatch):
    import sys

    from flowdistill.errors import ConfigError
    from flowdistill.eval.clip_score import load_clip

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"pip install .*transformers"):
        load_clip("anything")


def test_eval_of_a_pipeline_run(distilled, tmp_path, monkeypatch, capsys):
    """``flowdistill eval RUN --reference FOLDER --inception-weights W --clip-model C``: a table with
    FID/KID/CLIP per NFE (Inception with random weights at its smallest input size: fast, offline)."""
    from safetensors.torch import save_file

    from flowdistill.eval import inception
    from tests.test_fid import _random_inception_state

    monkeypatch.setattr(inception.SafeInceptionV3, "INPUT_IMAGE_SIZE", 75)
    weights = tmp_path / "incep.safetensors"
    save_file(_random_inception_state(), str(weights))
    run_dir, _ = distilled("sd3")
    ref = tmp_path / "ref"
    ref.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(ref / f"r{i}.png")
    clip = _tiny_clip(tmp_path / "clip")
    out = tmp_path / "ev"
    code = main(["eval", str(run_dir), "--reference", str(ref), "--inception-weights", str(weights),
                 "--clip-model", str(clip), "--nfe", "1,2", "--n", "5", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["nfe"] for r in rows] == [1, 2] and all(r["n"] == 5 and r["n_ref"] == 6 for r in rows)
    assert all(math.isfinite(r["fid"]) and r["fid"] >= 0 and 0 <= r["clip_score"] <= 100 for r in rows)
    assert {"sweep.md", "fid_vs_nfe.png", "clip_vs_nfe.png", "grid.png"} <= {p.name for p in out.iterdir()}
    # clear one-line errors: no reference; a built-in-only flag; a missing weights file
    assert main(["eval", str(run_dir), "--out", str(tmp_path / "e2")]) == 2
    assert "--reference FOLDER" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--reference", str(ref), "--inception-weights",
                 str(tmp_path / "no.pth"), "--out", str(tmp_path / "e3")]) == 2
    assert "not found" in capsys.readouterr().err
    # an export (a copy of the student directory, no run config): prompts from --prompts
    shutil.copytree(run_dir / "student", tmp_path / "exp")
    assert main(["eval", str(tmp_path / "exp"), "--reference", str(ref), "--inception-weights", str(weights),
                 "--out", str(tmp_path / "e4")]) == 2
    assert "give --prompts FILE" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    assert main(["eval", str(tmp_path / "exp"), "--reference", str(ref), "--inception-weights", str(weights),
                 "--prompts", str(tmp_path / "p.txt"), "--nfe", "1", "--n", "4",
                 "--out", str(tmp_path / "e5")]) == 0
    assert [r["n"] for r in json.loads((tmp_path / "e5" / "sweep.json").read_text())] == [4]
