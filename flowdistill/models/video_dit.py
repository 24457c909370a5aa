"""``VideoDiTFlowNet``: a DiT over a buffer of frames whose noise level is per frame (StreamDiT).

Input ``x [B, F, C, H, W]`` (frame-major, frame 0 = oldest = cleanest in a streaming buffer),
per-frame times ``t [B, F]`` (a ``[B]`` t is broadcast to every frame) and, for the two-time
(flow-map) variant, ``s [B, F]``. Output: the per-frame velocity ``v`` (or average velocity ``u``
with ``X = x + (s − t)·u`` per frame), same shape as ``x``.

Structure (the image DiT of :mod:`flowdistill.models.dit`, reused block by block):

* tokens: each frame patchified by one stride-``p`` conv, plus the fixed 2-D sin-cos spatial
  embedding (:func:`~flowdistill.models.dit.sincos_pos_embed_2d`) plus a 1-D sin-cos embedding of
  the frame's index in the buffer (:func:`sincos_frame_embed`), ``F·(S/p)²`` tokens in all;
* condition per frame: ``c_f = emb(t_f) [+ emb₂(t_f − s_f)] [+ class]``
  (:class:`~flowdistill.models.embeddings.ConditionEmbedding` applied to the ``B·F`` times), so
  ``c [B, F, hidden]``; every block's adaLN-zero shift / scale / gate is computed from ``c_f`` and
  applies to frame ``f``'s tokens only. All modulation layers and the output projection start at
  zero, so a fresh net outputs zero; the two-time branch is zero-initialised, so a fresh
  ``u(x, t, s)`` equals the one-time path ``v(x, t)`` with the same weights (and a two-time student
  loaded from a one-time teacher starts as the teacher, as in the image DiT);
* attention over all tokens of the buffer with a frame-level mask ``M [F, F]`` (``M[f, g]`` = tokens
  of frame ``f`` may attend to tokens of frame ``g``):

  - ``"full"``: every frame sees every frame (no mask; fastest);
  - ``"window"``: ``|f − g| ≤ window``. StreamDiT reports *shifted* windows (Swin-style: fixed
    non-overlapping frame windows, shifted by half a window in alternate blocks). We use a
    *sliding* window instead: every frame gets the same symmetric context wherever it sits in the
    buffer (no frame sits at a window edge, so no position-dependent seams in the buffer), the
    receptive field still grows by ``window`` frames per block, and with a boolean mask the cost
    is the same as shifted windows;
  - ``"causal"``: ``g ≤ f``. The buffer is ordered oldest → newest, i.e. clean → noisy, so frame
    ``f`` sees itself and the older, cleaner frames (reference frames included) — the usual causal
    direction of autoregressive video (Diffusion Forcing, Self-Forcing). The oldest chunk, which
    is emitted next, then never depends on frames still close to pure noise, and its output does
    not change when fresh noise enters at the end (which would also allow a KV cache). The other
    direction (``g ≥ f``: clean frames look at noisier ones) would make the emitted frames depend
    on noise that is not yet decided.

Attention is ``torch.nn.functional.scaled_dot_product_attention`` with a boolean token mask (none
for ``"full"``). ``local_window=True`` computes a narrow window without the masked work
(:func:`local_window_attention`: keys of the ``2w + 1`` visible frames gathered by ``unfold``; the
same function, tested equal); off by default because on this CPU at ≤ 16 frames the gather costs
what it saves (table). With ``attn_backend="auto"`` (default) and xformers importable and the input
on CUDA, ``xformers.ops.memory_efficient_attention`` runs instead with an additive ``−inf`` bias
(optional, never required; not exercised on this box, which has no GPU); ``"sdpa"`` forces torch.
Forward-mode JVPs need the torch path.

CPU cost of one training step (2026-12-02, this repo's 2-core box shared with ~6 other jobs; one
thread, torch 2.14, batch 16, 32×32×1 frames, patch 4, heads 4, forward + backward of a mean-square
loss; best process CPU time of 2 steps after a warm-up — CPU time rather than wall time because
the box was loaded (load average ≈ 7), which inflated wall times 2–4×;
``OMP_NUM_THREADS=1 python scripts/bench_video_dit.py``):

    frames hidden depth  full     window(2)  window(2) local  causal
      8     64     3     0.74 s   0.74 s     1.33 s           0.73 s
      8    128     4     2.26 s   1.80 s     2.14 s           1.86 s
     16     64     3     2.01 s   2.47 s     2.32 s           2.11 s
     16    128     4     5.03 s   5.36 s     4.67 s           4.88 s

At 16 frames the buffer has 1024 tokens and attention over all of them is about half the cost; a
CPU training run should use 8-frame buffers (512 tokens) and hidden 64 (≈ 0.75 s per step).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from flowdistill.models.dit import DiTBlock, DiTFlowNet, _modulate, sincos_pos_embed_2d
from flowdistill.models.embeddings import ConditionEmbedding, check_x

ATTENTIONS = ("full", "window", "causal")
PREDICTIONS = ("v", "x")
BACKENDS = ("auto", "sdpa", "xformers")
_HAS_XFORMERS = importlib.util.find_spec("xformers") is not None


def sincos_frame_embed(dim: int, frames: int) -> Tensor:
    """1-D sin-cos embedding of the frame index ``[frames, dim]``:
    ``e[f] = [sin(f·ω_k), cos(f·ω_k)]_k``, ``ω_k = 10000^(−k/(dim/2))`` (``dim`` even)."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    out = torch.arange(frames, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def frame_mask(frames: int, attention: str, window: int = 1, device=None) -> Tensor | None:
    """Boolean frame-level mask ``M [frames, frames]`` (``M[f, g]``: frame f may attend to frame g).

    ``"full"`` → ``None`` (no mask); ``"window"`` → ``|f − g| ≤ window``; ``"causal"`` → ``g ≤ f``
    (buffer ordered oldest/cleanest first: a frame sees itself and older frames)."""
    if attention == "full":
        return None
    idx = torch.arange(frames, device=device)
    diff = idx[:, None] - idx[None, :]  # f - g
    if attention == "window":
        return diff.abs() <= window
    if attention == "causal":
        return diff >= 0
    raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")


