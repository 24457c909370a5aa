"""Exponential moving average of a module's parameters (buffers are copied)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from flowdistill import kernels
from flowdistill.training.engine import full_tensor


class EMA:
    """``θ_ema ← d·θ_ema + (1 − d)·θ`` after each optimiser step, with optional warm-up.

    With ``warmup=True`` the decay is ``min(d, (1 + n)/(10 + n))`` at update ``n``, so early
    averages are not dominated by the random initialisation.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay used at the next update."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold the current parameters of ``module`` into the average."""
        d = self.current_decay()
        ema_p = [p for p in self.module.parameters() if p.dtype.is_floating_point]
        # a sharded (FSDP2) source holds DTensors: average their full values
        src_p = [full_tensor(p.detach()) for p in module.parameters() if p.dtype.is_floating_point]
        kernels.ema_update_(ema_p, src_p, d)
        for b_ema, b in zip(self.module.buffers(), module.buffers(), strict=True):
            b_ema.copy_(full_tensor(b))
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Averaged weights plus the update count (as a tensor, for safetensors)."""
        sd = {k: v for k, v in self.module.state_dict().items()}
        sd["__ema_num_updates__"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`."""
        sd = dict(sd)
        self.num_updates = int(sd.pop("__ema_num_updates__").item())
        self.module.load_state_dict(sd)
