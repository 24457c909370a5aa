"""Teacher adapters: tiny diffusers models (random weights, built from config) sampled by our Euler
solver reproduce diffusers' own pipelines/schedulers; unsupported inputs fail with clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UNet2DConditionModel,
    UNet2DModel,
)

from flowdistill.core.solvers import solve
from flowdistill.integrations.diffusers import (
    TEACHER_ADAPTERS,
    DDPMUNetAdapter,
    FluxAdapter,
    SD3Adapter,
    TextCFGField,
    TextCondition,
    adapt_teacher,
    calculate_shift,
    pack_latents,
    scheduler_sigmas,
    unpack_latents,
)


def tiny_sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                 attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                 joint_attention_dim=32,
                                 pooled_projection_dim=64, out_channels=4).eval()


def tiny_flux(guidance_embeds: bool = True) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                  guidance_embeds=guidance_embeds).eval()


def tiny_unet(**kw) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
                       **kw).eval()


def sd3_pipe(transformer, scheduler) -> StableDiffusion3Pipeline:
    """An SD3 pipeline with no text encoders or VAE (fed precomputed embeddings, latent output)."""
    none = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                          "text_encoder_3", "tokenizer_3"])
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, **none)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sd3_adapter_matches_stable_diffusion3_pipeline(shift):
    model = tiny_sd3()
    pe, pp = torch.randn(2, 7, 32), torch.randn(2, 64)
    pipe = sd3_pipe(model, FlowMatchEulerDiscreteScheduler(shift=shift))
    ref = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, guidance_scale=1.0, num_inference_steps=5,
               height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))  # = the pipeline's latents
    grid = scheduler_sigmas(FlowMatchEulerDiscreteScheduler(shift=shift), 5)
    assert grid[0] == 1 and grid[-1] == 0 and grid.numel() == 6
    with torch.no_grad():
        ours = solve(SD3Adapter(model), noise, grid, "euler", cond=TextCondition(pe, pp)).x
    assert ref.abs().max() > 0.5  # a non-trivial sample
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # the same condition as a dict, batch-1 broadcast, and through adapt_teacher
    field = adapt_teacher(model, default_cond={"prompt_embeds": pe[:1], "pooled_prompt_embeds": pp[:1]})
    x, t = torch.randn(2, 4, 4, 4), torch.full((2,), 0.3)
    with torch.no_grad():
        full = TextCondition(pe[:1].expand(2, 7, 32), pp[:1].expand(2, 64))
        torch.testing.assert_close(field(x, t), SD3Adapter(model)(x, t, cond=full))


def test_text_cfg_matches_sd3_pipeline_guidance():
    model = tiny_sd3()
    pe, pp, ne, npool = torch.randn(2, 7, 32), torch.randn(2, 64), torch.randn(1, 7, 32), torch.randn(1, 64)
    pipe = sd3_pipe(model, FlowMatchEulerDiscreteScheduler(shift=3.0))
    ref = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne.expand(2, 7, 32),
               negative_pooled_prompt_embeds=npool.expand(2, 64), guidance_scale=4.5, num_inference_steps=3,
               height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    grid = scheduler_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), 3)
    negative = {"prompt_embeds": ne, "pooled_prompt_embeds": npool}
    field = TextCFGField(SD3Adapter(model), 4.5, negative=negative)
    with torch.no_grad():
        ours = solve(field, noise, grid, "euler", cond=TextCondition(pe, pp)).x
        unguided = solve(SD3Adapter(model), noise, grid, "euler", cond=TextCondition(pe, pp)).x
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (unguided - ref).abs().max() > 1e-2


def test_flux_adapter_matches_flux_pipeline_with_dynamic_shift_and_guidance():
    model = tiny_flux()
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(transformer=model, scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    pe, pp = torch.randn(2, 7, 32), torch.randn(2, 32)
    ref = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, num_inference_steps=4, guidance_scale=2.5,
               height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    ref = unpack_latents(ref, 4, 4)  # the pipeline returns packed latents
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    mu = calculate_shift(4, 256, 4096, 0.5, 1.15)  # 4 packed tokens
    grid = scheduler_sigmas(FlowMatchEulerDiscreteScheduler.from_config(sched.config),
                            sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    with torch.no_grad():
        cond = TextCondition(pe, pp)
        ours = solve(FluxAdapter(model, guidance_scale=2.5), noise, grid, "euler", cond=cond).x
        other = solve(FluxAdapter(model, guidance_scale=7.0), noise, grid, "euler", cond=cond).x
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (other - ref).abs().max() > 1e-3  # the guidance embedding is really used


def test_flux_packing_roundtrip_and_layout():
    x = torch.randn(2, 3, 4, 6)
    p = pack_latents(x)
    assert p.shape == (2, 6, 12)
    torch.testing.assert_close(unpack_latents(p, 4, 6), x, atol=0, rtol=0)
    # token 1 is the 2x2 patch at rows 0-1, columns 2-3, channel-major
    torch.testing.assert_close(p[:, 1].reshape(2, 3, 2, 2), x[:, :, 0:2, 2:4], atol=0, rtol=0)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 3, 3, 4))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_unet_adapter_euler_matches_ddim(prediction_type, spacing):
    """DDIM (η = 0) is Euler on the linear path: same UNet, same noise, matching grid."""
    unet = tiny_unet()
    ddim = DDIMScheduler(clip_sample=False, prediction_type=prediction_type, set_alpha_to_one=True,
                         timestep_spacing=spacing)
    ddim.set_timesteps(10)
    adapter = DDPMUNetAdapter(unet, ddim)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = noise.clone()
    with torch.no_grad():
        for k in ddim.timesteps:
            x = ddim.step(unet(x, k).sample, k, x).prev_sample
        grid = adapter.time_grid(ddim)
        assert grid[-1] == 0 and (grid[:-1] > grid[1:]).all()
        start = adapter.to_linear(noise, grid[:1].expand(3))
        ours = solve(adapter, start, grid, "euler").x
    scale = x.abs().max()  # ε-prediction with random weights gives |x̂0| ~ 1/α_T ≈ 100s
    assert (ours - x).abs().max() <= 1e-4 * max(1.0, scale.item()), (ours - x).abs().max()


def test_unet_adapter_time_mapping():
    unet = tiny_unet()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ad = DDPMUNetAdapter(unet, sched.config)  # a config mapping works too
    k = torch.tensor([0, 10, 500, 999])
    t = ad.t_of_timestep(k)
    assert (t[1:] > t[:-1]).all() and 0 < t[0] < 0.05 and 0.9 < t[-1] < 1
    torch.testing.assert_close(ad.timestep_of_t(t.float()), k.double())  # snapped back to integers
    mid = 0.5 * (t[2] + ad.t_of_timestep(torch.tensor([501]))[0])
    assert 500.3 < ad.timestep_of_t(mid.reshape(1)).item() < 500.7  # fractional in between
    assert ad.timestep_of_t(torch.tensor([1.0])).item() == 999  # clamped
    a, s = ad.vp_coefficients(t)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(a))
    torch.testing.assert_close(a, sched.alphas_cumprod[k].double().sqrt(), atol=1e-6, rtol=0)
    rounded = DDPMUNetAdapter(unet, sched, timestep_mode="round")
    assert rounded.timestep_of_t(mid.reshape(1)).item() in (500, 501)


def test_conditional_unet_adapter_uses_text_condition():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                layers_per_block=1, cross_attention_dim=16, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                attention_head_dim=4).eval()
    ad = adapt_teacher(unet, scheduler_config=DDIMScheduler(prediction_type="v_prediction"))
    assert isinstance(ad, DDPMUNetAdapter) and ad.prediction_type == "v_prediction"
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    with torch.no_grad():
        v1 = ad(x, t, cond=TextCondition(torch.randn(1, 5, 16)))
        v2 = ad(x, t, cond=TextCondition(torch.randn(1, 5, 16)))
    assert v1.shape == x.shape and (v1 - v2).abs().max() > 1e-4
    with pytest.raises(ValueError, match="needs a text condition"):
        ad(x, t)


def test_class_conditional_unet_adapter():
    unet = tiny_unet(num_class_embeds=3)
    ad = DDPMUNetAdapter(unet, DDIMScheduler())
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.4)
    with torch.no_grad():
        assert (ad(x, t, cond=torch.tensor([0, 0])) - ad(x, t, cond=torch.tensor([2, 2]))).abs().max() > 1e-5


def test_clear_errors():
    unet = tiny_unet()
    assert set(TEACHER_ADAPTERS.names()) == {"ddpm_unet", "flux", "sd3"}
    with pytest.raises(ValueError, match=r"no teacher adapter for Linear; supported diffusers classes: "
                                         r"FluxTransformer2DModel, SD3Transformer2DModel, "
                                         r"UNet2DConditionModel, UNet2DModel"):
        adapt_teacher(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="adapter 'sd3' does not support UNet2DModel; it supports "
                                         "SD3Transformer2DModel"):
        adapt_teacher(unet, adapter="sd3")
    with pytest.raises(ValueError, match="unsupported prediction_type 'flow'; supported: epsilon, "
                                         "v_prediction, sample"):
        DDPMUNetAdapter(unet, DDIMScheduler(), prediction_type="flow")
    with pytest.raises(ValueError, match="need their scheduler config"):
        DDPMUNetAdapter(unet)
    with pytest.raises(KeyError, match="available: ddpm_unet, flux, sd3"):
        adapt_teacher(unet, adapter="nope")
    sd3 = SD3Adapter(tiny_sd3())
    with pytest.raises(ValueError, match="needs a text condition"):
        sd3(torch.randn(1, 4, 4, 4), torch.ones(1))
    with pytest.raises(ValueError, match="needs pooled_prompt_embeds"):
        sd3(torch.randn(1, 4, 4, 4), torch.ones(1), cond={"prompt_embeds": torch.randn(1, 7, 32)})
    with pytest.raises(ValueError, match="unknown condition keys"):
        sd3(torch.randn(1, 4, 4, 4), torch.ones(1), cond={"text": torch.randn(1, 7, 32)})
