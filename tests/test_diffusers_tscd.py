"""TSCD / PCM / LCM students inside diffusers (issue 13, item 4): FlowDistillScheduler carries the
segment edges (and TCD's γ) in its saved config; an exported tscd/lcm run samples identically inside
the pipeline loaded with ``DiffusionPipeline.from_pretrained``; a one-time LoRA TSCD student of a tiny
SD3 transformer trains through the distiller, saves with ``save_lora`` and samples in
``StableDiffusion3Pipeline`` after ``load_lora_weights`` exactly as our sampler.

Tolerances: the pipeline and our sampler run the same float32 ops in the same order (the same
float64 grid → float32 times, the same flow-map-jump kernel, the same Gaussian re-noise with noise
from the same seeded CPU generator), so they agree to float rounding: 1e-6 on samples of size O(1)
(the observed difference is 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowdistill.api import load_run, train
from flowdistill.config import load_config
from flowdistill.core.rng import StepRNG
from flowdistill.distillers.tscd import LCM, TSCD, LCMConfig, TSCDConfig
from flowdistill.errors import ConfigError
from flowdistill.integrations.diffusers import (
    FlowDistillPipeline,
    FlowDistillScheduler,
    SD3Adapter,
    TextCondition,
    one_time_scheduler_config,
    one_time_student,
)
from flowdistill.models.mlp import MLPFlowNet
from tests.helpers import REPO, main_in_process
from tests.test_diffusers_adapters import sd3_pipe, tiny_sd3

TEACHER = REPO / "assets" / "checkerboard_teacher"
EXACT = {"atol": 1e-6, "rtol": 0.0}  # same float32 ops in the same order (module docstring)


def _tscd(cls=TSCD, **kw) -> TSCD:
    torch.manual_seed(0)
    student = MLPFlowNet(data_dim=2, hidden=32, depth=2, two_time=True).eval()
    torch.nn.init.normal_(student.in_r.weight, std=0.5)  # make u depend on s (wrong s would show)
    cfg = cls.Config(**kw)
    cfg.validate()
    return cls.for_inference(cfg, student)


@pytest.mark.parametrize(("grid", "big_n"), [("uniform", 10), ("shifted", 10), ("shifted", 50)])
def test_scheduler_segment_grid_is_tscd_sample_times_and_round_trips(grid, big_n, tmp_path):
    d = _tscd(segments=4, num_steps=big_n, grid=grid, shift=3.0)
    s = FlowDistillScheduler(**d.scheduler_config())
    s.save_pretrained(tmp_path)
    loaded = FlowDistillScheduler.from_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    via_config = FlowDistillScheduler.from_config(saved)
    assert loaded.config.segment_steps == big_n and via_config.config.gamma == 0.0
    for n in (1, 2, 3, 4, 7, big_n):
        want = d.sample_times(n)
        for sched in (s, loaded, via_config):
            sched.set_timesteps(n)
            assert torch.equal(sched.sigmas, want), (n, sched.sigmas, want)
    # the edges are not the plain n-step grid when n does not divide N (N = 10, n = 4: m = 2, 5, 7)
    plain = FlowDistillScheduler(shift=s.config.shift)
    plain.set_timesteps(4)
    assert (plain.sigmas - d.sample_times(4)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="exceeds segment_steps"):
        s.set_timesteps(big_n + 1)


def test_old_configs_load_unchanged_and_bad_keys_fail(tmp_path):
    old = {"_class_name": "FlowDistillScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(old))
    s = FlowDistillScheduler.from_pretrained(tmp_path)  # a config saved before the new keys
    assert s.config.segment_steps == 0 and s.config.gamma == 0.0
    s.set_timesteps(4)
    ref = FlowDistillScheduler(shift=3.0)
    ref.set_timesteps(4)
    assert torch.equal(s.sigmas, ref.sigmas)
    for kw, needle in (({"segment_steps": -1}, "segment_steps"), ({"gamma": 1.5}, "gamma"),
                       ({"segment_steps": True}, "segment_steps")):
        with pytest.raises(ValueError, match=needle):
            FlowDistillScheduler(**kw)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_pipeline_with_segment_scheduler_is_the_tscd_sampler(gamma):
    """Two-time student, N = 10 shifted grid (edges off the plain grid), deterministic and TCD γ."""
    d = _tscd(segments=4, num_steps=10, grid="shifted", shift=3.0, sample_gamma=gamma)
    pipe = FlowDistillPipeline(student=d.student, scheduler=FlowDistillScheduler(**d.scheduler_config()))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(4))
    for nfe in (1, 2, 3, 4, 8):
        for seed in (0, 5):
            got = pipe(batch_size=64, num_inference_steps=nfe, generator=torch.Generator().manual_seed(4),
                       noise_seed=seed).images
            torch.testing.assert_close(got, d.sample(noise, nfe, seed=seed), **EXACT)
    if gamma > 0:  # the re-noise is really there: another seed, another sample
        a, b = (pipe(batch_size=64, num_inference_steps=4, generator=torch.Generator().manual_seed(4),
                     noise_seed=seed).images for seed in (0, 1))
        assert (a - b).abs().max() > 1e-2


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A TSCD run (k = 4 on a shifted N = 10 teacher grid) and an LCM run (γ = 1), a few steps each."""
    if not TEACHER.is_dir():
        pytest.skip("checkerboard teacher asset not shipped")
    root = tmp_path_factory.mktemp("tscd_export")
    common = [f"teacher={TEACHER}", "train.steps=3", "train.batch_size=64", "train.ckpt_every=0",
              "train.warmup_steps=0", "train.log_every=1", "distiller.num_steps=10"]
    out = {}
    for name, extra in (("tscd", ["distiller.grid=shifted", "distiller.shift=3.0"]), ("lcm", [])):
        out[name] = root / name
        train(load_config(REPO / "configs" / f"{name}_checkerboard.yaml", [f"out_dir={out[name]}", *common,
                                                                           *extra]))
    return out


