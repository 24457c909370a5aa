"""StreamingSampler against analytic fields: Gaussian frames N(μ, σ²) per pixel, whose exact
velocity and flow map are known in closed form, so the stream can be checked frame by frame."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from flowdistill.core.stream_schedule import Partition, buffer_levels, partition_grid
from flowdistill.core.streaming import StreamingSampler
from flowdistill.errors import ConfigError

MU, SIGMA = 0.3, 0.5
SHAPE = (1, 2, 2)


def _r(t: Tensor) -> Tensor:
    """Std of x_t for data N(μ, σ²): r(t) = sqrt((1 − t)²σ² + t²)."""
    return ((1 - t) ** 2 * SIGMA**2 + t**2).sqrt()


def _bt(t: Tensor) -> Tensor:
    return t[..., None, None, None]


class GaussVelocity(nn.Module):
    """Exact v(x, t) for x_t = (1 − t)X + tε, X ~ N(μ, σ²): along x_t = (1 − t)μ + r(t)·z,
    v = −μ + r'(t)/r(t)·(x − (1 − t)μ), r' = ((1 − t)(−σ²) + t)/r. Records every input shape."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple] = []
        self.times: list[Tensor] = []
        self.refs: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.seen.append(tuple(x.shape))
        self.times.append(t.clone())
        self.refs.append(x.clone())
        t = t.double()
        r = _r(t)
        dr = (-(1 - t) * SIGMA**2 + t) / r
        return (-MU + _bt(dr / r) * (x.double() - _bt(1 - t) * MU)).to(x.dtype)


class ExactFlowMap(nn.Module):
    """Exact two-time flow map as an average velocity: X(x, t, s) = (1 − s)μ + r(s)/r(t)·(x − (1 − t)μ),
    u = (X − x)/(s − t) (u = v where s = t)."""

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        t, s, xd = t.double(), s.double(), x.double()
        target = _bt(1 - s) * MU + _bt(_r(s) / _r(t)) * (xd - _bt(1 - t) * MU)
        same = _bt(s == t)
        u = (target - xd) / torch.where(same, torch.ones_like(_bt(s)), _bt(s - t))
        return torch.where(same, GaussVelocity()(x, t).double(), u).to(x.dtype)


class EulerOracle(nn.Module):
    """The teacher's multi-step result as a flow map: per frame, Euler with the exact velocity over
    the grid points from t down to s, returned as u = (x_s − x)/(s − t) — what a perfectly
    distilled k-step student outputs."""

    def __init__(self, grid: Tensor):
        super().__init__()
        self.grid, self.v = grid.double(), GaussVelocity()

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        it = (self.grid[None, None] - t.double()[..., None]).abs().argmin(-1)  # [n, B] grid index
        is_ = (self.grid[None, None] - s.double()[..., None]).abs().argmin(-1)
        y = x.double()
        for _ in range(int((it - is_).max())):
            move = it > is_
            a, b = self.grid[it], self.grid[(it - 1).clamp(min=0)]
            step = _bt(torch.where(move, b - a, torch.zeros_like(a)))
            y = y + step * self.v(y, a)
            it = torch.where(move, it - 1, it)
        dt = _bt(s.double() - t.double())
        return ((y - x.double()) / torch.where(dt == 0, torch.ones_like(dt), dt)).to(x.dtype)


def _euler_solve(eps: Tensor, grid: Tensor, heun: bool = False) -> Tensor:
    """Per-frame reference: Euler (or Heun) with the exact velocity along the whole grid, 1 → 0."""
    v, x = GaussVelocity(), eps.double()
    g = grid.double().flip(0)
    for a, b in zip(g[:-1], g[1:], strict=True):
        ta = torch.full(x.shape[:2], float(a), dtype=torch.float64)
        tb = torch.full(x.shape[:2], float(b), dtype=torch.float64)
        d1 = v(x, ta)
        if heun:
            x = x + (b - a) * (d1 + v(x + (b - a) * d1, tb)) / 2
        else:
            x = x + (b - a) * d1
    return x.float()


