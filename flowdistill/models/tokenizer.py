"""``TokenizerModel``: a small ViT image tokenizer with a KL latent, MAE-style masking and an optional
semantic decoder (the tokenizer of RecTok, arXiv 2512.13421; METHODS.md §6).

    x [B, C, S, S] ─patchify (stride-p conv) + 2-D sin-cos pos─▶ N = (S/p)² tokens
      ─MAE mask (ratio r, per-sample random shuffle; keep ⌊N·(1−r)⌋ tokens)─▶ visible tokens only
      ─enc_depth ViT blocks, LayerNorm, Linear─▶ (mean, logvar) per visible token
      ─scattered back to the token grid─▶ posterior parameters [B, 2·latent_channels, S/p, S/p]

At a masked position the posterior parameters are (mean 0, logvar 0), i.e. exactly N(0, I): its KL
term is 0 and the decoders never look at it (they put their learnt mask token there). So the latent
``z [B, latent_channels, h, w]`` (h = w = S/p) is always a full 2-D grid that a 2-D DiT can model.

Pixel decoder ``D_pix``: Linear(latent → hidden) per token, mask token at masked positions, + pos,
``dec_depth`` ViT blocks over all N positions, LayerNorm, Linear(hidden → p²·C), unpatchify.
Semantic decoder ``D_sem`` (only when ``sem_dim > 0``; ``sem_dim = 0`` is the plain autoencoder
baseline): the same shape of net at width ``sem_hidden`` with ``sem_depth`` blocks and a Linear to
``sem_dim`` features per token, so ``1 − cos(D_sem(z_t), F(x))`` can be taken per token.

``encode``/``decode``/``forward`` follow diffusers' ``AutoencoderKL`` (``latent_dist`` is a
``DiagonalGaussianDistribution`` with ``sample(generator)``, ``mode()``, ``kl()``; ``decode`` returns
``DecoderOutput(sample)``; ``return_dict=False`` gives tuples) and the config carries
``scaling_factor`` / ``shift_factor`` so a pipeline normalises latents as
``(z − shift_factor) · scaling_factor``.

CPU cost (one thread, ``OMP_NUM_THREADS=1``, batch 64 of 1×32×32, patch 4 = 64 tokens,
latent_channels 16, no masking; forward + backward of ``‖D_pix(z) − x‖² + 1e-6·KL + 1 − cos(D_sem(z), ·)``;
median of 5 after 2 warm-up steps; ``OMP_NUM_THREADS=1 python scripts/time_tokenizer.py`` on the
shared 2-core box at load ≈ 2.8, so an idle core is faster):

    hidden  enc/dec depth  heads  semantic decoder (dim/width/depth)  params   fwd+bwd
    64      4 / 4          4      64 / 64 / 2                          0.51 M   0.77 s
    128     4 / 4          4      64 / 64 / 2                          1.70 M   1.81 s
    128     4 / 4          4      none (plain AE, sem_dim 0)           1.60 M   1.96 s
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.utils import BaseOutput
from torch import Tensor, nn

from flowdistill.models.dit import DiTBlock, sincos_pos_embed_2d


class ViTBlock(DiTBlock):
    """Pre-LayerNorm ViT block (Dosovitskiy et al. 2021): ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``.

    The DiT block's attention and MLP layers without its adaLN modulation (there is no time input):
    the LayerNorms carry their own affine parameters instead.
    """

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__(hidden, heads, mlp_ratio)
        del self.ada
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        for lin in (self.qkv, self.proj, self.fc1, self.fc2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:  # noqa: ARG002 - no condition
        """``x [B, N, hidden] -> [B, N, hidden]``."""
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class TokenDecoder(nn.Module):
    """Latent tokens ``[B, N, in_dim]`` → ``[B, N, out_dim]``: Linear to ``width``, the learnt mask token
    at masked positions (MAE, He et al. 2022), + fixed pos embedding, ``depth`` ViT blocks, LN, Linear."""

    def __init__(self, in_dim: int, width: int, depth: int, heads: int, mlp_ratio: float, grid: int,
                 out_dim: int):
        super().__init__()
        self.embed = nn.Linear(in_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(width, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(ViTBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.out = nn.Linear(width, out_dim)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """``tokens [B, N, in_dim]``; ``mask [B, N]`` (1 = masked: replaced by the mask token) or None."""
        h = self.embed(tokens)
        if mask is not None:
            m = mask.to(h.dtype)[..., None]
            h = h * (1 - m) + self.mask_token.to(h.dtype) * m
        h = h + self.pos_embed.to(h.dtype)
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h))


@dataclass
class EncoderOutput(BaseOutput):
    """What :meth:`TokenizerModel.encode` returns.

    ``latent_dist``: the posterior over ``z [B, latent_channels, h, w]``; ``ids_restore [B, N]``: the
    argsort of each sample's token shuffle (``shuffled[ids_restore] == original order``; the identity
    without masking); ``mask [B, N]`` float, 1 at masked (dropped) token positions, in grid order.
    """

    latent_dist: DiagonalGaussianDistribution
    ids_restore: Tensor | None = None
    mask: Tensor | None = None


class TokenizerModel(ModelMixin, ConfigMixin):
    """ViT tokenizer ``x ↦ z ↦ x̂`` (+ semantic features); see the module docstring for the layout.

    Config: ``sample_size`` (S, 32), ``in_channels`` (1), ``patch_size`` (p, 4), ``latent_channels``
    (16), ``hidden`` (128; divisible by 4 and ``heads``), ``enc_depth`` (4), ``dec_depth`` (4),
    ``heads`` (4), ``mlp_ratio`` (4.0), ``sem_dim`` (0 = no semantic decoder: the plain AE),
    ``sem_hidden`` (64; divisible by 4 and ``heads``), ``sem_depth`` (2), ``scaling_factor`` (1.0),
    ``shift_factor`` (0.0).
    """

    @register_to_config
    def __init__(self, sample_size: int = 32, in_channels: int = 1, patch_size: int = 4,
                 latent_channels: int = 16, hidden: int = 128, enc_depth: int = 4, dec_depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 4.0, sem_dim: int = 0, sem_hidden: int = 64,
                 sem_depth: int = 2, scaling_factor: float = 1.0, shift_factor: float = 0.0):
        super().__init__()
        if patch_size < 1 or sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} must be divisible by patch_size {patch_size}")
        for key, width in (("hidden", hidden), ("sem_hidden", sem_hidden)):
            if width % heads or width % 4:
                raise ValueError(f"{key} {width} must be divisible by heads {heads} and by 4")
        for key, val in (("latent_channels", latent_channels), ("enc_depth", enc_depth),
                         ("dec_depth", dec_depth), ("sem_depth", sem_depth)):
            if val < 1:
                raise ValueError(f"{key} must be >= 1, got {val}")
        if sem_dim < 0:
            raise ValueError(f"sem_dim must be >= 0 (0 = no semantic decoder), got {sem_dim}")
        self.grid = sample_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, self.grid)[None], persistent=False)
        self.enc_blocks = nn.ModuleList(ViTBlock(hidden, heads, mlp_ratio) for _ in range(enc_depth))
        self.enc_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.posterior = nn.Linear(hidden, 2 * latent_channels)
        self.decoder = TokenDecoder(latent_channels, hidden, dec_depth, heads, mlp_ratio, self.grid,
                                    patch_size * patch_size * in_channels)
        self.sem_decoder = (TokenDecoder(latent_channels, sem_hidden, sem_depth, heads, mlp_ratio, self.grid,
                                         sem_dim) if sem_dim > 0 else None)

    @property
    def num_tokens(self) -> int:
        """Number of latent tokens N = (sample_size / patch_size)²."""
        return self.grid * self.grid

    def _check_x(self, x: Tensor) -> None:
        cfg = self.config
        shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"tokenizer expects images [B, {', '.join(map(str, shape))}], "
                             f"got {tuple(x.shape)}")

    def _check_z(self, z: Tensor) -> None:
        shape = (self.config.latent_channels, self.grid, self.grid)
        if z.ndim != 4 or tuple(z.shape[1:]) != shape:
            raise ValueError(f"tokenizer latents must be [B, {', '.join(map(str, shape))}], "
                             f"got {tuple(z.shape)}")

    def random_masking(self, batch: int, mask_ratio: float, generator: torch.Generator | None = None,
                       device: torch.device | None = None,
                       noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """MAE masking (He et al. 2022): per sample a uniform random permutation of the N tokens; the
        first ``⌊N·(1 − mask_ratio)⌋`` (at least 1) stay visible.

        Returns ``(ids_keep [B, K], ids_restore [B, N], mask [B, N])`` with ``ids_restore`` the
        inverse permutation and ``mask`` 1 at dropped positions (grid order). The noise is drawn on
        the generator's device (CPU when ``generator`` is None) and then moved to ``device``; a given
        ``noise [B, N]`` (uniform) is used instead (a trainer draws it per process slice, so one or N
        processes mask the same global batch alike).
        """
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        n = self.num_tokens
        keep = max(1, int(n * (1.0 - mask_ratio)))
        if noise is None:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.rand(batch, n, generator=generator, device=gen_device)
        elif tuple(noise.shape) != (batch, n):
            raise ValueError(f"mask noise must be [{batch}, {n}], got {tuple(noise.shape)}")
        noise = noise.to(device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(batch, n, device=device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return ids_shuffle[:, :keep], ids_restore, mask

    def encode(self, x: Tensor, mask_ratio: float = 0.0, generator: torch.Generator | None = None,
               return_dict: bool = True, mask_noise: Tensor | None = None) -> EncoderOutput | tuple:
        """Posterior ``q(z | visible tokens of x)`` for ``x [B, C, S, S]``.

        ``mask_ratio`` r drops ``N − ⌊N·(1 − r)⌋`` tokens per sample (a random shuffle from
        ``generator``) before the encoder, which attends over the visible tokens only; with r = 0
        nothing is drawn from ``generator`` and ``mask`` is all zeros. Masked positions of the
        posterior are exactly N(0, I) (see the module docstring). ``mask_noise [B, N]``: the shuffle's
        uniform noise, given instead of drawn (:meth:`random_masking`).
        """
        self._check_x(x)
        b = x.shape[0]
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)  # [B, N, D]
        if mask_ratio > 0:
            ids_keep, ids_restore, mask = self.random_masking(b, mask_ratio, generator, x.device, mask_noise)
            tokens = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))
        else:
            ids_keep = None
            ids_restore = torch.arange(self.num_tokens, device=x.device).expand(b, -1)
            mask = torch.zeros(b, self.num_tokens, device=x.device, dtype=x.dtype)
        for block in self.enc_blocks:
            tokens = block(tokens)
        params = self.posterior(self.enc_norm(tokens))  # [B, K, 2C]
        if ids_keep is not None:
            full = params.new_zeros(b, self.num_tokens, params.shape[-1])
            params = full.scatter(1, ids_keep[..., None].expand(-1, -1, params.shape[-1]), params)
        params = params.transpose(1, 2).reshape(b, -1, self.grid, self.grid)
        dist = DiagonalGaussianDistribution(params)
        mask = mask.to(x.dtype)
        if not return_dict:
            return (dist, ids_restore, mask)
        return EncoderOutput(latent_dist=dist, ids_restore=ids_restore, mask=mask)

    def _tokens(self, z: Tensor, ids_restore: Tensor | None,
                mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``z [B, C, h, w]`` → tokens ``[B, N, C]`` in grid order, and the checked mask."""
        self._check_z(z)
        if ids_restore is not None and mask is None:
            raise ValueError("decode: ids_restore given without mask; pass the mask from encode() too")
        if mask is not None and tuple(mask.shape) != (z.shape[0], self.num_tokens):
            raise ValueError(f"decode: mask must be [B, {self.num_tokens}], got {tuple(mask.shape)}")
        return z.flatten(2).transpose(1, 2), mask

    def decode(self, z: Tensor, ids_restore: Tensor | None = None, mask: Tensor | None = None,
               return_dict: bool = True) -> DecoderOutput | tuple[Tensor]:
        """Pixel decoder ``D_pix``: ``z [B, latent_channels, h, w]`` → ``DecoderOutput(sample [B, C, S, S])``.

        With ``mask`` (from :meth:`encode`) the latent at masked positions is ignored and the mask
        token is used there. Latents are always in grid order, so ``ids_restore`` is only checked.
        """
        tokens, mask = self._tokens(z, ids_restore, mask)
        out = self.decoder(tokens, mask)  # [B, N, p*p*C]
        cfg, b, g = self.config, z.shape[0], self.grid
        p, c = cfg.patch_size, cfg.in_channels
        img = out.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)
        if not return_dict:
            return (img,)
        return DecoderOutput(sample=img)

    def decode_semantic(self, z: Tensor, ids_restore: Tensor | None = None,
                        mask: Tensor | None = None) -> Tensor:
        """Semantic decoder ``D_sem``: ``z [B, latent_channels, h, w]`` → features ``[B, N, sem_dim]``
        (mask tokens at masked positions, as in :meth:`decode`). A plain AE (``sem_dim = 0``) raises."""
        if self.sem_decoder is None:
            raise ValueError("this tokenizer has no semantic decoder (sem_dim = 0: the plain autoencoder)")
        tokens, mask = self._tokens(z, ids_restore, mask)
        return self.sem_decoder(tokens, mask)

    def forward(self, sample: Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None,
                return_dict: bool = True, *,
                noisy: NoisyLatentDraws | None = None) -> DecoderOutput | tuple[Tensor] | dict[str, Tensor]:
        """Reconstruction ``D_pix(z)`` with ``z`` the posterior mean (or a sample), no masking.

        With ``noisy`` the training forward :meth:`noisy_reconstruction` instead (a trainer calls the
        model through its DDP/FSDP wrapper, whose gradient sync only sees ``forward``)."""
        if noisy is not None:
            return self.noisy_reconstruction(sample, noisy)
        dist = self.encode(sample).latent_dist
        z = dist.sample(generator) if sample_posterior else dist.mode()
        return self.decode(z, return_dict=return_dict)

    def noisy_reconstruction(self, x: Tensor, draws: NoisyLatentDraws) -> dict[str, Tensor]:
        """Decode from a noised latent (RecTok, arXiv 2512.13421, in our time convention):

            q(z | visible tokens of x) = N(μ, σ²),  z = μ + σ·ξ,  z_t = (1 − t)·z + t·ε,
            x̂ = D_pix(z_t),  f = D_sem(z_t)  (mask tokens at masked positions)

        with ``ξ = draws.z_noise`` (zeros: the posterior mean), ``t = draws.t [B]``, ``ε =
        draws.eps``. The mask is always passed to the decoders (all zeros without masking), so every
        trainable parameter is in the graph on every step, as DDP requires. Returns ``x_hat``,
        ``kl`` (batch mean), ``z`` and ``mask``, and ``features`` when ``draws.semantic``.
        """
        enc = self.encode(x, mask_ratio=draws.mask_ratio, mask_noise=draws.mask_noise)
        dist, mask = enc.latent_dist, enc.mask
        z = dist.mean + dist.std * draws.z_noise.to(dist.mean)
        tt = draws.t.to(z).view(-1, 1, 1, 1)
        z_t = (1 - tt) * z + tt * draws.eps.to(z)
        out = {"x_hat": self.decode(z_t, enc.ids_restore, mask).sample, "kl": dist.kl().mean(), "z": z,
               "mask": mask}
        if draws.semantic:
            out["features"] = self.decode_semantic(z_t, enc.ids_restore, mask)
        return out


@dataclass
class NoisyLatentDraws:
    """The random draws of one :meth:`TokenizerModel.noisy_reconstruction` (made by the trainer from
    its per-step RNG, sliced per process): the mask ratio and the shuffle's uniform noise ``[B, N]``
    (``None`` without masking), the posterior noise ``ξ`` and the path noise ``ε`` (``[B, C, h, w]``),
    the times ``t [B]``, and whether to run the semantic decoder."""

    mask_ratio: float
    mask_noise: Tensor | None
    z_noise: Tensor
    t: Tensor
    eps: Tensor
    semantic: bool = False
