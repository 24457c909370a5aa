"""``UNetFlowNet``: a small DDPM-style UNet for small images (e.g. 1×16×16 or 1×32×32 digits).

Layout: ``conv_in`` → per level ``num_res_blocks`` residual blocks (+ a stride-2 conv except at the
last level) → middle (res block, optional self-attention, res block) → mirrored up path with skip
connections (+ nearest-neighbour upsampling) → GroupNorm, SiLU, ``conv_out`` (zero-initialised).

Residual blocks read the condition vector ``c = emb(t) [+ emb₂(t − s)] [+ class]`` (see
:mod:`flowdistill.models.embeddings`) through a scale-shift (FiLM) of their second GroupNorm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from flowdistill.models.embeddings import ConditionEmbedding, check_times, check_x


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count ``<= groups`` that divides ``ch``."""
    return nn.GroupNorm(math.gcd(ch, groups), ch)


class ResBlock(nn.Module):
    """GN → SiLU → conv → GN·(1 + scale) + shift → SiLU → dropout → conv (zero init) + skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = _norm(cout, groups)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``x [B, cin, H, W]``, ``emb [B, emb_dim]`` (already passed through SiLU)."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the ``H·W`` positions (scaled_dot_product_attention)."""

    def __init__(self, ch: int, heads: int, groups: int):
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention channels {ch} not divisible by attention_heads {heads}")
        self.heads = heads
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Residual self-attention on ``x [B, C, H, W]``."""
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hh * ww)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [B, heads, HW, d]
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    """Stride-2 3×3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Halve the spatial size."""
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 followed by a 3×3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Double the spatial size."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNetFlowNet(ModelMixin, ConfigMixin):
    """Velocity ``v(x, t)`` or average velocity ``u(x, t, s)`` on images ``x [B, C, H, W]``.

    Config: ``sample_size`` (nominal H = W, 16; any H, W divisible by ``2**(len(channel_mults)-1)``
    is accepted), ``in_channels`` (1), ``out_channels`` (None = in_channels), ``base_channels`` (32),
    ``channel_mults`` ((1, 2)), ``num_res_blocks`` (1), ``attention`` (True: self-attention in the
    middle block, at the lowest resolution), ``attention_heads`` (4), ``norm_groups`` (8),
    ``dropout`` (0.0), ``time_embed_dim`` (None = 4·base_channels), ``num_classes`` (0),
    ``two_time`` (False), ``time_scale`` (1000), ``delta_time_scale`` (None = time_scale: the scale
    of the two-time ``(t − s)`` branch; 1–10 keeps ``u`` smooth in ``s`` for exact JVPs ``∂_s u``).
    """

    @register_to_config
    def __init__(self, sample_size: int = 16, in_channels: int = 1, out_channels: int | None = None,
                 base_channels: int = 32, channel_mults: tuple[int, ...] = (1, 2), num_res_blocks: int = 1,
                 attention: bool = True, attention_heads: int = 4, norm_groups: int = 8,
                 dropout: float = 0.0, time_embed_dim: int | None = None, num_classes: int = 0,
                 two_time: bool = False, time_scale: float = 1000.0, delta_time_scale: float | None = None):
        super().__init__()
        mults = tuple(int(m) for m in channel_mults)
        if not mults or min(mults) < 1 or base_channels < 1 or num_res_blocks < 1 or in_channels < 1:
            raise ValueError("UNetFlowNet needs non-empty positive channel_mults, base_channels, "
                             "num_res_blocks and in_channels")
        self.factor = 2 ** (len(mults) - 1)
        emb_dim = int(time_embed_dim or 4 * base_channels)
        out_ch = int(out_channels or in_channels)
        self.cond_embed = ConditionEmbedding(emb_dim, freq_dim=max(2 * base_channels, 64),
                                             num_classes=num_classes, two_time=two_time,
                                             time_scale=time_scale, delta_time_scale=delta_time_scale)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        ch = base_channels
        skips = [ch]
        self.down = nn.ModuleList()
        for i, m in enumerate(mults):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, base_channels * m, emb_dim, norm_groups, dropout))
                ch = base_channels * m
                skips.append(ch)
            if i != len(mults) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)

        self.mid1 = ResBlock(ch, ch, emb_dim, norm_groups, dropout)
        self.mid_attn = AttnBlock(ch, attention_heads, norm_groups) if attention else None
        self.mid2 = ResBlock(ch, ch, emb_dim, norm_groups, dropout)

        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + skips.pop(), base_channels * m, emb_dim, norm_groups, dropout))
                ch = base_channels * m
            if i != 0:
                self.up.append(Upsample(ch))

        self.norm_out = _norm(ch, norm_groups)
        self.conv_out = nn.Conv2d(ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """``x [B, in_channels, H, W]``, ``t [B]``, ``s [B]`` or None, ``cond [B]`` or None."""
        cfg = self.config
        f = self.factor
        check_x(x, f"[B, {cfg.in_channels}, H, W] with H, W divisible by {f}",
                x.ndim == 4 and x.shape[1] == cfg.in_channels and x.shape[2] % f == 0 and x.shape[3] % f == 0)
        check_times(x, t, s, cfg.two_time)
        emb = F.silu(self.cond_embed(t, s, cond))
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
            hs.append(h)
        h = self.mid1(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid2(h, emb)
        for block in self.up:
            if isinstance(block, ResBlock):
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))
