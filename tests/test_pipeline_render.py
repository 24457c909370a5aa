"""Pipeline-native sampling of diffusers students (``integrations/diffusers/render.py``,
``vp_scheduler.py``): the user's own pipeline class with the student's LoRA loaded by
``load_lora_weights`` and the FlowDistillScheduler swapped in takes exactly the steps of our own
sampler on the same noise (SD3, Flux, a UNet2DCondition SD pipeline; one-time and two-time students),
and writes PNGs plus a labelled grid."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from flowdistill.core.flowmap import flow_map_jump
from flowdistill.core.solvers import solve
from flowdistill.core.timesteps import build_grid
from flowdistill.errors import ConfigError
from flowdistill.integrations.diffusers import TextCFGField, TextCondition, adapt_teacher, render
from tests.pipeline_fixtures import (  # noqa: F401  (session fixtures)
    flux_pipeline_dir,
    sd3_pipeline_dir,
    unet_pipeline_dir,
)

pytest.importorskip("peft")

PROMPTS = ["a photo of a cat", "a red car on the tree"]


#: T5 tokens the tests encode (the pipelines' defaults, 256 / 512, make the tiny attention slow on CPU)
T5_LEN = 16


def _seq(pipe) -> dict[str, int]:
    """``max_sequence_length`` for pipelines with a T5 encoder."""
    return {"max_sequence_length": T5_LEN} if render.pipeline_kind(pipe) in ("sd3", "flux") else {}


def _embeds(pipe, prompts: list[str], negative: bool = False) -> dict[str, torch.Tensor]:
    """The prompts' embeddings by the pipeline's own ``encode_prompt`` (what the prompt cache holds)."""
    kind = render.pipeline_kind(pipe)
    with torch.no_grad():
        if kind == "sd3":
            pe, npe, pp, npp = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=negative,
                                                  negative_prompt=[""] * len(prompts) if negative else None,
                                                  max_sequence_length=T5_LEN)
            return {"prompt_embeds": npe, "pooled_prompt_embeds": npp} if negative else \
                {"prompt_embeds": pe, "pooled_prompt_embeds": pp}
        if kind == "flux":
            pe, pp, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=T5_LEN)
            return {"prompt_embeds": pe, "pooled_prompt_embeds": pp}
        pe, npe = pipe.encode_prompt(prompts, "cpu", 1, negative, negative_prompt=None)
        return {"prompt_embeds": npe if negative else pe}


def _save_lora(pipe, student_dir, keys: dict) -> None:
    """Write the (already LoRA'd) denoiser's adapter in ``load_lora_weights`` format + the scheduler."""
    from peft.utils import get_peft_model_state_dict

    from flowdistill.integrations.diffusers.scheduler import FlowDistillScheduler

    net = render.denoiser(pipe)
    state, meta = get_peft_model_state_dict(net), net.peft_config["default"].to_dict()
    if render.pipeline_kind(pipe) == "sd":
        type(pipe).save_lora_weights(str(student_dir), unet_lora_layers=state,
                                     unet_lora_adapter_metadata=meta, weight_name=render.LORA_WEIGHTS)
    else:
        type(pipe).save_lora_weights(str(student_dir), transformer_lora_layers=state,
                                     transformer_lora_adapter_metadata=meta, weight_name=render.LORA_WEIGHTS)
    FlowDistillScheduler(**keys).save_config(str(student_dir))


def _lora_student(pipe_dir, tmp_path, keys: dict, seed: int = 3):
    """A LoRA student of the pipeline's denoiser with random non-zero adapters, saved; returns the
    student pipeline object it was built in (teacher weights + LoRA) and the student directory."""
    from diffusers import DiffusionPipeline

    from flowdistill.integrations.diffusers.lora import add_lora

    pipe = DiffusionPipeline.from_pretrained(str(pipe_dir), local_files_only=True)
    net = add_lora(render.denoiser(pipe), rank=4)
    g = torch.Generator().manual_seed(seed)
    for n, p in net.named_parameters():
        if "lora_B" in n:
            p.data = 0.2 * torch.randn(p.shape, generator=g)
    _save_lora(pipe, tmp_path / "student", keys)
    return pipe, tmp_path / "student"


def _adapter(pipe, net):
    """Our velocity field of the pipeline's denoiser (the adapter the job builds)."""
    kind = render.pipeline_kind(pipe)
    if kind == "sd":
        return adapt_teacher(net, scheduler_config=pipe.scheduler.config)
    return adapt_teacher(net, **({"guidance_scale": 3.5} if kind == "flux" else {}))


@pytest.mark.parametrize("which,shift", [("sd3", 3.0), ("flux", 1.0), ("unet", 2.0)])
def test_pipeline_native_sampling_equals_our_sampler(which, shift, request, tmp_path):
    """``load_lora_weights`` + FlowDistillScheduler inside the original pipeline class = Euler on the
    LoRA'd adapter, from the same noise, at NFE 1, 2, 4 (bit for bit up to float32 round-off)."""
    pipe_dir = request.getfixturevalue(f"{which}_pipeline_dir")
    student, sdir = _lora_student(pipe_dir, tmp_path, {"shift": shift})
    field = _adapter(student, render.denoiser(student))
    native = render.load_student_pipeline(pipe_dir, sdir)
    assert type(native).__name__ == type(student).__name__
    cond = TextCondition(**_embeds(native, PROMPTS))
    noise = render.draw_noise(render.latent_shape(native, *render.default_size(native)), 2, seed=5)
    teacher_field = _adapter(native, render.denoiser(render.load_student_pipeline(pipe_dir, None)))
    for nfe in (1, 2, 4):
        got = render.generate(native, nfe, noise, prompts=PROMPTS, **_seq(native))
        grid = build_grid("shifted", nfe, shift=shift) if shift != 1 else build_grid("uniform", nfe)
        with torch.no_grad():
            want = solve(field, noise, grid, "euler", cond=cond).x
            plain = solve(teacher_field, noise, grid, "euler", cond=cond).x
        assert got.shape == noise.shape
        scale = max(1.0, want.abs().max().item())  # ε-prediction UNets with random weights reach |x| ~ 100
        assert (got - want).abs().max().item() <= 1e-5 * scale, nfe
        assert (plain - want).abs().max().item() > 1e-3 * scale  # the LoRA is really in the pipeline


def test_cfg_inside_the_pipeline_equals_text_cfg_field(request, tmp_path):
    """The pipeline's own CFG with the empty negative prompt (guidance_kwargs) = TextCFGField with the
    negative prompt's embeddings (CFG in ε space equals CFG in v space for the UNet)."""
    for i, which in enumerate(("sd3", "unet")):
        pipe_dir = request.getfixturevalue(f"{which}_pipeline_dir")
        student, sdir = _lora_student(pipe_dir, tmp_path / str(i), {"shift": 1.0})
        native = render.load_student_pipeline(pipe_dir, sdir)
        neg = _embeds(native, PROMPTS[:1], negative=True)
        field = TextCFGField(_adapter(student, render.denoiser(student)), 4.0, neg)
        noise = render.draw_noise(render.latent_shape(native, 32, 32), 2, seed=1)
        got = render.generate(native, 2, noise, prompts=PROMPTS, guidance=render.guidance_kwargs(native, 4.0),
                              **_seq(native))
        with torch.no_grad():
            cond = TextCondition(**_embeds(native, PROMPTS))
            want = solve(field, noise, build_grid("uniform", 2), "euler", cond=cond).x
        scale = max(1.0, want.abs().max().item())
        assert (got - want).abs().max().item() <= 1e-5 * scale


def test_two_time_student_jumps_inside_the_pipeline(request, tmp_path):
    """A two-time student (second time embedding, saved beside the LoRA) sampled by the original
    pipeline: each step is the flow-map jump ``x + (s − t)·u(x, t, s)`` with ``s`` from the scheduler,
    as our flow-map sampler; without the hook it would be ``u(x, t, t)``."""
    from flowdistill.integrations.diffusers.two_time import add_second_time, save_second_time

    sd3_dir = request.getfixturevalue("sd3_pipeline_dir")
    student, sdir = _lora_student(sd3_dir, tmp_path, {"shift": 3.0})
    tt = add_second_time(render.denoiser(student))
    g = torch.Generator().manual_seed(0)
    for p in tt.embedding.mlp.linear_2.parameters():  # a trained (non-zero) second time
        p.data = 0.5 * torch.randn(p.shape, generator=g)
    save_second_time(tt, sdir)
    native = render.load_student_pipeline(sd3_dir, sdir)
    cond = TextCondition(**_embeds(native, PROMPTS))
    noise = render.draw_noise((4, 16, 16), 2, seed=2)
    for nfe in (1, 2, 4):
        got = render.generate(native, nfe, noise, prompts=PROMPTS, **_seq(native))
        grid = build_grid("shifted", nfe, shift=3.0)
        with torch.no_grad():
            want = noise
            for t, s in zip(grid[:-1].float(), grid[1:].float(), strict=True):  # X = x + (s − t)·u(x, t, s)
                want = flow_map_jump(tt, want, t.expand(2), s.expand(2), cond=cond)
            one_time = solve(lambda x, t, cond=None: tt(x, t, None, cond=cond), noise, grid, "euler",
                             cond=cond).x
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), nfe
        assert (one_time - want).abs().max().item() > 1e-3  # s really reaches the model


