"""ODE solvers for ``dx/dt = v(x, t)`` integrated along a time grid (from t = 1 to t = 0).

Each solver returns a :class:`SolveResult`: the final state, the number of network evaluations
(NFE) spent and, on request, the trajectory (the state at every accepted time). The elementwise
updates go through :mod:`flowdistill.kernels`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from flowdistill import kernels
from flowdistill.core.guidance import GuidedField
from flowdistill.core.registry import Registry

Field = Callable[..., Tensor]

SOLVERS: Registry = Registry("solver")


@dataclass
class SolveResult:
    """Result of an ODE solve."""

    x: Tensor
    nfe: int
    trajectory: list[Tensor] | None = None
    times: list[float] = field(default_factory=list)


def _check_grid(grid: Tensor) -> None:
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError("time grid must be 1-D with at least 2 times")


class _Stepper:
    """Shared loop for explicit one-step methods on a fixed grid."""

    evals_per_step = 1

    def step(self, field: Field, x: Tensor, t: Tensor, s: Tensor, dt: float, cond) -> Tensor:
        raise NotImplementedError

    def __call__(self, field: Field, x: Tensor, grid: Tensor, cond: Tensor | None = None,
                 return_trajectory: bool = False) -> SolveResult:
        _check_grid(grid)
        B = x.shape[0]
        tdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        ts = grid.to(device=x.device, dtype=tdtype)
        tvec = [ts[i].expand(B) for i in range(ts.numel())]
        g = grid.double().tolist()
        dts = [b - a for a, b in zip(g[:-1], g[1:], strict=True)]
        traj = [x] if return_trajectory else None
        for i, dt in enumerate(dts):
            x = self.step(field, x, tvec[i], tvec[i + 1], dt, cond=cond)
            if traj is not None:
                traj.append(x)
        return SolveResult(x, self.evals_per_step * len(dts), traj, ts.tolist())


@SOLVERS.register("euler")
class Euler(_Stepper):
    """Explicit Euler: ``x_{n+1} = x_n + h·v(x_n, t_n)`` (order 1).

    For a guided field (:class:`~flowdistill.core.guidance.GuidedField`,
    ``v = v_lo + w·(v_hi − v_lo)``) the combine and the update are one fused pass,
    ``kernels.guided_euler_step(x, v_lo, v_hi, w, h)``."""

    def step(self, field, x, t, s, dt, cond):
        if isinstance(field, GuidedField):
            v_lo, v_hi, w = field.branches(x, t, cond=cond)
            if v_lo is not v_hi:
                return kernels.guided_euler_step(x, v_lo, v_hi, w, dt)
            return kernels.euler_step(x, v_hi, dt)
        return kernels.euler_step(x, field(x, t, cond=cond), dt)


@SOLVERS.register("midpoint")
class Midpoint(_Stepper):
    """Explicit midpoint: ``x + h·v(x + h/2·v(x, t), t + h/2)`` (order 2)."""

    evals_per_step = 2

    def step(self, field, x, t, s, dt, cond):
        k1 = field(x, t, cond=cond)
        xm = kernels.euler_step(x, k1, 0.5 * dt)
        return kernels.euler_step(x, field(xm, 0.5 * (t + s), cond=cond), dt)


@SOLVERS.register("heun")
class Heun(_Stepper):
    """Heun's method (explicit trapezoid): ``x + h/2·(k1 + v(x + h·k1, t + h))`` (order 2)."""

    evals_per_step = 2

    def step(self, field, x, t, s, dt, cond):
        k1 = field(x, t, cond=cond)
        xe = kernels.euler_step(x, k1, dt)
        k2 = field(xe, s, cond=cond)
        return kernels.lincomb(x, [k1, k2], [0.5 * dt, 0.5 * dt])


