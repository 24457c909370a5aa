"""Time and class embeddings shared by the reference networks, plus input validation.

Time embedding: sinusoidal features of ``time_scale · t`` (default ``time_scale = 1000``, the DDPM /
DiT convention, so ``t ∈ [0, 1]`` spans the same frequency range as integer timesteps 0..1000):

    emb(t) = [cos(time_scale·t·f_0), …, cos(time_scale·t·f_{h−1}), sin(…)],  f_k = P^(−k/h),

with ``h = dim // 2`` and max period ``P = 10000``. The features are smooth in ``t``, so forward-mode
JVPs with respect to ``t`` work; they are always computed in float32 (or float64) and only then cast.

Two-time nets (flow maps ``u(x, t, s)``) embed ``emb(t) + emb₂(t − s)``; the second branch ends in a
zero-initialised layer, so a fresh two-time net ignores ``s`` and a two-time student loaded from a
one-time teacher (same sizes, ``strict=False``) starts exactly as the teacher. ``emb₂`` may use its
own scale (``delta_time_scale``, default ``time_scale``): a small one (1–10) keeps ``u`` smooth in
``s`` so that exact JVPs ``∂_s u`` are well behaved.

Class labels index a table of ``num_classes + 1`` rows; row ``num_classes`` is the null
(unconditional) label and ``cond=None`` means all-null.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, time_scale: float = 1000.0,
                         max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features ``[B] -> [B, dim]`` of ``time_scale · t`` (float32 unless ``t`` is float64)."""
    tt = t if t.dtype == torch.float64 else t.float()
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=tt.dtype)
    freqs = torch.exp(k * (-math.log(max_period) / max(half, 1)))
    args = (time_scale * tt)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _fmt(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def check_x(x: Tensor, expected: str, ok: bool) -> None:
    """Raise ``ValueError("expected x of shape <expected>, got [...]")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"expected x of shape {expected}, got {_fmt(x.shape)}")


def check_time(t: Tensor, batch: int, name: str = "t") -> None:
    """Raise ``ValueError`` unless ``t`` is a floating tensor of shape ``[batch]``."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor of shape [B] = [{batch}], got {type(t).__name__}")
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {_fmt(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def class_labels(cond: Tensor | None, batch: int, num_classes: int, device: torch.device) -> Tensor:
    """Labels ``[B]`` (long); ``None`` becomes all-null (index ``num_classes``)."""
    if cond is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    if not isinstance(cond, Tensor) or cond.ndim != 1 or cond.shape[0] != batch:
        shape = _fmt(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
        raise ValueError(f"cond must be a LongTensor of shape [B] = [{batch}], got {shape}")
    if cond.is_floating_point() or cond.is_complex() or cond.dtype == torch.bool:
        raise ValueError(f"cond must hold integer class labels, got {cond.dtype}")
    if cond.device.type == "cpu" and cond.numel() and (int(cond.min()) < 0 or int(cond.max()) > num_classes):
        raise ValueError(f"cond labels must lie in [0, {num_classes}] ({num_classes} = null label), "
                         f"got values in [{int(cond.min())}, {int(cond.max())}]")
    return cond.long()


def time_mlp(freq_dim: int, dim: int, zero_out: bool = False) -> nn.Sequential:
    """``Linear(freq_dim, dim) → SiLU → Linear(dim, dim)``; the last layer zeroed if ``zero_out``."""
    mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
    if zero_out:
        nn.init.zeros_(mlp[2].weight)
        nn.init.zeros_(mlp[2].bias)
    return mlp


class ConditionEmbedding(nn.Module):
    """``c = mlp(emb(t)) [+ mlp₂(emb(t − s))] [+ table[label]]`` → ``[B, dim]``.

    Parameter names: ``time_embed.*`` (always), ``time_embed2.*`` (two-time only, zero-initialised
    output) and ``class_embed.weight`` (``num_classes > 0``), so one- and two-time nets of the same
    sizes share every one-time key.
    """

    def __init__(self, dim: int, freq_dim: int = 256, num_classes: int = 0, two_time: bool = False,
                 time_scale: float = 1000.0, class_init_std: float = 0.02,
                 delta_time_scale: float | None = None):
        super().__init__()
        self.freq_dim, self.time_scale = int(freq_dim), float(time_scale)
        # scale of the (t − s) branch only (None = time_scale); small values make u smooth in s
        self.delta_time_scale = self.time_scale if delta_time_scale is None else float(delta_time_scale)
        if not self.delta_time_scale > 0:
            raise ValueError(f"delta_time_scale must be positive or None, got {delta_time_scale}")
        self.num_classes, self.two_time = int(num_classes), bool(two_time)
        self.time_embed = time_mlp(self.freq_dim, dim)
        self.time_embed2 = time_mlp(self.freq_dim, dim, zero_out=True) if two_time else None
        self.class_embed = None
        if self.num_classes > 0:
            self.class_embed = nn.Embedding(self.num_classes + 1, dim)
            nn.init.normal_(self.class_embed.weight, std=class_init_std)

    def forward(self, t: Tensor, s: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """Embed (already validated) times ``t``, ``s`` ``[B]`` and labels ``[B]`` or ``None``."""
        dtype = self.time_embed[0].weight.dtype
        c = self.time_embed(sinusoidal_embedding(t, self.freq_dim, self.time_scale).to(dtype))
        if self.time_embed2 is not None:
            r = t - (t if s is None else s)
            c = c + self.time_embed2(sinusoidal_embedding(r, self.freq_dim, self.delta_time_scale).to(dtype))
        if self.class_embed is not None:
            c = c + self.class_embed(class_labels(cond, t.shape[0], self.num_classes, t.device))
        return c


def check_times(x: Tensor, t: Tensor, s: Tensor | None, two_time: bool) -> None:
    """Validate ``t`` and (two-time nets only) ``s`` against the batch of ``x``; labels are checked
    where they are embedded (:func:`class_labels`)."""
    check_time(t, x.shape[0], "t")
    if two_time and s is not None:
        check_time(s, x.shape[0], "s")
