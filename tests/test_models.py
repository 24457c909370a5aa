"""Reference networks: call contract, conditioning, two-time init, save/load, validation, JVP."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from flowdistill.core.registry import UnknownNameError
from flowdistill.errors import ConfigError
from flowdistill.models import MODELS, DiTFlowNet, MLPFlowNet, UNetFlowNet, build_model, init_from
from flowdistill.models.embeddings import sinusoidal_embedding
from tests.helpers import single_thread  # noqa: F401  (autouse: one intra-op thread)

B = 4
NC = 3

# Tiny sizes so the whole file runs in seconds on a CPU.
SPECS = {
    "mlp": (dict(data_dim=2, hidden=32, depth=3, time_embed_dim=16), (2,)),
    "unet": (dict(sample_size=8, in_channels=2, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                  attention=True, attention_heads=2, norm_groups=4), (2, 8, 8)),
    "dit": (dict(sample_size=8, in_channels=2, patch_size=2, hidden=32, depth=2, heads=2, freq_dim=32),
            (2, 8, 8)),
}
NAMES = list(SPECS)



def make(name: str, **extra) -> nn.Module:
    """A tiny net of kind ``name`` (seeded)."""
    torch.manual_seed(0)
    cfg, _ = SPECS[name]
    return build_model(name, **{**cfg, **extra})


def inputs(name: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``x``, ``t``, ``s <= t`` for net kind ``name``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *SPECS[name][1], generator=g)
    t = torch.rand(B, generator=g)
    s = t * torch.rand(B, generator=g)
    return x, t, s


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.1, only: str | None = None) -> nn.Module:
    """Add noise to all parameters (or those whose name contains ``only``) so that zero-initialised
    layers no longer hide the behaviour under test."""
    g = torch.Generator().manual_seed(123)
    for n, p in model.named_parameters():
        if only is None or only in n:
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def test_registry_names_and_errors():
    assert {"mlp", "unet", "dit"} <= set(MODELS.names())
    assert isinstance(build_model("mlp"), MLPFlowNet)
    assert isinstance(build_model("unet", **SPECS["unet"][0]), UNetFlowNet)
    assert isinstance(build_model("dit", **SPECS["dit"][0]), DiTFlowNet)
    with pytest.raises(UnknownNameError, match="available"):
        build_model("resnet")
    with pytest.raises(ConfigError, match="no_such_arg"):
        build_model("mlp", no_such_arg=1)
    with pytest.raises(ConfigError, match="divisible"):
        build_model("dit", sample_size=10, patch_size=4)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("two_time", [False, True])
@pytest.mark.parametrize("conditional", [False, True])
def test_output_shape_and_dtype(name, two_time, conditional):
    net = make(name, two_time=two_time, num_classes=NC if conditional else 0)
    x, t, s = inputs(name)
    cond = torch.tensor([0, 1, 2, NC]) if conditional else None
    for args in [dict(), dict(s=s), dict(cond=cond), dict(s=s, cond=cond)]:
        y = net(x, t, **args)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
def test_one_time_net_ignores_s_and_two_time_net_reads_it(name):
    x, t, s = inputs(name)
    one = perturb(make(name))
    assert torch.equal(one(x, t, s), one(x, t))
    two = perturb(make(name, two_time=True))
    assert not torch.allclose(two(x, t, s), two(x, t), atol=1e-5)
    assert torch.equal(two(x, t, t), two(x, t))  # s = None means s = t


@pytest.mark.parametrize("name", NAMES)
def test_delta_time_scale_only_changes_the_s_branch(name):
    a = perturb(make(name, two_time=True))
    b = make(name, two_time=True, delta_time_scale=5.0)
    b.load_state_dict(a.state_dict())
    x, t, s = inputs(name)
    assert torch.equal(a(x, t), b(x, t))  # t − s = 0: the same features at any scale
    assert not torch.allclose(a(x, t, s), b(x, t, s), atol=1e-5)
    with pytest.raises(ConfigError, match="delta_time_scale"):
        build_model(name, **SPECS[name][0], two_time=True, delta_time_scale=0.0)


@pytest.mark.parametrize("name", NAMES)
def test_class_conditioning(name):
    net = perturb(make(name, num_classes=NC))
    x, t, _ = inputs(name)
    y0 = net(x, t, cond=torch.zeros(B, dtype=torch.long))
    y1 = net(x, t, cond=torch.ones(B, dtype=torch.long))
    assert (y0 - y1).abs().amax(dim=tuple(range(1, x.ndim))).min() > 1e-4  # every sample changes
    y_null = net(x, t, cond=torch.full((B,), NC))
    assert torch.equal(net(x, t), y_null)  # cond=None is the null label
    assert not torch.allclose(y_null, y0, atol=1e-5)
    # unconditional nets have no label table and ignore cond
    plain = make(name)
    assert not any("class_embed" in k for k in plain.state_dict())
    assert torch.equal(plain(x, t, cond=torch.zeros(B, dtype=torch.long)), plain(x, t))


@pytest.mark.parametrize("name", NAMES)
def test_two_time_student_from_one_time_teacher_equals_teacher(name):
    teacher = perturb(make(name, num_classes=NC))
    torch.manual_seed(7)  # different init for the student
    cfg, _ = SPECS[name]
    student = build_model(name, **cfg, num_classes=NC, two_time=True)
    result = student.load_state_dict(teacher.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys
    assert all(("time_embed2" in k) or ("in_r" in k) for k in result.missing_keys)
    x, t, s = inputs(name)
    cond = torch.tensor([0, 1, NC, 2])
    v = teacher(x, t, cond=cond)
    assert v.abs().max() > 1e-3  # a non-trivial teacher
    for ss in (s, torch.zeros(B), t):
        torch.testing.assert_close(student(x, t, ss, cond=cond), v, rtol=0, atol=1e-6)

    torch.manual_seed(8)
    student2 = build_model(name, **cfg, num_classes=NC, two_time=True)
    report = init_from(student2, teacher)
    assert report.missing == result.missing_keys and len(report.copied) == len(teacher.state_dict())
    torch.testing.assert_close(student2(x, t, torch.zeros(B), cond=cond), v, rtol=0, atol=1e-6)


def test_init_from_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="shape mismatch"):
        init_from(MLPFlowNet(hidden=32, two_time=True), MLPFlowNet(hidden=16))


def _public(config) -> dict:
    """Config values without diffusers' private keys, lists normalised to tuples."""
    items = dict(config).items()
    return {k: tuple(v) if isinstance(v, list) else v for k, v in items if not k.startswith("_")}


