"""Broadcasting a per-sample ``[B]`` tensor (a time, a weight) against a batch ``[B, ...]``."""

from __future__ import annotations

from torch import Tensor


def bcast(t: Tensor, x: Tensor) -> Tensor:
    """``t [B]`` reshaped to ``[B, 1, …, 1]`` (``x.ndim`` dims) in ``x``'s dtype and device.

    A 0-d ``t`` is only cast (it broadcasts as it is).
    """
    t = t.to(device=x.device, dtype=x.dtype)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or (t.shape[0] != x.shape[0] and t.shape[0] != 1):
        raise ValueError(f"expected a per-sample tensor of shape [{x.shape[0]}], got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.ndim - 1)))
