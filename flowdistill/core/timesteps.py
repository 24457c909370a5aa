"""Training time samplers and sampling time grids (t = noise level, 1 → 0 when generating)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flowdistill.core.registry import Registry

TIME_SAMPLERS: Registry = Registry("time sampler")
TIME_GRIDS: Registry = Registry("time grid")

_EPS = 1e-5


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3 time shift ``t' = k·t / (1 + (k − 1)·t)`` (``k = 1`` is the identity)."""
    return shift * t / (1 + (shift - 1) * t)


class TimeSampler:
    """Draws training times ``t [B]`` in ``[t_min, t_max]`` from a generator."""

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0):
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"time range must satisfy 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
        self.t_min, self.t_max = t_min, t_max

    def draw_unit(self, n: int, generator: torch.Generator | None, device) -> Tensor:
        """Times in [0, 1] before mapping into ``[t_min, t_max]``."""
        raise NotImplementedError

    def __call__(self, n: int, generator: torch.Generator | None = None, device="cpu") -> Tensor:
        """``n`` times mapped into ``[t_min, t_max]``."""
        u = self.draw_unit(n, generator, device)
        return self.t_min + (self.t_max - self.t_min) * u


@TIME_SAMPLERS.register("uniform")
class UniformTime(TimeSampler):
    """``t ~ U[t_min, t_max]``."""

    def draw_unit(self, n, generator, device):
        return torch.rand(n, generator=generator, device=device)


@TIME_SAMPLERS.register("logit_normal")
class LogitNormalTime(TimeSampler):
    """``t = sigmoid(m + s·z)``, ``z ~ N(0, 1)`` (SD3; MDT-dist uses m = 1, s = 1)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0, **kw):
        super().__init__(**kw)
        self.mean, self.std = mean, std

    def draw_unit(self, n, generator, device):
        z = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(self.mean + self.std * z)


@TIME_SAMPLERS.register("shifted")
class ShiftedTime(TimeSampler):
    """Uniform ``u`` pushed through the SD3 shift ``k·u / (1 + (k − 1)·u)``."""

    def __init__(self, shift: float = 3.0, **kw):
        super().__init__(**kw)
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.shift = shift

    def draw_unit(self, n, generator, device):
        return shift_time(torch.rand(n, generator=generator, device=device), self.shift)


@TIME_SAMPLERS.register("u_shaped")
class UShapedTime(TimeSampler):
    """rfpp's U-shaped density ``p(t) ∝ cosh(a·(t − ½))`` (arXiv 2405.20320).

    Draw ``u`` with density ``a·e^{au}/(e^a − 1)`` by inverse CDF ``u = ln(1 + U·(e^a − 1))/a``,
    then use ``u`` or ``1 − u`` with probability ½; clip to ``[1e-5, 1 − 1e-5]``.
    """

    def __init__(self, a: float = 4.0, **kw):
        super().__init__(**kw)
        if a <= 0:
            raise ValueError(f"a must be positive, got {a}")
        self.a = a

    def draw_unit(self, n, generator, device):
        U = torch.rand(n, generator=generator, device=device)
        flip = torch.rand(n, generator=generator, device=device) < 0.5
        u = torch.log1p(U * math.expm1(self.a)) / self.a
        u = torch.where(flip, 1 - u, u)
        return u.clamp(_EPS, 1 - _EPS)


@TIME_GRIDS.register("uniform")
def uniform_grid(n: int, device="cpu", dtype=torch.float32) -> Tensor:
    """``n + 1`` equally spaced times from 1 down to 0."""
    _check_steps(n)
    return torch.linspace(1.0, 0.0, n + 1, device=device, dtype=dtype)


@TIME_GRIDS.register("shifted")
def shifted_grid(n: int, shift: float = 3.0, device="cpu", dtype=torch.float32) -> Tensor:
    """Uniform grid pushed through the SD3 shift (denser near t = 1 for ``shift > 1``)."""
    return shift_time(uniform_grid(n, device=device, dtype=torch.float64), shift).to(dtype)


def _check_steps(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of steps must be a positive integer, got {n!r}")


def build_grid(name: str, n: int, device="cpu", dtype=torch.float32, **kw) -> Tensor:
    """A registered time grid by name."""
    return TIME_GRIDS.get(name)(n, device=device, dtype=dtype, **kw)


@dataclass
class TimeSamplerConfig:
    """Names a registered training time sampler and its parameters."""

    name: str = "uniform"
    t_min: float = 0.0
    t_max: float = 1.0
    mean: float = 0.0  # logit_normal
    std: float = 1.0  # logit_normal
    shift: float = 3.0  # shifted
    a: float = 4.0  # u_shaped

    def build(self) -> TimeSampler:
        """Instantiate the named sampler with the parameters it takes."""
        cls = TIME_SAMPLERS.get(self.name)
        kw: dict = {"t_min": self.t_min, "t_max": self.t_max}
        extra = {"logit_normal": {"mean": self.mean, "std": self.std}, "shifted": {"shift": self.shift},
                 "u_shaped": {"a": self.a}}
        kw.update(extra.get(self.name, {}))
        return cls(**kw)
