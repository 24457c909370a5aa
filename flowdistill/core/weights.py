"""Per-sample loss weights.

MeanFlow's adaptive weighting (Geng et al. 2025, "Mean Flows for One-step Generative Modeling",
§4.3): a per-sample squared error ``‖Δ‖²/D`` is multiplied by ``w = 1 / sg(‖Δ‖²/D + c)^p``, so the
loss ``w·‖Δ‖²/D`` behaves like ``‖Δ‖^{2(1−p)}`` (``p = 1``: roughly the robust ``log``-like loss,
``p = 0.5``: pseudo-Huber-like, ``p = 0``: plain L2). The weight carries no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


def adaptive_weight(sq: Tensor, p: float = 1.0, c: float = 1e-3) -> Tensor:
    """``w = 1 / sg(sq + c)^p`` for a per-sample squared error ``sq [B]`` (ones when ``p <= 0``)."""
    if p <= 0:
        return torch.ones_like(sq)
    if c <= 0:
        raise ValueError(f"adaptive weight constant c must be positive, got {c}")
    return (sq.detach() + c).pow(-p)
