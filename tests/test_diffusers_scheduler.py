"""FlowDistillScheduler: grids, config round trip, the jump update, use inside StableDiffusion3Pipeline,
and interop with diffusers' own FlowMapEulerDiscreteScheduler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMapEulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline

from flowdistill.core.flowmap import sample_flow_map
from flowdistill.core.solvers import solve
from flowdistill.core.timesteps import build_grid
from flowdistill.integrations.diffusers import (
    FlowDistillScheduler,
    FluxAdapter,
    SD3Adapter,
    TextCondition,
    calculate_shift,
    unpack_latents,
)
from flowdistill.models import MLPFlowNet
from tests.test_diffusers_adapters import sd3_pipe, tiny_flux, tiny_sd3


@pytest.mark.parametrize("n", [1, 3, 4])
def test_grids_match_our_time_grids(n):
    s = FlowDistillScheduler()
    s.set_timesteps(n)
    torch.testing.assert_close(s.sigmas, build_grid("uniform", n), atol=1e-7, rtol=0)
    torch.testing.assert_close(s.timesteps, s.sigmas[:-1] * 1000)
    k = FlowDistillScheduler(shift=3.0)
    k.set_timesteps(n)
    torch.testing.assert_close(k.sigmas, build_grid("shifted", n, shift=3.0), atol=1e-7, rtol=0)
    # pipelines such as Flux pass sigmas = linspace(1, 1/N, N): the same grid
    k.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))
    torch.testing.assert_close(k.sigmas, build_grid("shifted", n, shift=3.0), atol=1e-7, rtol=0)
    k.set_timesteps(timesteps=[1000.0, 250.0][: min(n, 2)])  # timesteps: used as given
    assert k.sigmas.tolist()[-1] == 0 and k.sigmas[0] == 1


def test_dynamic_shift_and_config_roundtrip(tmp_path):
    s = FlowDistillScheduler(use_dynamic_shifting=True, base_shift=0.4, max_shift=1.2,
                             time_shift_type="linear", shift=2.0)
    with pytest.raises(ValueError, match="mu must be passed"):
        s.set_timesteps(2)
    mu = calculate_shift(1024, 256, 4096, 0.4, 1.2)
    s.set_timesteps(2, mu=mu)
    assert abs(s.sigmas[1].item() - mu / (mu + 1.0)) < 1e-6  # linear shift of σ = 1/2
    s.save_config(tmp_path)
    r = FlowDistillScheduler.from_pretrained(tmp_path)
    for key in ("use_dynamic_shifting", "base_shift", "max_shift", "time_shift_type", "shift"):
        assert r.config[key] == s.config[key]
    r.set_timesteps(2, mu=mu)
    torch.testing.assert_close(r.sigmas, s.sigmas)
    # a flow pipeline's scheduler config converts (unknown keys ignored, shift kept)
    c = FlowDistillScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert c.config.shift == 3.0 and c.order == 1 and c.init_noise_sigma == 1.0


def test_step_is_the_flow_map_jump_and_errors():
    s = FlowDistillScheduler(shift=3.0)
    s.set_timesteps(2)
    x, u = torch.randn(3, 5), torch.randn(3, 5)
    assert s.scale_model_input(x, s.timesteps[0]) is x
    t0, s0 = s.sigma_pair(s.timesteps[0])
    y = s.step(u, s.timesteps[0], x).prev_sample
    torch.testing.assert_close(y, x + (s0 - t0) * u)
    t1, s1 = s.sigma_pair()
    assert t1 == s0 and s1 == 0
    (z,) = s.step(u, s.timesteps[1], y, return_dict=False)
    torch.testing.assert_close(z, y - t1 * u)
    with pytest.raises(ValueError, match="not an integer index"):
        s.step(u, 0, x)
    with pytest.raises(ValueError, match="positive integer"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="must decrease"):
        s.set_timesteps(sigmas=[0.5, 0.7])
    with pytest.raises(ValueError, match="not on the schedule"):
        s.index_for_timestep(123.0)
    noisy = s.scale_noise(torch.zeros(3, 5), s.timesteps[:1].expand(3), torch.ones(3, 5))
    torch.testing.assert_close(noisy, torch.ones(3, 5))  # σ_0 = 1: pure noise


@pytest.mark.parametrize("n", [1, 2, 4])
def test_runs_inside_stable_diffusion3_pipeline(n):
    """The diffusers SD3 pipeline with our scheduler = our Euler solver on the scheduler's grid."""
    model = tiny_sd3()
    sched = FlowDistillScheduler(shift=3.0)
    pipe = sd3_pipe(model, sched)
    pe, pp = torch.randn(2, 7, 32), torch.randn(2, 64)
    out = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, guidance_scale=1.0, num_inference_steps=n,
               height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert len(sched.timesteps) == n and sched.step_index == n
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = solve(SD3Adapter(model), noise, build_grid("shifted", n, shift=3.0), "euler",
                     cond=TextCondition(pe, pp)).x
    torch.testing.assert_close(out, ours, atol=1e-5, rtol=0)


def test_runs_inside_flux_pipeline_with_dynamic_shift():
    model = tiny_flux()
    sched = FlowDistillScheduler(use_dynamic_shifting=True)
    pipe = FluxPipeline(transformer=model, scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    pe, pp = torch.randn(2, 7, 32), torch.randn(2, 32)
    out = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, num_inference_steps=2, guidance_scale=3.0,
               height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    mu = calculate_shift(4)  # 4 packed tokens, the scheduler's default shift range
    ref_sched = FlowDistillScheduler(use_dynamic_shifting=True)
    ref_sched.set_timesteps(2, mu=mu)
    torch.testing.assert_close(sched.sigmas, ref_sched.sigmas)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = solve(FluxAdapter(model, guidance_scale=3.0), noise, ref_sched.sigmas.double(), "euler",
                     cond=TextCondition(pe, pp)).x
    torch.testing.assert_close(unpack_latents(out, 4, 4), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_flow_map_student_interop_with_diffusers_flow_map_euler(n):
    """diffusers' FlowMapEulerDiscreteScheduler steps x − (σ_t − σ_r)·u = X(x, t, r): our flow-map student
    (time = σ, target = σ_r) sampled with it equals our own sampler."""
    torch.manual_seed(0)
    student = MLPFlowNet(data_dim=2, hidden=32, depth=2, two_time=True).eval()
    torch.nn.init.normal_(student.in_r.weight, std=0.3)  # make u depend on s
    noise = torch.randn(64, 2)
    fm = FlowMapEulerDiscreteScheduler()
    fm.set_timesteps(n)
    x = noise
    with torch.no_grad():
        for i, ts in enumerate(fm.timesteps):
            r = fm.sigmas[i + 1] * fm.config.num_train_timesteps
            t_vec = (ts / fm.config.num_train_timesteps).float().expand(64)
            r_vec = (r / fm.config.num_train_timesteps).float().expand(64)
            x = fm.step(student(x, t_vec, r_vec), ts, x, r_timestep=r).prev_sample
        ours = sample_flow_map(student, noise, n)
    torch.testing.assert_close(x, ours, atol=1e-5, rtol=0)
    if n > 1:  # and s really matters: telling the student s = t changes the result
        with torch.no_grad():
            wrong = noise
            for i in range(n):
                t_vec = fm.sigmas[i].float().expand(64)
                wrong = wrong + (fm.sigmas[i + 1] - fm.sigmas[i]).float() * student(wrong, t_vec, t_vec)
        assert (wrong - ours).abs().max() > 1e-3
