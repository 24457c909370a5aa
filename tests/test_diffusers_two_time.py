"""Two-time students of diffusers models (second time embedding): exact identity with the teacher at
step 0 for SD3, Flux and UNet2DCondition tiny models; they learn an s-dependent target; the extra
weights round-trip through safetensors; with a LoRA only LoRA + embedding weights train."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from flowdistill.integrations.diffusers import TextCondition, adapt_teacher
from flowdistill.integrations.diffusers.two_time import (
    TwoTimeStudent,
    add_second_time,
    load_second_time,
    save_second_time,
    second_time_parameters,
)
from tests.test_diffusers_adapters import tiny_flux, tiny_sd3, tiny_unet


def tiny_cond_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, cross_attention_dim=32, norm_num_groups=4,
                                attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


# name -> (builder, adapter keywords, latent shape [C, H, W], condition of batch b)
CASES = {
    "sd3": (tiny_sd3, {}, (4, 4, 4), lambda b: TextCondition(torch.randn(b, 7, 32), torch.randn(b, 64))),
    "flux": (tiny_flux, {}, (4, 4, 4), lambda b: TextCondition(torch.randn(b, 7, 32), torch.randn(b, 32))),
    "unet_cond": (tiny_cond_unet, {"scheduler_config": DDIMScheduler()}, (4, 8, 8),
                  lambda b: TextCondition(torch.randn(b, 5, 32))),
    "unet": (tiny_unet, {"scheduler_config": DDIMScheduler()}, (1, 8, 8), lambda b: None),
}


def _inputs(case: str, b: int = 3, seed: int = 1):
    torch.manual_seed(seed)
    _, _, shape, cond = CASES[case]
    return torch.randn(b, *shape), torch.rand(b) * 0.8 + 0.1, cond(b)


@pytest.mark.parametrize("case", list(CASES))
def test_identity_at_init_is_exact(case):
    """u(x, t, s) = v(x, t) bit for bit at step 0, for s = t and for any other s (zero last layer)."""
    build, kw, _, _ = CASES[case]
    model = build()
    x, t, cond = _inputs(case)
    with torch.no_grad():
        v = adapt_teacher(model, **kw)(x, t, cond=cond)
        student = add_second_time(model, **kw)
        assert isinstance(student, TwoTimeStudent)
        for s in (t, torch.zeros_like(t), t * 0.3, None):
            assert torch.equal(student(x, t, s, cond=cond), v)
        # the bare adapter of the changed model is u(x, t, t)
        assert torch.equal(adapt_teacher(model, **kw)(x, t, cond=cond), v)


def test_identity_at_init_bf16_with_checkpointing_and_cfg_batch():
    """bf16 weights and gradient checkpointing keep the exact identity; a doubled (CFG) batch
    repeats t − s."""
    model = tiny_sd3().to(torch.bfloat16)
    model.enable_gradient_checkpointing()
    x, t, cond = _inputs("sd3")
    with torch.no_grad():
        v = adapt_teacher(model)(x, t, cond=cond)
        student = add_second_time(model)
        assert student.embedding.mlp.linear_1.weight.dtype == torch.bfloat16
        assert torch.equal(student(x, t, t * 0.5, cond=cond), v)
        with student.embedding.delta(t * 0.5):  # the hook repeats [B] -> [2B]
            two = student.adapter(torch.cat([x, x]), torch.cat([t, t]),
                                  cond=TextCondition(torch.cat([cond.prompt_embeds] * 2),
                                                     torch.cat([cond.pooled_prompt_embeds] * 2)))
        assert torch.equal(two, torch.cat([v, v]))


def _train(student, params, case, steps=30, lr=3e-3):
    """Adam on the toy target u* = v_teacher(x, t) + 2·(t − s) (depends on s); returns (first, last) loss."""
    x, t, cond = _inputs(case, b=4, seed=2)
    s = t * torch.tensor([0.0, 0.25, 0.5, 0.75])
    with torch.no_grad():
        target = student(x, t, t, cond=cond) + 2.0 * (t - s).view(-1, 1, 1, 1)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = (student(x, t, s, cond=cond) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1], (x, t, cond)


@pytest.mark.parametrize("case, ratio, checkpointing", [("sd3", 0.5, True), ("unet_cond", 0.9, False)])
def test_learns_an_s_dependent_target(case, ratio, checkpointing):
    """Training only the new embedding (teacher frozen) lowers the loss and makes u depend on s; frozen
    teacher weights do not move. The tiny UNet reaches less (its resnets GroupNorm the embedding's
    per-channel shift: the loss plateaus near 0.8x its start) than the transformer's AdaLN path (< 0.5x)."""
    build, kw, _, _ = CASES[case]
    model = build().train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.requires_grad_(False)
    student = add_second_time(model, **kw)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "flowdistill_second_time" not in k}
    steps = 30 if checkpointing else 15
    first, last, (x, t, cond) = _train(student, second_time_parameters(model), case, steps=steps)
    assert last < ratio * first, (first, last)
    with torch.no_grad():
        gap = (student(x, t, t, cond=cond) - student(x, t, torch.zeros_like(t), cond=cond)).abs().max()
    assert gap > 1e-2  # the output now depends on s
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())


