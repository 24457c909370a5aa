"""Flow maps ``X(x, t, s) = x + (s − t)·u(x, t, s)`` and their few-step sampler (DESIGN.md §1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowdistill import kernels
from flowdistill.core.broadcast import bcast
from flowdistill.core.timesteps import build_grid


class AverageVelocityMap(nn.Module):
    """Turns a two-time network ``u(x, t, s)`` into a :class:`~flowdistill.core.protocols.FlowMap`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        """``X(x, t, s) = x + (s − t)·u(x, t, s)``."""
        return kernels.flow_map_jump(x, self.net(x, t, s, cond=cond), t, s)


def flow_map_jump(net: nn.Module, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
    """One jump of a two-time average-velocity network from ``t`` to ``s``."""
    return kernels.flow_map_jump(x, net(x, t, s, cond=cond), t, s)


def flow_map_chain(net: nn.Module, noise: Tensor, steps: int, grid: str = "uniform",
                   cond: Tensor | None = None, return_trajectory: bool = False, **grid_kw):
    """``steps`` jumps edge to edge along a time grid from ``t = 1`` to ``0`` (one NFE each),
    differentiable (training losses on few-step samples backpropagate through every jump)."""
    g = build_grid(grid, steps, device=noise.device, **grid_kw)
    B = noise.shape[0]
    x = noise
    traj = [x] if return_trajectory else None
    for i in range(steps):
        t, s = g[i].expand(B), g[i + 1].expand(B)
        x = flow_map_jump(net, x, t, s, cond)
        if traj is not None:
            traj.append(x)
    return (x, traj) if return_trajectory else x


@torch.no_grad()
def sample_flow_map(net: nn.Module, noise: Tensor, steps: int, grid: str = "uniform",
                    cond: Tensor | None = None, return_trajectory: bool = False, **grid_kw):
    """:func:`flow_map_chain` without gradients: the few-step flow-map sampler."""
    return flow_map_chain(net, noise, steps, grid, cond, return_trajectory, **grid_kw)


@torch.no_grad()
def shortcut_target(net: nn.Module, x_t: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
    """Stop-gradient average velocity of two half jumps (shortcut models' self-consistency,
    Frans et al. 2024, "One Step Diffusion via Shortcut Models"):

        m = (t + s)/2,   u₁ = u(x_t, t, m),   x_m = x_t + (m − t)·u₁,
        target = ½·(u₁ + u(x_m, m, s)),

    so that ``x_t + (s − t)·target`` is the jump ``t → s`` made by composing ``net`` with itself.
    ``t, s`` are ``[B]``; ``net`` is a two-time average-velocity network ``u(x, t, s, cond=)``.
    """
    m = 0.5 * (t + s)
    u1 = net(x_t, t, m, cond=cond)
    x_m = x_t + bcast(m - t, x_t) * u1
    return 0.5 * (u1 + net(x_m, m, s, cond=cond))
