"""Coupling error: how far a few-step sampler's output lies from the teacher's ODE image of the
same noise (trajectory preservation, METHODS.md §3 "small-scale evidence").

    E(nfe) = E_ε ‖S_nfe(ε) − ODE_T(ε; 1 → 0)‖

with ``‖·‖`` the L2 norm over the data dimensions and ``ODE_T`` the teacher's ODE solved with many
Euler steps (the reference, ``ref_steps``). A distribution distance cannot see it: a student that
maps ε to the *wrong* point of the right distribution scores well on sliced W2 but not here.
Segmenting (PCM, TSCD) is meant to keep this small; one-segment consistency (LCM) need not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from flowdistill.core.sampling import sample_velocity


@torch.no_grad()
def teacher_ode(field, noise: Tensor, ref_steps: int = 512, solver: str = "euler",
                cond: Tensor | None = None) -> Tensor:
    """``ODE_T(ε)``: the teacher's sample from ``noise`` with ``ref_steps`` steps of ``solver``."""
    return sample_velocity(field, noise, ref_steps, solver, cond=cond).x


@torch.no_grad()
def coupling_error(sampler: Callable[[Tensor, int], Tensor], reference: Tensor, noise: Tensor,
                   nfes: Iterable[int]) -> dict[int, float]:
    """``{nfe: mean_ε ‖sampler(ε, nfe) − reference‖}`` (``reference = teacher_ode(…, noise)``)."""
    out = {}
    for nfe in nfes:
        d = (sampler(noise, int(nfe)) - reference).reshape(noise.shape[0], -1).double()
        out[int(nfe)] = float(d.norm(dim=1).mean())
    return out