def _draws(n: int, p: Partition, emissions: int, seed: int) -> Tensor:
    """The stream's noise, concatenated in draw order (first buffer, then one chunk per emission)."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, p.buffer, *SHAPE, generator=g)]
    parts += [torch.randn(n, p.chunk, *SHAPE, generator=g) for _ in range(emissions)]
    return torch.cat(parts, dim=1)


P = Partition(ref=2, chunks=3, chunk=2, micro=2)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_stream_equals_per_frame_ode_solve(solver):
    """Without context every streamed frame (references and warm-up frames included) is its own
    noise integrated along the full teacher grid (float32 vs float64 reference: 1e-5)."""
    grid = partition_grid(P, shift=2.0)
    sampler = StreamingSampler(GaussVelocity(), P, grid=grid, solver=solver, frame_shape=SHAPE)
    out = sampler.stream(3, 15, torch.Generator().manual_seed(0))
    eps = _draws(3, P, 8, seed=0)[:, :15]
    torch.testing.assert_close(out, _euler_solve(eps, grid, heun=solver == "heun"), atol=1e-5, rtol=1e-5)
    assert sampler.frames_emitted == 16  # 2 references + 7 chunks of 2; the last one cut to 15
    # and the per-frame solve is a real ODE solve: with 6 steps Heun lands much nearer the exact
    # x_0 = μ + σ·ε than Euler (second vs first order)
    if solver == "heun":
        err_heun = (out - (MU + SIGMA * eps)).abs().max()
        err_euler = (_euler_solve(eps, grid) - (MU + SIGMA * eps)).abs().max()
        assert err_heun < 0.25 * err_euler, (err_heun, err_euler)


def test_staircase_seen_by_the_model_and_references_are_latest_frames():
    grid = partition_grid(P)
    model = GaussVelocity()
    sampler = StreamingSampler(model, P, grid=grid, frame_shape=SHAPE)
    ctx = torch.randn(1, 3, *SHAPE)
    out = sampler.stream(1, 8, torch.Generator().manual_seed(1), context=ctx)
    warm = P.steps  # warm-up calls (k = 1)
    assert sampler.nfe == warm + 4 * P.micro
    for call, t in enumerate(model.times[warm:]):
        torch.testing.assert_close(t[0], buffer_levels(P, grid, call % P.micro))
    # the model's reference frames: the context's last K during the first cycle, then the latest emitted
    for call, x in enumerate(model.refs):
        e = max(call - warm, -1) // P.micro  # emissions before this call
        refs = ctx[:, -2:] if e < 1 else out[:, 2 * e - 2: 2 * e]
        torch.testing.assert_close(x[:, :2], refs, rtol=0, atol=0)
    # with context the references are not emitted: frame f was born from draw K + f
    torch.testing.assert_close(out, _euler_solve(_draws(1, P, 4, 1)[:, 2:10], grid), atol=1e-5, rtol=1e-5)


def test_constant_memory_and_nfe_per_chunk():
    grid = partition_grid(P)
    for frames in (10, 60):
        model = GaussVelocity()
        sampler = StreamingSampler(model, P, grid=grid, frame_shape=SHAPE)
        marks: list[int] = []

        def mark(done: int, total: int, marks=marks, sampler=sampler) -> None:
            marks.append(sampler.nfe)

        sampler.stream(2, frames, torch.Generator().manual_seed(2), callback=mark)
        assert set(model.seen) == {(2, P.buffer, *SHAPE)}  # every call sees the same-size buffer
        assert [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)] == [P.micro] * (len(marks) - 1)
        assert marks[0] == P.steps + P.micro  # warm-up N·s calls, then s per chunk


def test_two_time_oracle_at_s_steps_per_call_equals_teacher():
    """A two-time 'student' that returns the teacher's s-step result streams the teacher's frames at
    1/s of its calls (float32 round trip through u = Δx/Δt: 1e-5)."""
    p = Partition(ref=1, chunks=3, chunk=2, micro=4)
    grid = partition_grid(p, shift=3.0)
    teacher = StreamingSampler(GaussVelocity(), p, grid=grid, frame_shape=SHAPE)
    student = StreamingSampler(EulerOracle(grid), p, grid=grid, steps_per_call=4, two_time=True,
                               frame_shape=SHAPE)
    a = teacher.stream(2, 13, torch.Generator().manual_seed(3))
    b = student.stream(2, 13, torch.Generator().manual_seed(3))
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert teacher.nfe == 4 * student.nfe == 4 * (3 + 6)  # warm-up N·s/k, then s/k per chunk


@pytest.mark.parametrize("warmup", ["clamp", "stretch"])
def test_exact_flow_map_streams_exact_samples(warmup):
    """With the exact flow map, any warm-up and any k give the exact ODE endpoint μ + σ·ε."""
    p = Partition(ref=2, chunks=2, chunk=3, micro=2)
    grid = partition_grid(p)
    for k in (1, 2):
        sampler = StreamingSampler(ExactFlowMap(), p, grid=grid, steps_per_call=k, two_time=True,
                                   warmup=warmup, frame_shape=SHAPE)
        out = sampler.stream(2, 11, torch.Generator().manual_seed(4))
        eps = _draws(2, p, 3, seed=4)[:, :11]
        torch.testing.assert_close(out, MU + SIGMA * eps, atol=1e-5, rtol=1e-5)


def test_stretch_warmup_reaches_staircase_together():
    grid = partition_grid(P)
    model = GaussVelocity()
    StreamingSampler(model, P, grid=grid, warmup="stretch", frame_shape=SHAPE).stream(
        1, 1, torch.Generator().manual_seed(5))
    first = model.times[0][0]
    assert bool((first == 1).all())  # all frames start as pure noise
    last_warm = model.times[P.steps - 1][0]
    stair = buffer_levels(P, grid, 0)
    assert bool((last_warm >= stair).all()) and bool((last_warm[:2] > 0).all())  # still moving
    torch.testing.assert_close(model.times[P.steps][0], stair)  # streaming starts on the staircase


def test_bad_configs():
    grid = partition_grid(P)
    with pytest.raises(ConfigError, match="steps_per_call"):
        StreamingSampler(GaussVelocity(), P, grid=grid, steps_per_call=3, frame_shape=SHAPE)
    with pytest.raises(ConfigError, match="solver"):
        StreamingSampler(ExactFlowMap(), P, grid=grid, two_time=True, solver="heun", frame_shape=SHAPE)
    with pytest.raises(ConfigError, match="N·s"):
        StreamingSampler(GaussVelocity(), P, grid=torch.linspace(0, 1, 4), frame_shape=SHAPE)
    with pytest.raises(ConfigError, match="frame_shape"):
        StreamingSampler(GaussVelocity(), P, grid=grid)
    s = StreamingSampler(GaussVelocity(), P, grid=grid, frame_shape=SHAPE)
    st = s.warmup(torch.randn(1, P.buffer, *SHAPE))
    st = s.call(s.call(st))
    assert st.ready
    with pytest.raises(ConfigError, match="emit"):
        s.call(st)


def test_core_layer_imports_torch_only():
    import ast
    from pathlib import Path

    import flowdistill.core.streaming as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert all(not m.startswith("flowdistill") or m.startswith(("flowdistill.core", "flowdistill.errors",
                                                                "flowdistill.kernels")) for m in names), names


@pytest.mark.parametrize("attention", ["causal", "full"])
def test_with_video_dit_causal_emission_ignores_newer_noise(attention):
    """With the real VideoDiTFlowNet: constant-size calls, and under causal attention the first
    emitted frames do not depend on the noise of newer chunks (they do under full attention)."""
    from flowdistill.models.video_dit import VideoDiTFlowNet

    p = Partition(ref=1, chunks=2, chunk=2, micro=2)
    torch.manual_seed(0)
    net = VideoDiTFlowNet(sample_size=8, patch_size=4, hidden=32, heads=2, depth=2, max_frames=8,
                          freq_dim=32, attention=attention).eval()
    with torch.no_grad():
        for prm in net.parameters():
            prm.normal_(0, 0.1)
    sampler = StreamingSampler(net, p, grid=partition_grid(p))
    assert sampler.frame_shape == (1, 8, 8)
    noise = torch.randn(2, p.buffer, 1, 8, 8)
    other = noise.clone()
    other[:, -p.chunk:] = torch.randn(2, p.chunk, 1, 8, 8)  # only the newest chunk's noise differs
    with torch.no_grad():
        outs = []
        for z in (noise, other):
            st = sampler.warmup(z)
            while not st.ready:
                st = sampler.call(st)
            frames, st = sampler.emit(st, torch.zeros(2, p.chunk, 1, 8, 8))
            assert frames.shape == (2, p.ref + p.chunk, 1, 8, 8) and st.x.shape == noise.shape
            outs.append(frames)
    diff = (outs[0] - outs[1]).abs().max().item()
    assert (diff == 0.0) if attention == "causal" else (diff > 1e-4), diff


def test_noised_references_are_seen_at_their_level_and_stay_clean_in_the_buffer():
    """``ref_noise = r``: every streaming call shows the model the K references noised to level r
    (time input r, a fresh draw each call), the buffer's references stay the clean emitted frames,
    and r = 0 is the plain sampler bit for bit."""
    grid = partition_grid(P)
    plain = StreamingSampler(GaussVelocity(), P, grid=grid, frame_shape=SHAPE)
    zero = StreamingSampler(GaussVelocity(), P, grid=grid, frame_shape=SHAPE, ref_noise=0.0)
    torch.testing.assert_close(plain.stream(2, 9, torch.Generator().manual_seed(3)),
                               zero.stream(2, 9, torch.Generator().manual_seed(3)), rtol=0, atol=0)
    model = GaussVelocity()
    sampler = StreamingSampler(model, P, grid=grid, frame_shape=SHAPE, ref_noise=0.2)
    ctx = torch.randn(1, 3, *SHAPE)
    out = sampler.stream(1, 8, torch.Generator().manual_seed(1), context=ctx)
    warm = P.steps
    deviations = []
    for call, (t, x) in enumerate(zip(model.times[warm:], model.refs[warm:], strict=True)):
        want = buffer_levels(P, grid, call % P.micro)
        want[:2] = 0.2
        torch.testing.assert_close(t[0], want)
        e = call // P.micro
        clean = ctx[:, -2:] if e < 1 else out[:, 2 * e - 2: 2 * e]
        noise = (x[:, :2] - 0.8 * clean) / 0.2  # the draw the model saw: ~N(0, 1), not 0
        deviations.append(noise)
    noise = torch.cat(deviations)
    assert 0.6 < float(noise.std()) < 1.4  # a standard normal draw (64 values: loose band)
    assert not torch.allclose(deviations[0], deviations[1])  # fresh noise every call
    with pytest.raises(ConfigError, match="ref_noise"):
        StreamingSampler(GaussVelocity(), P, grid=grid, frame_shape=SHAPE, ref_noise=1.0)
