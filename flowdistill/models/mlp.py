"""``MLPFlowNet``: a plain SiLU MLP for 2-D (or any flat ``[B, D]``) toy problems.

The condition enters every layer as an additive per-layer bias (a shift-only FiLM):

    c = W_t·emb(t) [+ W_r·emb(t − s)] [+ E[label]]           ∈ R^{depth·hidden},  c = (c_1, …, c_depth)
    h_1 = SiLU(W_x·x + b_x + c_1),   h_{k+1} = SiLU(W_k·h_k + b_k + c_{k+1}),   out = W_o·h_depth + b_o

Feeding time to every layer (rather than only the input) gives markedly sharper toy teachers for
the same number of steps at about one extra hidden-layer GEMM of cost. ``W_r`` (two-time only) starts
at zero, so a two-time net initialised from a one-time teacher of the same sizes reproduces it for
every ``s``. Parameter names: ``in_x``, ``hidden_layers.k``, ``out``, ``in_t`` (W_t), ``in_r`` (W_r,
two-time only), ``class_embed`` (E, ``num_classes > 0``).
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
    ``two_time`` (False), ``time_scale`` (1000: features of ``1000·t``), ``delta_time_scale``
    (None = ``time_scale``): the scale of the two-time ``(t − s)`` branch only. A small value (1–10)
    makes ``u`` smooth in ``s``, so exact JVPs ``∂_s u`` are usable; a one-time teacher has no such
    branch, so any value keeps a student initialised from it equal to the teacher.
    """

    @register_to_config
    def __init__(self, data_dim: int = 2, hidden: int = 256, depth: int = 4, time_embed_dim: int = 64,
                 num_classes: int = 0, two_time: bool = False, time_scale: float = 1000.0,
                 delta_time_scale: float | None = None):
        super().__init__()
        if data_dim < 1 or hidden < 1 or depth < 1 or time_embed_dim < 2 or num_classes < 0:
            raise ValueError("MLPFlowNet needs data_dim, hidden, depth >= 1, time_embed_dim >= 2, "
                             "num_classes >= 0")
        if delta_time_scale is not None and not delta_time_scale > 0:
            raise ValueError(f"MLPFlowNet delta_time_scale must be positive or None, got {delta_time_scale}")
        self.in_x = nn.Linear(data_dim, hidden)
        self.hidden_layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, data_dim)
        self.in_t = nn.Linear(time_embed_dim, depth * hidden, bias=False)
        self.in_r = None
        if two_time:
            self.in_r = nn.Linear(time_embed_dim, depth * hidden, bias=False)
            nn.init.zeros_(self.in_r.weight)
        self.class_embed = None
        if num_classes > 0:
            self.class_embed = nn.Embedding(num_classes + 1, depth * hidden)
            nn.init.normal_(self.class_embed.weight, std=0.5)

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """``x [B, data_dim]``, ``t [B]`` (noise level), ``s [B]`` or None, ``cond [B]`` or None:
        the output layer on the last of :meth:`features`."""
        return self.out(self.features(x, t, s, cond)[-1])

    # -- the trunk (also the feature hook of discriminators on frozen teacher features)
    @property
    def feature_channels(self) -> list[int]:
        """Widths of the tensors :meth:`features` returns (``hidden``, one per hidden layer)."""
        return [self.config.hidden] * self.config.depth

    def features(self, x: Tensor, t: Tensor, s: Tensor | None = None,
                 cond: Tensor | None = None) -> list[Tensor]:
        """The hidden activations ``[h_1, …, h_depth]`` (each ``[B, hidden]``) at ``(x, t[, s], cond)``:
        ``c = emb(t) [+ emb(t − s)] [+ emb(class)]`` split per layer, ``h_1 = silu(W_x x + c_1)``,
        ``h_k = silu(W_k h_{k−1} + c_k)``; :meth:`forward` applies the output layer to ``h_depth``."""
        cfg = self.config
        check_x(x, f"[B, {cfg.data_dim}]", x.ndim == 2 and x.shape[1] == cfg.data_dim)
        check_times(x, t, s, cfg.two_time)
        dtype = self.in_x.weight.dtype
        c = self.in_t(sinusoidal_embedding(t, cfg.time_embed_dim, cfg.time_scale).to(dtype))
        if self.in_r is not None:
            r = t - (t if s is None else s)
            scale2 = cfg.time_scale if cfg.delta_time_scale is None else cfg.delta_time_scale
            c = c + self.in_r(sinusoidal_embedding(r, cfg.time_embed_dim, scale2).to(dtype))
        if self.class_embed is not None:
            c = c + self.class_embed(class_labels(cond, x.shape[0], cfg.num_classes, x.device))
        cs = c.chunk(cfg.depth, dim=1)
        hs = [F.silu(self.in_x(x) + cs[0])]
        for layer, ck in zip(self.hidden_layers, cs[1:], strict=True):
            hs.append(F.silu(layer(hs[-1]) + ck))
        return hs