@SOLVERS.register("rk4")
class RK4(_Stepper):
    """Classical fourth-order Runge–Kutta (order 4)."""

    evals_per_step = 4

    def step(self, field, x, t, s, dt, cond):
        tm = 0.5 * (t + s)
        k1 = field(x, t, cond=cond)
        k2 = field(kernels.euler_step(x, k1, 0.5 * dt), tm, cond=cond)
        k3 = field(kernels.euler_step(x, k2, 0.5 * dt), tm, cond=cond)
        k4 = field(kernels.euler_step(x, k3, dt), s, cond=cond)
        return kernels.lincomb(x, [k1, k2, k3, k4], [dt / 6, dt / 3, dt / 3, dt / 6])


# Dormand–Prince 5(4) tableau (FSAL).
_C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
_B5 = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0]
_B4 = [5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]
_E = [b5 - b4 for b5, b4 in zip(_B5, _B4, strict=True)]


@SOLVERS.register("dopri5")
class Dopri5:
    """Adaptive Dormand–Prince 5(4) with an error-per-step controller.

    The error norm is the RMS over all elements of ``err / (atol + rtol·max(|x|, |x_new|))``
    (as in Hairer–Nørsett–Wanner and torchdiffeq). Integrates from ``grid[0]`` to ``grid[-1]``
    and also lands exactly on every interior time of ``grid`` (for trajectories).
    """

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 10_000,
                 safety: float = 0.9, min_factor: float = 0.2, max_factor: float = 10.0):
        self.rtol, self.atol, self.max_steps = rtol, atol, max_steps
        self.safety, self.min_factor, self.max_factor = safety, min_factor, max_factor

    def _norm(self, err: Tensor, x0: Tensor, x1: Tensor) -> float:
        scale = self.atol + self.rtol * torch.maximum(x0.abs(), x1.abs())
        return (err / scale).pow(2).mean().sqrt().item()

    def __call__(self, field: Field, x: Tensor, grid: Tensor, cond: Tensor | None = None,
                 return_trajectory: bool = False) -> SolveResult:
        _check_grid(grid)
        B = x.shape[0]
        targets = grid.double().tolist()
        t = targets[0]
        nfe = 0

        def f(xx: Tensor, tt: float) -> Tensor:
            nonlocal nfe
            nfe += 1
            tdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            return field(xx, torch.full((B,), tt, device=x.device, dtype=tdtype), cond=cond)

        k1 = f(x, t)
        # Initial step (Hairer–Wanner II.4): h0 from the size of x and its derivative.
        d0 = (x.pow(2).mean().sqrt() / (self.atol + self.rtol * x.abs().mean())).item()
        d1 = (k1.pow(2).mean().sqrt() / (self.atol + self.rtol * x.abs().mean())).item()
        h = 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-6
        traj = [x] if return_trajectory else None
        steps = 0
        for target in targets[1:]:
            direction = -1.0 if target < t else 1.0
            while abs(target - t) > 1e-12:
                steps += 1
                if steps > self.max_steps:
                    raise RuntimeError(f"dopri5 exceeded max_steps={self.max_steps}")
                h = min(abs(h), abs(target - t))
                dt = direction * h
                ks = [k1]
                for i in range(1, 7):
                    xi = kernels.lincomb(x, ks, [dt * a for a in _A[i]])
                    ks.append(f(xi, t + _C[i] * dt))
                x_new = kernels.lincomb(x, ks[:6], [dt * b for b in _B5[:6]])
                err = kernels.lincomb(torch.zeros_like(x), ks, [dt * e for e in _E])
                en = self._norm(err, x, x_new)
                if en <= 1.0:
                    t = target if abs(target - (t + dt)) < 1e-12 else t + dt
                    x, k1 = x_new, ks[6]
                factor = self.safety * (en + 1e-12) ** -0.2
                h = h * min(self.max_factor, max(self.min_factor, factor))
            if traj is not None:
                traj.append(x)
        return SolveResult(x, nfe, traj, targets)


def build_solver(name: str, **kw):
    """A registered solver by name (``euler``, ``midpoint``, ``heun``, ``rk4``, ``dopri5``)."""
    return SOLVERS.build(name, **kw)


