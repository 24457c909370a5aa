"""VideoDiTFlowNet: shapes, zero at init, per-frame time, attention masks, two-time init, save/load."""

from __future__ import annotations

import pytest
import torch

from flowdistill.errors import ConfigError
from flowdistill.models import build_model, init_from
from flowdistill.models.video_dit import VideoDiTFlowNet, frame_mask

SMALL = dict(sample_size=8, patch_size=4, hidden=32, heads=2, depth=1, max_frames=8, freq_dim=32)


def _net(**kw) -> VideoDiTFlowNet:
    """A small net with every parameter randomised (a fresh net is identically zero)."""
    torch.manual_seed(0)
    net = VideoDiTFlowNet(**{**SMALL, **kw})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


def _x(b=2, f=6):
    g = torch.Generator().manual_seed(2)
    return torch.randn(b, f, 1, 8, 8, generator=g), torch.rand(b, f, generator=g)


def test_shapes_and_broadcast_time():
    net = _net()
    x, t = _x()
    assert net(x, t).shape == x.shape
    t1 = torch.rand(2)
    torch.testing.assert_close(net(x, t1), net(x, t1[:, None].expand(2, 6)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"t must have shape"):
        net(x, torch.rand(2, 5))
    with pytest.raises(ValueError, match=r"expected x of shape"):
        net(torch.randn(2, 9, 1, 8, 8), torch.rand(2))  # more frames than max_frames


@pytest.mark.parametrize("head", [0, 4])
def test_fresh_net_outputs_zero_and_is_registered(head):
    net = build_model("video_dit", **SMALL, attention="window", window=1, head_channels=head)
    x, t = _x()
    assert net(x, t).abs().max().item() == 0.0  # adaLN-zero (+ zeroed last head conv): exact zero
    with pytest.raises(ConfigError, match="attention"):
        build_model("video_dit", **SMALL, attention="shifted")


def test_frame_mask_semantics():
    assert frame_mask(4, "full") is None
    w = frame_mask(5, "window", 1).int().tolist()
    assert w[0] == [1, 1, 0, 0, 0] and w[2] == [0, 1, 1, 1, 0]
    c = frame_mask(4, "causal").int().tolist()
    assert c == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def _dependence_on_time(net, frame: int) -> torch.Tensor:
    """Per output frame: max |Δ output| when only ``frame``'s time changes."""
    x, t = _x()
    t2 = t.clone()
    t2[:, frame] += 0.3
    with torch.no_grad():
        return (net(x, t2) - net(x, t)).abs().amax(dim=(0, 2, 3, 4))


@pytest.mark.parametrize("attention,expected", [
    ("full", [1, 1, 1, 1, 1, 1]),
    ("window", [0, 0, 1, 1, 1, 0]),  # depth 1, window 1: frames 2..4 see frame 3
    ("causal", [0, 0, 0, 1, 1, 1]),  # frames >= 3 see frame 3
])
def test_time_is_per_frame(attention, expected):
    """Changing frame 3's time changes exactly the frames whose attention sees frame 3."""
    diff = _dependence_on_time(_net(attention=attention, window=1), 3)
    # masked-out frames are untouched bit for bit (a masked key gets weight exactly 0)
    assert [int(d > 1e-6) for d in diff] == expected, diff
    assert all(d == 0 for d, e in zip(diff.tolist(), expected, strict=True) if not e)


@pytest.mark.parametrize("attention,depth,local,head", [("window", 1, False, 0), ("window", 2, False, 0),
                                                        ("window", 2, True, 0), ("causal", 2, False, 0),
                                                        ("causal", 2, False, 4)])
def test_mask_by_gradient(attention, depth, local, head):
    """∂ out[f] / ∂ x[g] ≠ 0 exactly where the depth-fold mask allows (window grows by w per block;
    the conv head is per frame, so it adds no reach across frames)."""
    net = _net(attention=attention, window=1, depth=depth, local_window=local, head_channels=head)
    x, t = _x(b=1)
    x.requires_grad_(True)
    out = net(x, t)
    reach = torch.zeros(6, 6, dtype=torch.bool)
    for f in range(6):
        (g,) = torch.autograd.grad(out[0, f].square().sum(), x, retain_graph=True)
        reach[f] = g[0].abs().amax(dim=(1, 2, 3)) > 0
    m = frame_mask(6, attention, 1).int()
    allowed = torch.linalg.matrix_power(m, depth) > 0
    assert torch.equal(reach, allowed), (reach.int(), allowed.int())


@pytest.mark.parametrize("head", [0, 4])
def test_two_time_starts_as_one_time(head):
    """Zero-initialised s branch: u(x, t, s) of a fresh two-time net loaded from a one-time net = v(x, t)."""
    one = _net(attention="causal", head_channels=head)
    two = VideoDiTFlowNet(**SMALL, attention="causal", two_time=True, head_channels=head).eval()
    rep = init_from(two, one)
    assert all(k.startswith("cond_embed.time_embed2") for k in rep.missing)
    x, t = _x()
    s = t * torch.rand(t.shape)
    with torch.no_grad():
        torch.testing.assert_close(two(x, t, s), one(x, t), rtol=0, atol=0)
        torch.testing.assert_close(two(x, t, t), one(x, t), rtol=0, atol=0)
        # once the s branch is trained, s matters and is per frame
        two.cond_embed.time_embed2[2].weight.normal_(0, 0.1)
        assert (two(x, t, s) - one(x, t)).abs().max() > 1e-3


def test_class_condition_and_save_load(tmp_path):
    net = _net(num_classes=3, two_time=True)
    x, t = _x()
    s, y = t / 2, torch.tensor([0, 2])
    with torch.no_grad():
        a = net(x, t, s, y)
        assert (a - net(x, t, s, torch.tensor([1, 2])))[0].abs().max() > 1e-4  # label changes clip 0
        torch.testing.assert_close((a - net(x, t, s, torch.tensor([1, 2])))[1], torch.zeros_like(a[1]))
        net.save_pretrained(tmp_path)
        back = VideoDiTFlowNet.from_pretrained(tmp_path).eval()
        assert back.config.two_time and back.config.num_classes == 3
        torch.testing.assert_close(back(x, t, s, y), a, rtol=0, atol=0)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers path runs on CUDA only")
def test_xformers_matches_sdpa():
    pytest.importorskip("xformers")
    net = _net(attention="window", window=1, attn_backend="xformers").cuda()
    ref = _net(attention="window", window=1, attn_backend="sdpa").cuda()
    x, t = (v.cuda() for v in _x())
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), ref(x, t), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window", [1, 2])
def test_local_window_equals_masked_full_attention(window):
    """The unfold-based local path computes the same function as masked full attention (float32
    summation order differs: 1e-5), gradients included."""
    fast = _net(attention="window", window=window, depth=2, local_window=True)
    slow = _net(attention="window", window=window, depth=2)
    assert fast.attention_plan(6, "cpu")[1] is not None and slow.attention_plan(6, "cpu")[1] is None
    x, t = _x()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = fast(xa, t), slow(xb, t)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)