@pytest.mark.parametrize("name", ["tscd", "lcm"])
def test_exported_tscd_run_samples_identically_in_diffusion_pipeline(runs, name, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    out = tmp_path / "pipe"
    code, _, err = main_in_process(capsys, "export", str(runs[name]), str(out))  # `flowdistill export`
    assert code == 0, err
    meta = json.loads((out / "flowdistill.json").read_text())
    assert meta["max_abs_diff_vs_run_sampler"] <= 1e-6
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, FlowDistillPipeline)
    pipe.set_progress_bar_config(disable=True)
    run = load_run(runs[name])
    cfg = run.cfg.distiller
    assert pipe.scheduler.config.segment_steps == 10 == meta["scheduler"]["segment_steps"]
    assert pipe.scheduler.config.gamma == cfg.sample_gamma == (1.0 if name == "lcm" else 0.0)
    for nfe in (1, 2, 4):
        got = pipe(batch_size=32, num_inference_steps=nfe, generator=torch.Generator().manual_seed(3)).images
        torch.testing.assert_close(got, run.sample(32, nfe, seed=3), **EXACT)
    # γ > 0 with the same seed: the saved config with another gamma, and the sampler option
    pipe.scheduler = FlowDistillScheduler.from_config(pipe.scheduler.config, gamma=0.5)
    for nfe in (2, 4):
        got = pipe(batch_size=32, num_inference_steps=nfe, generator=torch.Generator().manual_seed(3),
                   noise_seed=7).images
        ref = run.distiller.sample(torch.randn(32, 2, generator=torch.Generator().manual_seed(3)), nfe,
                                   gamma=0.5, seed=7)
        torch.testing.assert_close(got, ref, **EXACT)
    card = (out / "README.md").read_text()
    assert "segment edges of the teacher's 10-step grid" in card


# -- a one-time LoRA TSCD student of a tiny SD3 transformer --------------------------------------------
def _sd3_lora_tscd(cfg: TSCDConfig):
    """Teacher = the tiny SD3 transformer; student = a LoRA copy of it, one-time, read as the jump to its
    segment's lower edge; both with one fixed text condition."""
    from flowdistill.integrations.diffusers.lora import add_lora

    base = tiny_sd3()
    g = torch.Generator().manual_seed(11)
    cond = TextCondition(torch.randn(1, 7, 32, generator=g), torch.randn(1, 64, generator=g))
    student_tf = add_lora(base, rank=4, copy_model=True)
    student = one_time_student(SD3Adapter(student_tf, default_cond=cond), cfg)
    cfg.validate()
    return TSCD(cfg, student, SD3Adapter(base, default_cond=cond)), student_tf, cond