def window_valid(frames: int, window: int, per: int, device=None) -> Tensor:
    """Key mask ``[F, 1, (2w+1)·P]`` of :func:`local_window_attention`: slot ``o`` of frame ``f``'s
    window holds frame ``g = f − w + o``, valid iff ``0 ≤ g < F`` (the rest is zero padding)."""
    g = torch.arange(frames, device=device)[:, None] - window + torch.arange(2 * window + 1, device=device)
    return ((g >= 0) & (g < frames)).repeat_interleave(per, 1)[:, None]


def local_window_attention(q: Tensor, k: Tensor, v: Tensor, frames: int, window: int,
                           valid: Tensor) -> Tensor:
    """Sliding frame-window attention without the masked work: ``q, k, v [B, H, F·P, D]``; the ``P``
    queries of frame ``f`` attend to the keys of frames ``f − w … f + w`` only (gathered with
    ``unfold`` from zero-padded keys; ``valid`` from :func:`window_valid` masks the padding).
    Equals masked full attention with ``|f − g| ≤ w`` at ``(2w + 1)/F`` of its cost."""
    b, h, n, d = q.shape
    per, w = n // frames, window

    def windows(z: Tensor) -> Tensor:
        z = F.pad(z.reshape(b * h, frames, per, d), (0, 0, 0, 0, w, w))  # pad the frame axis
        z = z.unfold(1, 2 * w + 1, 1)  # [BH, F, P, D, 2w+1]
        return z.permute(0, 1, 4, 2, 3).reshape(b * h, frames, (2 * w + 1) * per, d)

    out = F.scaled_dot_product_attention(q.reshape(b * h, frames, per, d), windows(k), windows(v),
                                         attn_mask=valid)
    return out.reshape(b, h, n, d)