def test_pixel_head_reads_the_input_frame_at_full_resolution():
    """The conv head gets the input frame itself: with the DiT's token decoder zeroed, the output
    still depends on the input pixel across the patch edge next to it (3×3 conv), only through the
    head — without the head that net is identically zero."""
    x, t = _x(b=1, f=2)
    grads = {}
    for head in (0, 4):
        net = _net(head_channels=head)
        with torch.no_grad():
            net.linear_out.weight.zero_()
            net.linear_out.bias.zero_()
        xx = x.clone().requires_grad_(True)
        out = net(xx, t)
        (g,) = torch.autograd.grad(out[0, 0, 0, 0, 3], xx, allow_unused=True)  # last column of patch 0
        grads[head] = 0.0 if g is None else g[0, 0, 0, 0, 4].abs().item()  # first column of patch 1
    assert grads[0] == 0.0 and grads[4] > 1e-4, grads
    with pytest.raises(ValueError, match="head_channels"):
        VideoDiTFlowNet(**SMALL, head_channels=-1)


def test_x_prediction_returns_the_implied_velocity():
    """``prediction="x"``: the same weights' raw output is x̂ and the net returns
    ``(x_t − x̂)/max(t, t_min)`` per frame (exactly; float32 division), so an Euler/flow-map step to
    ``s`` is ``(s/t)·x_t + (1 − s/t)·x̂`` (DDIM); the two-time init property holds as for "v"."""
    v_net = _net(two_time=True)
    x_net = VideoDiTFlowNet(**SMALL, two_time=True, prediction="x", x_pred_min_t=0.1).eval()
    x_net.load_state_dict(v_net.state_dict())
    x, t = _x()
    t[0, 0] = 0.02  # below t_min: the divisor is clamped
    s = t * 0.5
    with torch.no_grad():
        x_hat = v_net(x, t, s)
        want = (x - x_hat) / t.clamp_min(0.1)[..., None, None, None]
        torch.testing.assert_close(x_net(x, t, s), want, rtol=0, atol=0)
        step = x + (s - t)[..., None, None, None] * x_net(x, t, s)
        r = (s / t)[1, 3]
        torch.testing.assert_close(step[1, 3], r * x[1, 3] + (1 - r) * x_hat[1, 3], rtol=1e-5, atol=1e-5)
        one = _net(prediction="x")
        two = VideoDiTFlowNet(**SMALL, two_time=True, prediction="x").eval()
        init_from(two, one)
        torch.testing.assert_close(two(x, t, s), one(x, t), rtol=0, atol=0)
    with pytest.raises(ValueError, match="prediction"):
        VideoDiTFlowNet(**SMALL, prediction="eps")