def _pipeline_latents(pipe, cond: TextCondition, nfe: int, b: int = 2) -> torch.Tensor:
    c = cond.batched(b)
    return pipe(prompt_embeds=c.prompt_embeds, pooled_prompt_embeds=c.pooled_prompt_embeds,
                guidance_scale=1.0, num_inference_steps=nfe, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def test_lora_tscd_student_for_all_step_counts_in_stable_diffusion3_pipeline(tmp_path):
    """k = 1 (the one segmentation every step count shares), sampled with γ = 1: one LoRA, every NFE."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusion3Pipeline

    from flowdistill.integrations.diffusers.lora import save_lora

    cfg = TSCDConfig(segments=1, num_steps=8, grid="shifted", shift=3.0, target="online", sample_gamma=1.0,
                     loss="l2")  # LCM-LoRA's online target
    d, student_tf, cond = _sd3_lora_tscd(cfg)
    batch = {"x": torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(1))}  # fixed latents

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(d.loss(batch, 0, "student", StepRNG(2, 0))["loss"])

    (group,) = d.optim_groups(3e-3)
    assert group.params and all(p.requires_grad for p in group.params)
    assert {id(p) for p in group.params} == {id(p) for n, p in student_tf.named_parameters() if "lora_" in n}
    opt = torch.optim.Adam(group.params, lr=group.lr)
    losses = [fixed_loss()]
    for i in range(10):
        out = d.loss(batch, i, "student", StepRNG(2, 0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        d.after_step(i, "student")
        losses.append(fixed_loss())
    # the online target moves with the student, so the fixed-batch loss is not a fixed objective; observed
    # 1 → 0.85 over these 10 steps, monotone
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.9 * losses[0], losses

    keys = one_time_scheduler_config(d, d.student)
    assert keys == {"segment_steps": 8, "gamma": 1.0, "shift": 3.0}
    save_lora(d.student, tmp_path / "lora", scheduler=keys)
    # the original pipeline class around a fresh base transformer (no text encoders / VAE: embeddings in,
    # latents out), with the scheduler from the saved config
    none = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                          "text_encoder_3", "tokenizer_3"])
    pipe = StableDiffusion3Pipeline(transformer=tiny_sd3(),
                                    scheduler=FlowDistillScheduler.from_pretrained(tmp_path / "lora"), **none)
    pipe.set_progress_bar_config(disable=True)
    before = _pipeline_latents(pipe, cond, 2)
    pipe.load_lora_weights(tmp_path / "lora")
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))  # = the pipeline's latents
    for nfe in (1, 2, 4):
        got = _pipeline_latents(pipe, cond, nfe)
        torch.testing.assert_close(got, d.sample(noise, nfe), **EXACT)
    assert (_pipeline_latents(pipe, cond, 2) - before).abs().max() > 1e-3  # the LoRA changed the samples
    with pytest.raises(ValueError, match="sample it with nfe=1 with gamma=0, or any nfe with gamma=1"):
        d.sample(noise, 2, gamma=0.0)  # a jump to an edge it never trained: refused, not extrapolated


def test_one_time_student_with_k_segments_serves_nfe_k_and_a_unified_one_is_refused():
    pytest.importorskip("peft")
    cfg = TSCDConfig(segments=2, num_steps=8, grid="shifted", shift=3.0)
    d, student_tf, cond = _sd3_lora_tscd(cfg)
    for p in d.student.parameters():  # make the LoRA non-trivial without training
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    keys = one_time_scheduler_config(d, d.student)
    assert keys["gamma"] == 0.0 and d.student.segments == 2
    pipe = sd3_pipe(student_tf, FlowDistillScheduler(**keys))
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_pipeline_latents(pipe, cond, 2), d.sample(noise, 2, gamma=0.0), **EXACT)
    for nfe in (1, 4):
        with pytest.raises(ValueError, match="sample it with nfe=2 with gamma=0"):
            d.sample(noise, nfe, gamma=0.0)
    out = d.loss({"x": torch.randn(4, 4, 4, 4)}, 0, "student", StepRNG(0, 0))  # its own jumps train
    assert torch.isfinite(out["loss"])
    with pytest.raises(ConfigError, match=r"distiller.segment_choices=\[1, 2, 4, 8\]"):
        one_time_student(torch.nn.Identity(), TSCDConfig(segment_choices=[1, 2, 4, 8]))
    lcm = LCM.for_inference(LCMConfig(), MLPFlowNet(two_time=True))
    assert lcm.scheduler_config()["gamma"] == 1.0


def test_segment_edges_inside_flux_pipeline_and_with_dynamic_shift():
    """Flux passes ``sigmas = linspace(1, 1/n, n)`` on every call: with ``segment_steps`` that still means
    the segment edges (not the plain grid); with dynamic shifting the edges move with the pipeline's μ."""
    from diffusers import FluxPipeline

    from flowdistill.integrations.diffusers import calculate_shift
    from flowdistill.integrations.diffusers.adapters import dynamic_shift
    from tests.test_diffusers_adapters import tiny_flux

    d = _tscd(segments=4, num_steps=10, grid="shifted", shift=3.0)
    sched = FlowDistillScheduler(**d.scheduler_config())
    pipe = FluxPipeline(transformer=tiny_flux(), scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt_embeds=torch.randn(1, 7, 32), pooled_prompt_embeds=torch.randn(1, 32), num_inference_steps=4,
         height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert torch.equal(sched.sigmas, d.sample_times(4)) and sched.step_index == 4
    dyn = FlowDistillScheduler(use_dynamic_shifting=True, segment_steps=10)
    mu = calculate_shift(4)
    dyn.set_timesteps(4, mu=mu)
    want = dynamic_shift(_tscd(segments=4, num_steps=10).sample_times(4, dtype=torch.float64), mu)
    torch.testing.assert_close(dyn.sigmas, want.float(), atol=1e-7, rtol=0)
