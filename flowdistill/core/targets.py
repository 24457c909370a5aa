"""Target networks ``θ⁻`` for consistency-style losses (METHODS.md §3, §4).

Two kinds, one interface:

- ``"online"``: the student itself, evaluated under no-grad (PCM, LCM-LoRA, MDT-dist's VM). Holds
  no weights of its own; the student is *not* registered as a submodule (the distiller owns it).
- ``"ema"``: a frozen copy updated after each optimiser step by
  ``θ⁻ ← d·θ⁻ + (1 − d)·θ`` (full-model LCM, ``d = 0.95``). It is an ``nn.Module`` so, as an
  attribute of the distiller, it is saved and restored with the distiller's checkpoint.

This is the *training* target, distinct from the training loop's evaluation EMA (a slower average
kept only to sample from).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

TARGET_MODES = ("online", "ema")


class TargetNetwork(nn.Module):
    """The target ``θ⁻``: call it like the student; it never carries gradient."""

    def __init__(self, student: nn.Module, mode: str = "online", decay: float = 0.95):
        super().__init__()
        if mode not in TARGET_MODES:
            raise ValueError(f"target network mode must be one of {', '.join(TARGET_MODES)}, got {mode!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"target network decay must be in [0, 1], got {decay}")
        self.mode, self.decay = mode, float(decay)
        # online: keep a reference outside the module tree so the student's weights are not saved twice
        self.__dict__["_student"] = student
        self.ema: nn.Module | None = None
        if mode == "ema":
            self.ema = copy.deepcopy(student)
            self.ema.requires_grad_(False)
            self.ema.eval()

    @property
    def net(self) -> nn.Module:
        """The network evaluated as ``θ⁻`` (the EMA copy, or the live student)."""
        return self.ema if self.ema is not None else self.__dict__["_student"]

    def forward(self, *args, **kwargs) -> Tensor:
        """``θ⁻(…)`` under no-grad (same arguments as the student)."""
        with torch.no_grad():
            return self.net(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module | None = None) -> None:
        """EMA step ``θ⁻ ← d·θ⁻ + (1 − d)·θ`` on parameters; buffers are copied. No-op when online.

        ``student`` defaults to the network given at construction (pass the unwrapped module)."""
        if self.ema is None:
            return
        src = student if student is not None else self.__dict__["_student"]
        tgt_p = dict(self.ema.named_parameters())
        src_p = dict(src.named_parameters())
        if tgt_p.keys() != src_p.keys():
            raise ValueError("target network and student have different parameters")
        for name, p in tgt_p.items():
            p.mul_(self.decay).add_(src_p[name].detach().to(p.dtype), alpha=1.0 - self.decay)
        tgt_b = dict(self.ema.named_buffers())
        for name, b in src.named_buffers():
            if name in tgt_b:
                tgt_b[name].copy_(b)

    def train(self, mode: bool = True) -> TargetNetwork:
        """The EMA copy stays in eval mode (no dropout / batch-stat updates in the target)."""
        super().train(mode)
        if self.ema is not None:
            self.ema.eval()
        return self
