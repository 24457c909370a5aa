"""``DiTFlowNet``: a small Diffusion Transformer (Peebles & Xie 2023) for small images.

Patchify (a stride-``patch_size`` conv) + fixed 2-D sin-cos position embedding → ``depth`` blocks
of pre-LayerNorm self-attention and MLP, each modulated by adaLN-zero (shift, scale and gate from
the condition vector ``c = emb(t) [+ emb₂(t − s)] [+ class]``) → adaLN final layer → unpatchify.
All modulation layers and the output projection start at zero, so a fresh net outputs zero.
Attention uses ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from flowdistill.models.embeddings import ConditionEmbedding, check_times, check_x


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding ``[grid*grid, dim]`` (``dim`` divisible by 4)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")

    def one(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one(gx), one(gy)], dim=1).float()


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Self-attention + MLP with adaLN-zero modulation."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)
        self.ada = nn.Linear(hidden, 6 * hidden)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def attn(self, x: Tensor) -> Tensor:
        """Multi-head self-attention on tokens ``[B, N, hidden]``."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``x [B, N, hidden]``, ``c [B, hidden]`` (already passed through SiLU)."""
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(_modulate(self.norm1(x), sh1, sc1))
        h = _modulate(self.norm2(x), sh2, sc2)
        return x + g2[:, None] * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class DiTFlowNet(ModelMixin, ConfigMixin):
    """Velocity ``v(x, t)`` or average velocity ``u(x, t, s)`` on ``x [B, C, S, S]``.

    Config: ``sample_size`` (S, 16), ``in_channels`` (1), ``out_channels`` (None = in_channels),
    ``patch_size`` (2), ``hidden`` (128, divisible by 4 and by ``heads``), ``depth`` (4),
    ``heads`` (4), ``mlp_ratio`` (4.0), ``num_classes`` (0), ``two_time`` (False),
    ``time_scale`` (1000), ``freq_dim`` (256: sinusoidal features before the time MLP),
    ``delta_time_scale`` (None = time_scale: the scale of the two-time ``(t − s)`` branch; 1–10 keeps
    ``u`` smooth in ``s`` for exact JVPs ``∂_s u``).
    """

    @register_to_config
    def __init__(self, sample_size: int = 16, in_channels: int = 1, out_channels: int | None = None,
                 patch_size: int = 2, hidden: int = 128, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 4.0, num_classes: int = 0, two_time: bool = False,
                 time_scale: float = 1000.0, freq_dim: int = 256, delta_time_scale: float | None = None):
        super().__init__()
        if patch_size < 1 or sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} must be divisible by patch_size {patch_size}")
        if hidden % heads or hidden % 4:
            raise ValueError(f"hidden {hidden} must be divisible by heads {heads} and by 4")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.grid = sample_size // patch_size
        self.out_ch = int(out_channels or in_channels)
        self.patch_embed = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, self.grid)[None], persistent=False)
        self.cond_embed = ConditionEmbedding(hidden, freq_dim=freq_dim, num_classes=num_classes,
                                             two_time=two_time, time_scale=time_scale,
                                             delta_time_scale=delta_time_scale)
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(hidden, 2 * hidden)
        self.linear_out = nn.Linear(hidden, patch_size * patch_size * self.out_ch)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT init: Xavier linears, std-0.02 time MLP, zeroed modulation and output layers."""
        for block in self.blocks:
            for lin in (block.qkv, block.proj, block.fc1, block.fc2):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for seq in (self.cond_embed.time_embed, self.cond_embed.time_embed2):
            if seq is not None:
                nn.init.normal_(seq[0].weight, std=0.02)
                if seq is self.cond_embed.time_embed:
                    nn.init.normal_(seq[2].weight, std=0.02)
        for lin in (self.ada_out, self.linear_out):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """``x [B, in_channels, S, S]``, ``t [B]``, ``s [B]`` or None, ``cond [B]`` or None."""
        cfg = self.config
        size, p = cfg.sample_size, cfg.patch_size
        check_x(x, f"[B, {cfg.in_channels}, {size}, {size}]",
                x.ndim == 4 and tuple(x.shape[1:]) == (cfg.in_channels, size, size))
        check_times(x, t, s, cfg.two_time)
        c = F.silu(self.cond_embed(t, s, cond))
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada_out(c).chunk(2, dim=1)
        h = self.linear_out(_modulate(self.norm_out(h), shift, scale))  # [B, N, p*p*C]
        b, g = x.shape[0], self.grid
        h = h.reshape(b, g, g, p, p, self.out_ch).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, self.out_ch, size, size)