def test_full_student_directory_replaces_the_denoiser(request, tmp_path):
    """A full (non-LoRA) student saved as ``transformer/`` beside the scheduler config replaces the
    pipeline's denoiser; the pipeline then samples as our sampler on that transformer."""
    from diffusers import DiffusionPipeline

    from flowdistill.integrations.diffusers.scheduler import FlowDistillScheduler

    sd3_dir = request.getfixturevalue("sd3_pipeline_dir")
    pipe = DiffusionPipeline.from_pretrained(str(sd3_dir), local_files_only=True)
    net = pipe.transformer
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    net.save_pretrained(tmp_path / "student" / "transformer")
    FlowDistillScheduler(shift=3.0).save_config(str(tmp_path / "student"))
    native = render.load_student_pipeline(sd3_dir, tmp_path / "student")
    cond = TextCondition(**_embeds(native, PROMPTS))
    noise = render.draw_noise((4, 16, 16), 2, seed=4)
    got = render.generate(native, 2, noise, prompts=PROMPTS, **_seq(native))
    with torch.no_grad():
        want = solve(_adapter(native, net), noise, build_grid("shifted", 2, shift=3.0), "euler", cond=cond).x
        teacher = render.load_student_pipeline(sd3_dir, None, scheduler_config={"shift": 3.0})
        plain = render.generate(teacher, 2, noise, prompts=PROMPTS, **_seq(teacher))
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    assert (plain - want).abs().max().item() > 1e-3  # the saved weights replaced the teacher's


