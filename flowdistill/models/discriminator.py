"""Discriminators on frozen teacher features (PCM's adversarial option, METHODS.md §3).

PCM's discriminator is the frozen teacher backbone with small trainable heads on several of its
layers. Here the backbone is any flow net with a feature hook,

    features(x, t, s=None, cond=None) -> [h_1, …, h_L]      (each [B, C_l, ...])
    feature_channels -> [C_1, …, C_L]

(:meth:`flowdistill.models.mlp.MLPFlowNet.features`: the MLP's hidden activations), and
:class:`FeatureHeads` holds only the heads: per layer ``l`` a two-layer per-position MLP
``C_l → hidden → 1`` (SiLU) averaged over positions, and the logit

    D(x, t) = (1/L)·Σ_l head_l(h_l(x, t)).

The backbone stays outside the module tree (it is the frozen teacher: never trained or saved with
the heads); the heads are the trainable, checkpointed part. Losses: :func:`hinge_d_loss`,
:func:`hinge_g_loss` (the hinge GAN losses of PCM).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def has_features(net: nn.Module) -> bool:
    """Whether ``net`` offers the feature hook (``features`` and ``feature_channels``)."""
    return callable(getattr(net, "features", None)) and hasattr(net, "feature_channels")


class FeatureHeads(nn.Module):
    """Trainable heads on a frozen backbone's features (module docstring)."""

    def __init__(self, channels: list[int], hidden: int = 64):
        super().__init__()
        if not channels or hidden < 1:
            raise ValueError(f"FeatureHeads needs feature channels and hidden >= 1, got {channels}, {hidden}")
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(int(c), hidden), nn.SiLU(), nn.Linear(hidden, 1))
                                   for c in channels)

    def forward(self, feats: list[Tensor]) -> Tensor:
        """``D`` logits ``[B]`` from the backbone's feature list (channels on dim 1)."""
        if len(feats) != len(self.heads):
            raise ValueError(f"FeatureHeads has {len(self.heads)} heads, got {len(feats)} feature tensors")
        out = 0.0
        for head, h in zip(self.heads, feats, strict=True):
            y = head(h.movedim(1, -1).to(head[0].weight.dtype))  # [B, ..., 1]: per position
            out = out + y.reshape(y.shape[0], -1).mean(dim=1)
        return out / len(self.heads)


def discriminate(heads: nn.Module, backbone: nn.Module, x: Tensor, t: Tensor,
                 cond: Tensor | None = None) -> Tensor:
    """``D(x, t) = heads(backbone.features(x, t, cond=cond))``: gradient flows to ``x`` through the
    frozen backbone and to the heads' parameters."""
    return heads(backbone.features(x, t, cond=cond))


def hinge_d_loss(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """Discriminator hinge loss ``mean relu(1 − D(real)) + mean relu(1 + D(fake))``."""
    return F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()


def hinge_g_loss(d_fake: Tensor) -> Tensor:
    """Generator hinge loss ``−mean D(fake)``."""
    return -d_fake.mean()


__all__ = ["FeatureHeads", "discriminate", "has_features", "hinge_d_loss", "hinge_g_loss"]

