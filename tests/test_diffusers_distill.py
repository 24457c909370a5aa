"""Distilling tiny diffusers teachers: FreeFlow with a DDPM UNet teacher behind its adapter, and a LoRA
student of a tiny SD3 transformer trained and round-tripped through `load_lora_weights`."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from flowdistill.core.rng import StepRNG
from flowdistill.core.solvers import solve
from flowdistill.core.timesteps import build_grid
from flowdistill.distillers.freeflow import FreeFlow, FreeFlowConfig
from flowdistill.integrations.diffusers import FlowDistillScheduler, SD3Adapter, TextCondition, adapt_teacher
from flowdistill.models import UNetFlowNet
from tests.test_diffusers_adapters import sd3_pipe, tiny_sd3, tiny_unet


def _student() -> UNetFlowNet:
    torch.manual_seed(1)
    return UNetFlowNet(sample_size=8, in_channels=1, base_channels=8, norm_groups=4, attention=False,
                       two_time=True)


def _run(distiller: FreeFlow, batch: dict, steps: int, lr: float) -> list[dict[str, float]]:
    """``steps`` updates on a fixed batch with fixed randomness; the student group's losses per step."""
    groups = distiller.optim_groups(lr)
    opts = {g.name: torch.optim.Adam(g.params, lr=g.lr) for g in groups}
    hist = []
    for _ in range(steps):
        for g in groups:
            for _ in range(g.repeats):
                out = distiller.loss(batch, 0, g.name, StepRNG(0, 0))
                opts[g.name].zero_grad()
                out["loss"].backward()
                opts[g.name].step()
                if g.name == "student":
                    hist.append({k: float(v.detach()) for k, v in out.items()})
    return hist


def test_freeflow_distils_a_diffusers_unet_teacher():
    unet = tiny_unet()
    teacher = adapt_teacher(unet, scheduler_config=DDIMScheduler(prediction_type="v_prediction"))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    batch = {"noise": torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))}
    cfg = FreeFlowConfig(mode="prediction", adaptive_p=0.0)
    cfg.validate()
    hist = _run(FreeFlow(cfg, _student(), teacher), batch, steps=12, lr=3e-3)
    losses = [h["loss"] for h in hist]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
    # with the correction: the fake-velocity net is a trainable copy of the diffusers adapter
    cfg = FreeFlowConfig(mode="both", adaptive_p=0.0, correction_warmup=0)
    d = FreeFlow(cfg, _student(), teacher)
    assert [g.name for g in d.optim_groups(1e-3)] == ["fake", "student"]
    hist = _run(d, batch, steps=2, lr=1e-3)
    assert all(torch.isfinite(torch.tensor(v)) for h in hist for v in h.values()) and "corr" in hist[-1]
    assert any((p != before[k]).any() for k, p in d.fake.model.state_dict().items())  # ψ trained
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())  # teacher frozen


def test_lora_student_roundtrip_through_load_lora_weights(tmp_path):
    pytest.importorskip("peft")
    from flowdistill.integrations.diffusers.lora import add_lora, lora_parameters, save_lora

    base = tiny_sd3()
    cond = TextCondition(torch.randn(1, 7, 32), torch.randn(1, 64))
    student_tf = add_lora(base, rank=4, copy_model=True)
    teacher, student = SD3Adapter(base, default_cond=cond), SD3Adapter(student_tf, default_cond=cond)
    x, t = torch.randn(4, 4, 4, 4), torch.rand(4)
    with torch.no_grad():
        torch.testing.assert_close(student(x, t), teacher(x, t))  # B = 0: starts as the teacher
        target = 0.5 * teacher(x, t)
    params = lora_parameters(student_tf)
    trainable = [n for n, p in student_tf.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n in trainable) and len(trainable) == len(params)
    frozen = {k: v.clone() for k, v in student_tf.state_dict().items() if "lora_" not in k}
    opt = torch.optim.Adam(params, lr=3e-2)
    losses = []
    for _ in range(8):
        loss = (student(x, t) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(v, frozen[k]) for k, v in student_tf.state_dict().items() if "lora_" not in k)

    path = save_lora(student_tf, tmp_path / "lora")
    assert path.is_file()
    pipe = sd3_pipe(tiny_sd3(), FlowDistillScheduler(shift=3.0))  # a fresh base transformer
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        want = student(x, t)
        got = SD3Adapter(pipe.transformer, default_cond=cond)(x, t)
        assert (want - teacher(x, t)).abs().max() > 1e-3  # the adapters changed the model
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # and the LoRA'd pipeline samples as our solver on the trained student
    c2 = cond.batched(2)
    out = pipe(prompt_embeds=c2.prompt_embeds, pooled_prompt_embeds=c2.pooled_prompt_embeds,
               guidance_scale=1.0, num_inference_steps=2, height=32, width=32, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = solve(student, noise, build_grid("shifted", 2, shift=3.0), "euler").x
    torch.testing.assert_close(out, ours, atol=1e-5, rtol=0)


def test_lora_errors():
    pytest.importorskip("peft")
    from flowdistill.integrations.diffusers.lora import add_lora, save_lora

    with pytest.raises(ValueError, match="no peft adapter support"):
        add_lora(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no module of SD3Transformer2DModel matched"):
        add_lora(tiny_sd3(), target_modules=["nope"])
    with pytest.raises(ValueError, match="call add_lora first"):
        save_lora(tiny_sd3(), "unused")