@pytest.mark.parametrize("name", NAMES)
def test_save_load_roundtrip(name, tmp_path):
    net = perturb(make(name, num_classes=NC, two_time=True)).eval()
    net.save_pretrained(tmp_path / name)
    assert (tmp_path / name / "diffusion_pytorch_model.safetensors").is_file()
    cls = type(net)
    loaded = cls.from_pretrained(tmp_path / name, local_files_only=True).eval()
    assert type(loaded) is cls
    assert _public(loaded.config) == _public(net.config)
    x, t, s = inputs(name)
    cond = torch.tensor([2, 1, 0, NC])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, s, cond=cond), net(x, t, s, cond=cond))


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise_value_error(name):
    net = make(name, num_classes=NC, two_time=True)
    x, t, s = inputs(name)
    bad_x = x[..., :-1] if name == "mlp" else x[:, :1]
    with pytest.raises(ValueError, match=r"expected x of shape .*got \["):
        net(bad_x, t)
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        net(x, t[:, None])
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        net(x, t[:-1])
    with pytest.raises(ValueError, match=r"s must have shape \[B\]"):
        net(x, t, s[:2])
    with pytest.raises(ValueError, match="cond"):
        net(x, t, cond=torch.zeros(B, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="cond"):
        net(x, t, cond=torch.zeros(B))  # float labels
    with pytest.raises(ValueError, match=r"cond labels must lie in \[0, 3\]"):
        net(x, t, cond=torch.tensor([0, 1, 2, NC + 1]))


def test_image_net_specific_shapes():
    unet = make("unet")
    assert unet(torch.randn(2, 2, 16, 8), torch.rand(2)).shape == (2, 2, 16, 8)  # any size divisible by 2
    with pytest.raises(ValueError, match="divisible by 2"):
        unet(torch.randn(2, 2, 7, 8), torch.rand(2))
    dit = make("dit")
    with pytest.raises(ValueError, match=r"expected x of shape \[B, 2, 8, 8\]"):
        dit(torch.randn(2, 2, 16, 16), torch.rand(2))


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    net = perturb(make(name, num_classes=NC, two_time=True))
    x, t, s = inputs(name)
    x.requires_grad_(True)
    t.requires_grad_(True)
    out = net(x, t, s, cond=torch.tensor([0, 1, 2, NC]))
    out.pow(2).mean().backward()
    for n, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"no gradient reaches {n}"
    assert x.grad.abs().sum() > 0 and t.grad.abs().sum() > 0


def test_fresh_zero_init_outputs():
    """A fresh DiT outputs zero (adaLN-zero), a fresh UNet too (zeroed conv_out)."""
    for name in ("dit", "unet"):
        x, t, _ = inputs(name)
        assert torch.equal(make(name)(x, t), torch.zeros_like(x))


def test_mlp_learns_a_simple_regression():
    torch.manual_seed(0)
    net = MLPFlowNet(hidden=64, depth=3, time_embed_dim=16)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x = torch.randn(256, 2)
    t = torch.rand(256)
    target = torch.stack([x[:, 1], -x[:, 0]], 1) * (1 + t[:, None])  # a time-dependent rotation field

    def loss_fn():
        return (net(x, t) - target).pow(2).mean()

    first = loss_fn().item()
    for _ in range(100):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.2 * first


@pytest.mark.parametrize("two_time", [False, True])
def test_jvp_in_t_through_mlp_matches_finite_difference(two_time):
    net = MLPFlowNet(hidden=32, depth=3, time_embed_dim=16, two_time=two_time, num_classes=NC)
    net = perturb(net).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 2, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64)
    s = 0.5 * t
    cond = torch.tensor([0, 1, 2, NC])

    def f(tt):
        return net(x, tt, s, cond=cond)

    out, tangent = torch.func.jvp(f, (t,), (torch.ones_like(t),))
    h = 1e-6
    fd = (f(t + h) - f(t - h)) / (2 * h)
    torch.testing.assert_close(out, f(t))
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-6)
    assert tangent.abs().max() > 1e-3


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_jvp_in_t_through_image_nets_under_math_attention(name):
    """CPU flash attention has no forward-mode AD: JVP callers select the math SDPA backend."""
    net = perturb(make(name, two_time=True)).double()
    x, t, s = (a.double() for a in inputs(name))

    def f(tt):
        return net(x, tt, s)

    with sdpa_kernel(SDPBackend.MATH):
        _, tangent = torch.func.jvp(f, (t,), (torch.ones_like(t),))
    h = 1e-6
    fd = (f(t + h) - f(t - h)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-4, atol=1e-5)
    assert tangent.abs().max() > 1e-3


def test_sinusoidal_embedding_properties():
    t = torch.tensor([0.0, 0.25, 1.0])
    e = sinusoidal_embedding(t, 8)
    assert e.shape == (3, 8) and e.dtype == torch.float32
    torch.testing.assert_close(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    torch.testing.assert_close(e[:, 0], torch.cos(1000 * t))  # first frequency is 1: features of 1000·t
    assert sinusoidal_embedding(t, 7).shape == (3, 7)
    assert sinusoidal_embedding(t.double(), 8).dtype == torch.float64
    assert sinusoidal_embedding(t.half(), 8).dtype == torch.float32  # always computed in fp32