def test_render_prompts_writes_pngs_and_a_labelled_grid(request, tmp_path):
    """Every prompt at every NFE from one seeded noise: PNGs per NFE, a grid with a label column and a
    header row; the same seed gives the same images, another seed others."""
    sd3_dir = request.getfixturevalue("sd3_pipeline_dir")
    _, sdir = _lora_student(sd3_dir, tmp_path, {"shift": 3.0})
    pipe = render.load_student_pipeline(sd3_dir, sdir)
    res = render.render_prompts(pipe, PROMPTS, [1, 2], tmp_path / "out", seed=0)
    assert sorted(p.name for p in (tmp_path / "out" / "nfe1").iterdir()) == ["p00_0.png", "p01_0.png"]
    grid = Image.open(res.grid)
    assert grid.size == (180 + 2 * (96 + 4) + 4, 22 + 2 * (96 + 4) + 4)  # 2 NFEs × 2 prompts, 96 px cells
    px = torch.tensor(list(grid.convert("L").getdata()), dtype=torch.float32)
    assert px.min() < 128  # the label text / images are drawn, not a blank canvas
    again = render.render_prompts(pipe, PROMPTS, [1], tmp_path / "again", seed=0)
    other = render.render_prompts(pipe, PROMPTS, [1], tmp_path / "other", seed=1)
    a, b, c = (torch.tensor(list(r.images[1][0].getdata())) for r in (res, again, other))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ConfigError, match="no prompts"):
        render.render_prompts(pipe, [], [1], tmp_path / "x")


def test_read_prompts_arg(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a car"}) + "\n")
    (tmp_path / "p.csv").write_text("id,prompt\n1,a tree\n")
    assert render.read_prompts_arg(["x"], tmp_path / "p.txt") == ["x", "a cat", "a dog"]
    assert render.read_prompts_arg(None, tmp_path / "p.jsonl") == ["a car"]
    assert render.read_prompts_arg(None, tmp_path / "p.csv") == ["a tree"]
    (tmp_path / "bad.csv").write_text("id,text\n1,a\n")
    for bad, match in ((tmp_path / "bad.csv", "--prompts .* no 'prompt' column"),
                       (tmp_path / "nope.txt", "no file")):
        with pytest.raises(ConfigError, match=match):
            render.read_prompts_arg(None, bad)
    with pytest.raises(ConfigError, match="no prompts"):
        render.read_prompts_arg([], None)
