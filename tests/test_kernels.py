"""Fused-op dispatcher (torch path), its routing and errors, and the CUDA-graph sampler wrapper.

The Triton kernels themselves are checked under the Triton interpreter in
``test_kernels_triton.py``; the CUDA checks at the bottom skip without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from flowdistill import kernels as K
from flowdistill.kernels import dispatch
from flowdistill.kernels import reference as R
from flowdistill.kernels.graphs import GraphedSampler, capture_sampler

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (speed/graph/kernel checks)")


def _data(B=3, shape=(2, 5, 7), dtype=torch.float32, device="cpu", n=4):
    """``x``, ``n`` terms, a per-sample time pair and scalars."""
    g = torch.Generator().manual_seed(1)
    mk = lambda: torch.randn(B, *shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    t = torch.rand(B, generator=g).to(device)
    s = (t * torch.rand(B, generator=g).to(device))
    return mk(), [mk() for _ in range(n)], t, s


def _cases(x, ks, t, s):
    """(name, dispatcher call, reference call) for every op with per-sample and scalar coefs."""
    w = 1.0 + 2.0 * t
    return [
        ("lincomb1", lambda: K.lincomb(x, ks[:1], [t]), lambda: R.lincomb(x, ks[:1], [t])),
        ("lincomb4", lambda: K.lincomb(x, ks, [0.1, t, -0.3, s]),
         lambda: R.lincomb(x, ks, [0.1, t, -0.3, s])),
        ("euler", lambda: K.euler_step(x, ks[0], -0.25), lambda: R.euler_step(x, ks[0], -0.25)),
        ("euler_vec", lambda: K.euler_step(x, ks[0], s - t), lambda: R.euler_step(x, ks[0], s - t)),
        ("cfg", lambda: K.cfg_combine(ks[0], ks[1], w), lambda: R.cfg_combine(ks[0], ks[1], w)),
        ("cfg_scalar", lambda: K.cfg_combine(ks[0], ks[1], 3.5), lambda: R.cfg_combine(ks[0], ks[1], 3.5)),
        ("guided", lambda: K.guided_euler_step(x, ks[0], ks[1], w, -0.1),
         lambda: R.guided_euler_step(x, ks[0], ks[1], w, -0.1)),
        ("jump", lambda: K.flow_map_jump(x, ks[0], t, s), lambda: R.flow_map_jump(x, ks[0], t, s)),
        ("jump_scalar", lambda: K.flow_map_jump(x, ks[0], 0.8, 0.3),
         lambda: R.flow_map_jump(x, ks[0], 0.8, 0.3)),
        ("affine", lambda: K.affine_sample_and_target(x, ks[0], 1 - t, t, -1.0, 1.0),
         lambda: R.affine_sample_and_target(x, ks[0], 1 - t, t, -1.0, 1.0)),
        ("linear", lambda: K.linear_sample_and_target(x, ks[0], t),
         lambda: R.linear_sample_and_target(x, ks[0], t)),
        ("linear_scalar", lambda: K.linear_sample_and_target(x, ks[0], 0.3),
         lambda: R.linear_sample_and_target(x, ks[0], 0.3)),
    ]


def _equal(a, b) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b, strict=True))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("mode", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_torch_path_equals_reference(monkeypatch, mode, dtype):
    monkeypatch.setenv("FLOWDISTILL_KERNELS", mode)
    x, ks, t, s = _data(dtype=dtype)
    assert K.resolve(x, *ks) == "torch"
    for name, fused, ref in _cases(x, ks, t, s):
        assert _equal(fused(), ref()), name


def test_low_precision_is_computed_in_fp32():
    x, ks, t, s = _data(dtype=torch.bfloat16)
    for name, fused, _ in _cases(x, ks, t, s):
        got = fused()
        xf, kf = x.float(), [k.float() for k in ks]
        ref = dict((n, r) for n, _, r in _cases(xf, kf, t, s))[name]()
        want = tuple(r.to(torch.bfloat16) for r in ref) if isinstance(ref, tuple) else ref.to(torch.bfloat16)
        assert _equal(got, want), name
    # 1 + 4 · 2⁻⁹ is a bf16 number, but each bf16 partial sum 1 + 2⁻⁹ would round back to 1.
    one = torch.ones(2, 3, dtype=torch.bfloat16)
    small = torch.full_like(one, 2.0**-9)
    out = K.lincomb(one, [small] * 4, [1.0] * 4)
    assert out.dtype == torch.bfloat16
    assert torch.all(out.float() == 1 + 4 * 2.0**-9)
    h = torch.ones(2, 3, dtype=torch.float16)
    xt, v = K.linear_sample_and_target(h, torch.full_like(h, 1 + 2.0**-10), 0.5)
    assert xt.dtype == v.dtype == torch.float16 and torch.all(v.float() == 2.0**-10)


def test_mixed_dtype_terms_follow_reference():
    x, ks, t, s = _data()
    v = ks[0].to(torch.bfloat16)
    assert _equal(K.euler_step(x, v, t), R.euler_step(x, v, t))
    assert K.euler_step(v, x, 0.5).dtype == torch.bfloat16


def test_shape_and_device_mismatch_raise():
    x, ks, t, s = _data()
    bad = torch.randn(3, 2, 5, 6)
    meta = torch.empty_like(x, device="meta")
    calls = [
        lambda k: K.lincomb(x, [ks[0], k], [0.1, 0.2]),
        lambda k: K.euler_step(x, k, 0.1),
        lambda k: K.cfg_combine(x, k, 2.0),
        lambda k: K.guided_euler_step(x, ks[0], k, 2.0, 0.1),
        lambda k: K.flow_map_jump(x, k, t, s),
        lambda k: K.affine_sample_and_target(x, k, t, s, -1.0, 1.0),
        lambda k: K.linear_sample_and_target(x, k, t),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="shape"):
            call(bad)
        with pytest.raises(ValueError, match="meta"):
            call(meta)
    with pytest.raises(ValueError, match="coefficients"):
        K.lincomb(x, ks[:2], [0.1])


def test_backend_selection(monkeypatch):
    x, ks, t, s = _data()
    monkeypatch.delenv("FLOWDISTILL_KERNELS", raising=False)
    assert K.backend() == "auto" and K.resolve(x) == "torch"
    monkeypatch.setenv("FLOWDISTILL_KERNELS", "Torch")
    assert K.backend() == "torch"
    monkeypatch.setenv("FLOWDISTILL_KERNELS", "cuda")
    with pytest.raises(ValueError, match="FLOWDISTILL_KERNELS"):
        K.backend()
    with pytest.raises(ValueError, match="FLOWDISTILL_KERNELS"):
        K.euler_step(x, ks[0], 0.1)
    # Forced Triton on CPU tensors without the interpreter is an error, not a silent fallback.
    monkeypatch.setenv("FLOWDISTILL_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        K.euler_step(x, ks[0], 0.1)


def test_autograd_and_functorch_use_the_reference(monkeypatch):
    """The kernels have no backward: differentiable calls go to the torch reference."""
    monkeypatch.setenv("FLOWDISTILL_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, ks, t, s = _data()
    u = ks[0].clone().requires_grad_(True)
    assert K.resolve(x, u, t, s) == "torch"
    out = K.flow_map_jump(x, u, t, s)
    out.sum().backward()
    assert torch.allclose(u.grad, (s - t).view(-1, 1, 1, 1).expand_as(u))

    def f(uu):
        assert K.resolve(x, uu) == "torch"
        return K.flow_map_jump(x, uu, t, s)

    _, tangent = torch.func.jvp(f, (ks[0],), (torch.ones_like(ks[0]),))
    assert torch.allclose(tangent, (s - t).view(-1, 1, 1, 1).expand_as(x))
    with torch.no_grad():  # without autograd the Triton kernels could serve it (nothing imported here)
        assert dispatch._triton_can_serve([x, u, t])


def test_ema_update_matches_lerp():
    ema = [torch.randn(4, 3), torch.randn(5)]
    params = [torch.randn(4, 3), torch.randn(5)]
    want = [e * 0.9 + 0.1 * p for e, p in zip(ema, params, strict=True)]
    K.ema_update_(ema, params, 0.9)
    for e, w in zip(ema, want, strict=True):
        assert torch.allclose(e, w, atol=1e-6)
    with pytest.raises(ValueError):
        K.ema_update_(ema, params[:1], 0.9)


def _sampler(net):
    """Two flow-map jumps 1 → 0.5 → 0 with a fixed toy average-velocity field."""
    def run(noise, label_shift):
        B = noise.shape[0]
        x = noise
        for a, b in ((1.0, 0.5), (0.5, 0.0)):
            t = torch.full((B,), a, device=noise.device)
            s = torch.full((B,), b, device=noise.device)
            x = K.flow_map_jump(x, net(x) + label_shift, t, s)
        return x, x.mean()
    return run


def test_graphed_sampler_falls_back_on_cpu():
    net = torch.nn.Linear(6, 6)
    fn = _sampler(net)
    noise = torch.randn(4, 6)
    want = fn(noise, 0.25)
    g = GraphedSampler(fn)
    got = g(noise, 0.25)
    assert not g.graphed and g.failure is None and g.eager_calls == 1 and g.replays == 0
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not got[0].requires_grad  # runs under no_grad like a sampler
    c = capture_sampler(fn, (noise, 0.25))
    assert not c.graphed
    assert torch.equal(c(noise[:2], 0.25)[0], fn(noise[:2], 0.25)[0])


# ------------------------------------------------------------------------------------------------
# GPU-only checks (skip without CUDA)
# ------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_triton_matches_reference(monkeypatch, dtype):
    pytest.importorskip("triton")
    monkeypatch.setenv("FLOWDISTILL_KERNELS", "auto")
    x, ks, t, s = _data(B=5, shape=(3, 33, 17), dtype=dtype, device="cuda")
    assert K.resolve(x, *ks, t) == "triton"
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for name, fused, ref in _cases(x, ks, t, s):
        got, want = fused(), ref()
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype, name
            torch.testing.assert_close(a.float(), b.float(), **tol, msg=name)


@needs_cuda
def test_cuda_graph_replay_matches_eager():
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.SiLU(), torch.nn.Linear(64, 16)).cuda()
    fn = _sampler(net)
    noise = torch.randn(8, 16, device="cuda")
    g = capture_sampler(fn, (noise, 0.1))
    assert g.graphed, g.failure
    with torch.no_grad():
        want = fn(noise, 0.1)
    got = g(noise, 0.1)
    torch.testing.assert_close(got[0], want[0])
    other = torch.randn(8, 16, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(g(other, 0.1)[0], fn(other, 0.1)[0])
    assert g.replays == 2
    small = torch.randn(3, 16, device="cuda")  # shape change: eager
    with torch.no_grad():
        torch.testing.assert_close(g(small, 0.1)[0], fn(small, 0.1)[0])
    assert g.eager_calls == 1 and g.replays == 2


@needs_cuda
def test_cuda_graph_capture_failure_falls_back():
    def syncs(x):
        return x * float(x.sum().item())  # host sync: not capturable

    x = torch.randn(4, device="cuda")
    with pytest.warns(RuntimeWarning, match="capture failed"):
        g = capture_sampler(syncs, (x,))
    assert not g.graphed and g.failure
    torch.testing.assert_close(g(x), syncs(x))