class VideoDiTBlock(DiTBlock):
    """:class:`~flowdistill.models.dit.DiTBlock` with per-frame adaLN-zero and masked attention."""

    backend: str = "sdpa"

    def attn(self, x: Tensor, mask: Tensor | None = None,  # type: ignore[override]
             local: tuple[int, int, Tensor] | None = None) -> Tensor:
        """Multi-head self-attention on tokens ``[B, N, hidden]``; ``mask [N, N]`` bool (True = attend),
        or ``local = (frames, window, valid)`` for :func:`local_window_attention`."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)
        if local is not None:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D]
            out = local_window_attention(q, k, v, *local).transpose(1, 2).reshape(b, n, d)
        elif self.backend == "xformers" and x.is_cuda:
            import xformers.ops as xops  # optional fast path (CUDA only)

            q, k, v = qkv.unbind(2)  # [B, N, H, D]
            bias = None
            if mask is not None:
                pad = -(-n // 8) * 8  # xformers wants the bias' last dim stored 8-aligned
                bias = torch.zeros(b, self.heads, n, pad, device=x.device, dtype=q.dtype)[..., :n]
                bias.masked_fill_(~mask, float("-inf"))
            out = xops.memory_efficient_attention(q, k, v, attn_bias=bias).reshape(b, n, d)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, d)
        return self.proj(out)

    def forward(self, x: Tensor, c: Tensor, mask: Tensor | None = None,  # type: ignore[override]
                local: tuple[int, int, Tensor] | None = None) -> Tensor:
        """``x [B, F·P, hidden]`` (frame-major tokens), ``c [B, F, hidden]`` (after SiLU), ``mask``
        ``[F·P, F·P]`` or None, ``local`` (see :meth:`attn`). Frame ``f``'s tokens get
        ``x·(1 + scale_f) + shift_f`` and gate ``g_f``."""
        b, n, d = x.shape
        frames = c.shape[1]
        per = n // frames

        def mod(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
            return _modulate(h.reshape(b * frames, per, d), shift.reshape(b * frames, d),
                             scale.reshape(b * frames, d)).reshape(b, n, d)

        def gate(g: Tensor, h: Tensor) -> Tensor:
            return (g[:, :, None] * h.reshape(b, frames, per, d)).reshape(b, n, d)

        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate(g1, self.attn(mod(self.norm1(x), sh1, sc1), mask, local))
        h = mod(self.norm2(x), sh2, sc2)
        return x + gate(g2, self.fc2(F.gelu(self.fc1(h), approximate="tanh")))


def _frame_times(t: Tensor, b: int, frames: int, name: str) -> Tensor:
    """Validate a time ``[B]`` or ``[B, F]`` and return it as ``[B, F]``."""
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape [B] or [B, F]")
    if t.ndim == 1 and t.shape[0] == b:
        return t[:, None].expand(b, frames)
    if t.ndim == 2 and tuple(t.shape) == (b, frames):
        return t
    raise ValueError(f"{name} must have shape [B] = [{b}] or [B, F] = [{b}, {frames}], "
                     f"got [{', '.join(str(d) for d in t.shape)}]")


class PixelHead(nn.Module):
    """Full-resolution conv head after unpatchifying (``head_channels > 0``): the DiT's per-pixel
    features ``h [M, C', S, S]`` and the input frame ``x [M, C, S, S]`` go through
    ``conv3×3 → GELU → conv3×3`` to the output. A patch-``p`` DiT decodes each token to its ``p×p``
    pixels by one linear map, so thin strokes inside a patch and continuity across patch edges are
    hard for it (measured on bouncing digits: patch 8 without the head gives blocky fragments);
    the head sees the noisy frame at full resolution and the neighbouring patches, at the cost of
    two small convolutions (far cheaper than patch 4, whose attention over 4× the tokens costs 6×
    per step here). The last convolution starts at zero, so a fresh net still outputs 0."""

    def __init__(self, channels: int, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels + in_channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        """``h [M, C', S, S]`` DiT features, ``x [M, C, S, S]`` input frames → ``[M, C_out, S, S]``."""
        return self.conv2(F.gelu(self.conv1(torch.cat([h, x.to(h.dtype)], dim=1))))


class VideoDiTFlowNet(ModelMixin, ConfigMixin):
    """Per-frame velocity ``v(x, t⃗)`` or average velocity ``u(x, t⃗, s⃗)`` on ``x [B, F, C, S, S]``.

    Config: ``sample_size`` (S, 32), ``in_channels`` (1), ``out_channels`` (None = in_channels),
    ``patch_size`` (4), ``hidden`` (128, divisible by 4 and by ``heads``), ``depth`` (4), ``heads``
    (4), ``mlp_ratio`` (4.0), ``max_frames`` (32: the largest buffer; the frame embedding table's
    size), ``attention`` ("full" | "window" | "causal", see the module docstring), ``window``
    (frames each side for "window", 2), ``two_time`` (False), ``num_classes`` (0), ``time_scale``
    (1000), ``freq_dim`` (256), ``delta_time_scale`` (None = time_scale), ``attn_backend``
    ("auto" | "sdpa" | "xformers"; auto = xformers when importable and on CUDA), ``local_window``
    (True: a "window" narrower than the buffer computes only the ``2w + 1`` frames each frame sees,
    :func:`local_window_attention`; False: full attention with the boolean mask — same result),
    ``head_channels`` (0; ``> 0`` adds the full-resolution :class:`PixelHead` with that many
    channels after unpatchifying), ``prediction`` ("v" | "x", below), ``x_pred_min_t`` (0.05).

    **Output parameterisation** (``prediction``). ``"v"``: the net's output is the velocity.
    ``"x"``: the net predicts the clean frame ``x̂`` and returns the velocity it implies on the path
    ``x_t = (1 − t)·x + t·ε``, per frame (Li & He, "Back to Basics: Let Denoising Generative Models
    Denoise", arXiv 2511.13720, JiT: with large patches a token has more pixels than the net can
    carry noise through, while clean frames lie near a low-dimensional set),

        v = (x_t − x̂)/max(t, t_min),     two-time: u = (x_t − x̂(x_t, t, s))/max(t, t_min),

    so a flow-map step is ``X = x_t + (s − t)·u = (s/t)·x_t + (1 − s/t)·x̂`` (DDIM's update) for
    ``t ≥ t_min``. The loss stays the velocity loss of the distiller; ``t_min`` bounds the ``1/t``
    gain near the data. A fresh ``"x"`` net predicts ``x̂ = 0`` (not ``v = 0``); a two-time net
    still starts equal to the one-time net it is loaded from.
    """

    @register_to_config
    def __init__(self, sample_size: int = 32, in_channels: int = 1, out_channels: int | None = None,
                 patch_size: int = 4, hidden: int = 128, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 4.0, max_frames: int = 32, attention: str = "full", window: int = 2,
                 two_time: bool = False, num_classes: int = 0, time_scale: float = 1000.0,
                 freq_dim: int = 256, delta_time_scale: float | None = None, attn_backend: str = "auto",
                 local_window: bool = False, head_channels: int = 0, prediction: str = "v",
                 x_pred_min_t: float = 0.05):
        super().__init__()
        if patch_size < 1 or sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} must be divisible by patch_size {patch_size}")
        if hidden % heads or hidden % 4:
            raise ValueError(f"hidden {hidden} must be divisible by heads {heads} and by 4")
        if depth < 1 or max_frames < 1:
            raise ValueError(f"depth and max_frames must be >= 1, got {depth}, {max_frames}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if attention == "window" and window < 0:
            raise ValueError(f"window must be >= 0 frames, got {window}")
        if attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {attn_backend!r}")
        if attn_backend == "xformers" and not _HAS_XFORMERS:
            raise ValueError("attn_backend 'xformers' needs the xformers package")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if not 0.0 < x_pred_min_t <= 1.0:
            raise ValueError(f"x_pred_min_t must be in (0, 1], got {x_pred_min_t}")
        if head_channels < 0:
            raise ValueError(f"head_channels must be >= 0 (0 = no conv head), got {head_channels}")
        self.grid = sample_size // patch_size
        self.out_ch = int(out_channels or in_channels)
        self.patch_embed = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, self.grid), persistent=False)
        self.register_buffer("frame_embed", sincos_frame_embed(hidden, max_frames), persistent=False)
        self.cond_embed = ConditionEmbedding(hidden, freq_dim=freq_dim, num_classes=num_classes,
                                             two_time=two_time, time_scale=time_scale,
                                             delta_time_scale=delta_time_scale)
        self.blocks = nn.ModuleList(VideoDiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        use_xf = attn_backend == "xformers" or (attn_backend == "auto" and _HAS_XFORMERS)
        backend = "xformers" if use_xf else "sdpa"
        for block in self.blocks:
            block.backend = backend
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(hidden, 2 * hidden)
        feat = head_channels or self.out_ch
        self.linear_out = nn.Linear(hidden, patch_size * patch_size * feat)
        self.head = PixelHead(head_channels, in_channels, self.out_ch) if head_channels else None
        DiTFlowNet._init_weights(self)  # the image DiT's init: zeroed adaLN and output layers
        self._mask_cache: dict = {}

    def token_mask(self, frames: int, device) -> Tensor | None:
        """Token mask ``[F·P, F·P]`` expanded from :func:`frame_mask` (cached per size and device)."""
        cfg = self.config
        key = (frames, str(device))
        if key not in self._mask_cache:
            m = frame_mask(frames, cfg.attention, cfg.window, device=device)
            if m is not None:
                per = self.grid * self.grid
                m = m.repeat_interleave(per, 0).repeat_interleave(per, 1)
            self._mask_cache[key] = m
        return self._mask_cache[key]

    def attention_plan(self, frames: int, device) -> tuple[Tensor | None, tuple | None]:
        """``(token mask, local)``: a window narrower than the buffer runs as
        :func:`local_window_attention` (``local_window`` config, default on), else the token mask."""
        cfg = self.config
        if cfg.attention == "window" and cfg.local_window and 2 * cfg.window + 1 < frames:
            key = ("local", frames, str(device))
            if key not in self._mask_cache:
                self._mask_cache[key] = (frames, cfg.window, window_valid(frames, cfg.window, self.grid ** 2,
                                                                         device))
            return None, self._mask_cache[key]
        return self.token_mask(frames, device), None

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """``x [B, F, C, S, S]``, ``t [B, F]`` or ``[B]``, ``s`` likewise or None, ``cond [B]`` or None."""
        cfg = self.config
        size, p = cfg.sample_size, cfg.patch_size
        check_x(x, f"[B, F <= {cfg.max_frames}, {cfg.in_channels}, {size}, {size}]",
                x.ndim == 5 and tuple(x.shape[2:]) == (cfg.in_channels, size, size)
                and 1 <= x.shape[1] <= cfg.max_frames)
        b, frames = x.shape[:2]
        tf = _frame_times(t, b, frames, "t").reshape(-1)
        sf = _frame_times(s, b, frames, "s").reshape(-1) if (cfg.two_time and s is not None) else None
        labels = cond.repeat_interleave(frames) if isinstance(cond, Tensor) and cond.ndim == 1 \
            and cond.shape[0] == b else cond
        c = F.silu(self.cond_embed(tf, sf, labels)).reshape(b, frames, -1)
        g = self.grid
        h = self.patch_embed(x.reshape(b * frames, *x.shape[2:])).flatten(2).transpose(1, 2)  # [BF, P, d]
        h = h + self.pos_embed.to(x.dtype)[None] + self.frame_embed[:frames, None].to(x.dtype).repeat(b, 1, 1)
        h = h.reshape(b, frames * g * g, -1)
        mask, local = self.attention_plan(frames, x.device)
        for block in self.blocks:
            h = block(h, c, mask, local)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        d = h.shape[-1]
        h = _modulate(self.norm_out(h).reshape(b * frames, g * g, d), shift.reshape(-1, d),
                      scale.reshape(-1, d))
        h = self.linear_out(h)  # [BF, P, p*p*C'] (C' = head_channels with the conv head, else C)
        feat = h.shape[-1] // (p * p)
        h = h.reshape(b * frames, g, g, p, p, feat).permute(0, 5, 1, 3, 2, 4)
        h = h.reshape(b * frames, feat, size, size)
        if self.head is not None:
            h = self.head(h, x.reshape(b * frames, *x.shape[2:]))
        h = h.reshape(b, frames, self.out_ch, size, size)
        if cfg.prediction == "x":  # the net predicts the clean frame x̂; return (x_t − x̂)/max(t, t_min)
            return (x - h) / tf.reshape(b, frames, 1, 1, 1).clamp_min(cfg.x_pred_min_t).to(h.dtype)
        return h

