"""``MLPFlowNet``: a plain SiLU MLP for 2-D (or any flat ``[B, D]``) toy problems.

The conditioning enters the first layer additively (equivalent to concatenating it to the input,
but with separately named weights):

    h₁ = SiLU(W_x·x + W_t·emb(t) [+ W_r·emb(t − s)] [+ E[label]] + b)
    h_{k+1} = SiLU(W_k·h_k + b_k),   out = W_o·h_depth + b_o

``W_r`` (two-time only) starts at zero, so a two-time net initialised from a one-time teacher of the
same sizes reproduces it for every ``s``. No per-layer time MLP: at batch 4096 the forward pass
is a handful of GEMMs, which keeps CPU training of toy teachers fast.
"""

from __future__ import annotations

import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from flowdistill.models.embeddings import check_times, check_x, class_labels, sinusoidal_embedding


class MLPFlowNet(ModelMixin, ConfigMixin):
    """Velocity ``v(x, t)`` or average velocity ``u(x, t, s)`` on ``x [B, data_dim]``.

    Config: ``data_dim`` (2), ``hidden`` (256), ``depth`` (number of hidden SiLU layers, 4),
    ``time_embed_dim`` (sinusoidal features, 64), ``num_classes`` (0 = unconditional),
    ``two_time`` (False), ``time_scale`` (1000: features of ``1000·t``).
    """

    @register_to_config
    def __init__(self, data_dim: int = 2, hidden: int = 256, depth: int = 4, time_embed_dim: int = 64,
                 num_classes: int = 0, two_time: bool = False, time_scale: float = 1000.0):
        super().__init__()
        if data_dim < 1 or hidden < 1 or depth < 1 or time_embed_dim < 2 or num_classes < 0:
            raise ValueError("MLPFlowNet needs data_dim, hidden, depth >= 1, time_embed_dim >= 2, "
                             "num_classes >= 0")
        self.in_x = nn.Linear(data_dim, hidden)
        self.in_t = nn.Linear(time_embed_dim, hidden, bias=False)
        self.in_r = None
        if two_time:
            self.in_r = nn.Linear(time_embed_dim, hidden, bias=False)
            nn.init.zeros_(self.in_r.weight)
        self.class_embed = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.5)
        self.hidden_layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, data_dim)

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """``x [B, data_dim]``, ``t [B]`` (noise level), ``s [B]`` or None, ``cond [B]`` or None."""
        cfg = self.config
        check_x(x, f"[B, {cfg.data_dim}]", x.ndim == 2 and x.shape[1] == cfg.data_dim)
        check_times(x, t, s, cfg.two_time)
        dtype = self.in_x.weight.dtype
        h = self.in_x(x) + self.in_t(sinusoidal_embedding(t, cfg.time_embed_dim, cfg.time_scale).to(dtype))
        if self.in_r is not None:
            r = t - (t if s is None else s)
            h = h + self.in_r(sinusoidal_embedding(r, cfg.time_embed_dim, cfg.time_scale).to(dtype))
        if self.class_embed is not None:
            h = h + self.class_embed(class_labels(cond, x.shape[0], cfg.num_classes, x.device))
        h = F.silu(h)
        for layer in self.hidden_layers:
            h = F.silu(layer(h))
        return self.out(h)
