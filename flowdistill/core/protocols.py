"""The two interfaces every teacher and student meets (DESIGN.md §1)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class VelocityField(Protocol):
    """``v = field(x, t, cond=None)`` with ``x [B, ...]``, ``t [B]`` → ``[B, ...]``."""

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class FlowMap(Protocol):
    """``y = fmap(x, t, s, cond=None)``: the state at time ``t`` carried to time ``s``."""

    def __call__(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor: ...
