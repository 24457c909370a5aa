"""Batch statistics over the global batch, whatever the number of processes.

A loss whose weighting depends on a statistic of the batch (FreeFlow's gradient balancing, a
per-batch normaliser) must use the statistic of the *global* batch, or N processes (each seeing a
slice) train differently from one. These helpers all-reduce when a process group is running and
are the identity otherwise. Gradient-accumulation micro-batches are sequential, so there the
statistic is the micro-batch's (documented where a method uses it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Processes in the running group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_rms(x: Tensor) -> Tensor:
    """``sqrt(mean(x²))`` over every element of ``x`` on every process (detached)."""
    x = x.detach()
    if world_size() == 1:
        return x.pow(2).mean().sqrt()
    stats = torch.stack([x.pow(2).sum().to(torch.float64), torch.tensor(float(x.numel()), dtype=torch.float64,
                                                                          device=x.device)])
    dist.all_reduce(stats)
    return (stats[0] / stats[1]).sqrt().to(x.dtype)