def solve(field: Field, x: Tensor, grid: Tensor, method: str = "euler",
          cond: Tensor | None = None, return_trajectory: bool = False, **kw) -> SolveResult:
    """Integrate ``field`` from ``grid[0]`` to ``grid[-1]`` with the named solver."""
    return build_solver(method, **kw)(field, x, grid, cond=cond, return_trajectory=return_trajectory)


def steps_for_nfe(method: str, nfe: int) -> int:
    """Number of grid steps a fixed-step solver takes for a budget of ``nfe`` evaluations."""
    per = SOLVERS.get(method).evals_per_step if method != "dopri5" else None
    if per is None:
        raise ValueError("dopri5 is adaptive; it has no fixed NFE")
    if nfe < per or nfe % per:
        raise ValueError(f"{method} uses {per} evaluations per step; NFE {nfe} is not a multiple")
    return nfe // per


STEP_SOLVERS = ("euler", "heun", "midpoint", "ddim")
STEP_EVALS = {"euler": 1, "ddim": 1, "heun": 2, "midpoint": 2}


@runtime_checkable
class JumpField(Protocol):
    """A field whose solver step ``t → s`` is its own jump: a two-time flow map
    ``X(x, t, s) = x + (s − t)·u(x, t, s)`` used as a teacher (Hyper-SD's previous stage as the next
    stage's teacher; :class:`flowdistill.models.teachers.FlowMapTeacher`). :func:`step` dispatches to
    :meth:`jump` for it, whatever the solver name: the flow map *is* the solution operator it learned,
    so no quadrature of its velocity is taken (one network evaluation)."""

    def jump(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        """``X(x, t, s)`` for per-sample times ``t, s [B]``."""
        ...


def step(field: Field, x: Tensor, t: Tensor, s: Tensor, solver: str = "euler",
         cond: Tensor | None = None) -> Tensor:
    """One solver step from per-sample times ``t [B]`` to per-sample targets ``s [B]``.

    With ``h = s − t`` per sample (``h < 0`` when generating):

    - ``euler``:    ``x + h·v(x, t)``
    - ``midpoint``: ``x + h·v(x + h/2·v(x, t), (t + s)/2)``
    - ``heun``:     ``x + h/2·(k₁ + v(x + h·k₁, s))``, ``k₁ = v(x, t)``
    - ``ddim``:     DDIM's deterministic update ``x_s = α_s·x̂₀ + σ_s·ε̂`` (Song et al. 2021). On the
      linear path ``x̂₀ = x − t·v`` and ``ε̂ = x + (1 − t)·v``, so
      ``x_s = (1 − s)(x − t·v) + s(x + (1 − t)·v) = x + (s − t)·v``: exactly the Euler step on the
      velocity (as in diffusers' flow-match Euler scheduler).

    A sample with ``s = t`` is returned unchanged (its step is ``0·v``). ``STEP_EVALS[solver]``
    network evaluations are spent on the whole batch.

    A :class:`JumpField` (a flow-map teacher) steps by its own jump, ``X(x, t, s)``, whatever
    ``solver`` names (one evaluation): exact wherever the flow map is (for a distilled student, the
    jumps it was trained on).
    """
    if solver not in STEP_EVALS:
        raise ValueError(f"step solver must be one of {', '.join(STEP_SOLVERS)}, got {solver!r}")
    if t.ndim != 1 or s.shape != t.shape or t.shape[0] != x.shape[0]:
        raise ValueError(f"t and s must both be [B] = [{x.shape[0]}], got {tuple(t.shape)}, {tuple(s.shape)}")
    if isinstance(field, JumpField):
        return field.jump(x, t, s, cond=cond)
    h = s - t
    k1 = field(x, t, cond=cond)
    if solver in ("euler", "ddim"):
        return kernels.lincomb(x, [k1], [h])
    if solver == "midpoint":
        xm = kernels.lincomb(x, [k1], [0.5 * h])
        return kernels.lincomb(x, [field(xm, 0.5 * (t + s), cond=cond)], [h])
    k2 = field(kernels.lincomb(x, [k1], [h]), s, cond=cond)
    return kernels.lincomb(x, [k1, k2], [0.5 * h, 0.5 * h])