@pytest.mark.parametrize("case", ["sd3", "flux", "unet_cond"])
def test_save_load_round_trip_is_exact(case, tmp_path):
    build, kw, _, _ = CASES[case]
    model = build()
    student = add_second_time(model, delta_time_scale=10.0, **kw)
    with torch.no_grad():
        for p in second_time_parameters(model):
            p.normal_(0, 0.1)  # a non-trivial embedding
    path = save_second_time(student, tmp_path)
    assert path.name == "second_time.safetensors"
    fresh = build()  # same seed: the same teacher weights
    emb = load_second_time(fresh, tmp_path)
    assert emb.settings["delta_time_scale"] == 10.0
    loaded = TwoTimeStudent(adapt_teacher(fresh, **kw))
    x, t, cond = _inputs(case)
    s = t * 0.25
    with torch.no_grad():
        a, b = student(x, t, s, cond=cond), loaded(x, t, s, cond=cond)
        assert torch.equal(a, b)
        assert (a - student(x, t, t, cond=cond)).abs().max() > 1e-4  # the loaded weights matter
    with pytest.raises(ValueError, match="saved from a"):
        load_second_time(tiny_sd3() if case != "sd3" else tiny_flux(), tmp_path)


def test_lora_plus_second_time_trains_only_lora_and_embedding():
    """LoRA first (peft freezes the rest), then the second time: exactly the LoRA and embedding weights
    require grad, only they change in training, and the loss falls."""
    pytest.importorskip("peft")
    from flowdistill.integrations.diffusers.lora import add_lora, lora_parameters

    model = add_lora(tiny_sd3().train(), rank=4)
    model.enable_gradient_checkpointing()
    student = add_second_time(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("flowdistill_second_time.") for n in trainable)
    assert any(n.startswith("flowdistill_second_time.") for n in trainable)
    assert len(trainable) == len(lora_parameters(model)) + len(second_time_parameters(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    first, last, _ = _train(student, params, "sd3", steps=20)
    assert last < 0.5 * first, (first, last)
    for n, p in model.named_parameters():
        if n not in trainable:
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("scale, falls", [(5.0, True), (1000.0, False)])
def test_freeflow_prediction_trains_a_two_time_lora_student(scale, falls):
    """FreeFlow (finite-difference ∂_s u) distils the tiny SD3 teacher into a two-time LoRA student:
    with the default scale 5 of the t − s features the prediction MSE falls by > 25 % in 12 steps on
    a fixed batch; with 1000 (the teacher's own timestep range) it grows (module docstring)."""
    pytest.importorskip("peft")
    from flowdistill.core.rng import StepRNG
    from flowdistill.distillers.freeflow import FreeFlow, FreeFlowConfig
    from flowdistill.integrations.diffusers.lora import add_lora, lora_parameters

    base = tiny_sd3()
    student = add_second_time(add_lora(base, rank=4, copy_model=True).train(), delta_time_scale=scale)
    g = torch.Generator().manual_seed(0)
    batch = {"noise": torch.randn(8, 4, 4, 4, generator=g),
             "cond": {"prompt_embeds": torch.randn(8, 7, 32, generator=g),
                      "pooled_prompt_embeds": torch.randn(8, 64, generator=g)}}
    cfg = FreeFlowConfig(mode="prediction", adaptive_p=0.0, derivative="fd")
    cfg.validate()
    distiller = FreeFlow(cfg, student, adapt_teacher(base))
    (group,) = distiller.optim_groups(1e-3)
    expected = lora_parameters(student.model) + second_time_parameters(student.model)
    assert {id(p) for p in group.params} == {id(p) for p in expected}  # LoRA + embedding only
    opt = torch.optim.Adam(group.params, lr=group.lr)
    mse = []
    for step in range(12):
        out = distiller.loss(batch, step, "student", StepRNG(0, 0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        mse.append(float(out["pred_mse"]))
    assert all(torch.isfinite(torch.tensor(mse)))
    if falls:
        assert mse[-1] < 0.75 * mse[0], mse
    else:
        assert mse[-1] > mse[0], mse


def test_deepcopy_carries_its_own_embedding():
    """A deep copy (e.g. FreeFlow's fake net) has its own embedding, hooked into its own model."""
    student = add_second_time(tiny_sd3())
    twin = copy.deepcopy(student)
    with torch.no_grad():
        for p in second_time_parameters(twin):
            p.normal_(0, 0.1)
    x, t, cond = _inputs("sd3")
    with torch.no_grad():
        s = t * 0.5
        assert torch.equal(student(x, t, s, cond=cond), student(x, t, t, cond=cond))  # still untrained
        assert not torch.equal(twin(x, t, s, cond=cond), student(x, t, s, cond=cond))


def test_clear_errors():
    with pytest.raises(ValueError, match="supported diffusers classes"):
        add_second_time(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Fourier|time projection"):
        add_second_time(tiny_unet(time_embedding_type="fourier"), scheduler_config=DDIMScheduler())
    student = add_second_time(tiny_sd3())
    x, t, cond = _inputs("sd3")
    with pytest.raises(ValueError, match="shape of t"):
        student(x, t, t[:2], cond=cond)
    with pytest.raises(ValueError, match="no second time"):
        TwoTimeStudent(adapt_teacher(tiny_sd3()))
