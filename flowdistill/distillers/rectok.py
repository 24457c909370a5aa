"""RecTok: a tokenizer whose forward-flow states carry semantics (arXiv 2512.13421; METHODS.md §6).

The student is a tokenizer (:class:`flowdistill.models.tokenizer.TokenizerModel`: encoder ``E``,
pixel decoder ``D_pix``, semantic decoder ``D_sem``); there is no velocity teacher. Stage 1, per
batch (one mask ratio per batch, as in the official code):

    r     = max(0, U(mask_min, mask_max))                      (default U(−0.1, 0.4): P(r = 0) = 0.2)
    q     = E(visible tokens of x)                             (MAE-style: masked tokens dropped)
    z     = mean(q) + std(q)·ξ                                 (posterior sample)
    t     = k·u / (1 + (k − 1)·u),  u ~ U(0, 1),  k = √(tokens·channels / 4096)  (or time_shift)
    z_t   = (1 − t)·z + t·ε                                    (our convention: t = noise level)
    L     = ‖x − D_pix(z_t)‖² + λ_perc·P(D_pix(z_t), x) + λ_KL·KL(q ‖ N(0, I))
            + λ_sem · mean_tokens (1 − cos(D_sem(z_t), F(x)))  (+ λ_gan·hinge_G after gan_start)

Both decoders insert their mask token at masked positions, so the semantic term over *all*
tokens (``sem_tokens: all``, the issue's reading) is feature reconstruction at masked tokens and
alignment of the noisy latent at visible ones. ``F`` is a frozen semantic teacher from
:mod:`flowdistill.models.semantic_teachers` (``semantic: {name: digits_ssl, ...}``), kept out of
the module tree: never trained nor checkpointed. ``P`` is a registered perceptual net
(:mod:`flowdistill.models.perceptual`; default ``random_conv``, fixed random conv features; the
digits classifier is refused: it is the FID metric's network).

Stage 2 (``stage: 2``): decoder-only fine-tune on clean latents, ``L = ‖x − D_pix(mode E(x))‖² +
λ_perc·P`` (no noise, mask, KL or semantic term; the encoder frozen), and the latent statistics
``shift = mean(z)``, ``scale = 1/std(z)`` of every training batch are accumulated (the encoder is
frozen, so they are exact for the final encoder) and written to the student's config
(``shift_factor``, ``scaling_factor``) after each step, so the exported model carries them.

The plain-autoencoder baseline is the same distiller with ``semantic: {name: none}``, ``noise:
false`` (t = 0) and ``mask_max: 0`` (configs/ae_digits.yaml). A tokenizer has no prior to sample:
:meth:`RecTok.sample` *reconstructs* its input, ``D_pix(mode E(x))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowdistill.core.rng import StepRNG
from flowdistill.distillers.base import Distiller, DistillerConfig, OptimGroup, register_distiller
from flowdistill.errors import ConfigError
from flowdistill.models.discriminator import hinge_d_loss, hinge_g_loss
from flowdistill.models.patch_discriminator import PatchDiscriminator
from flowdistill.models.perceptual import PERCEPTUAL_NETS, LazyPerceptual
from flowdistill.models.tokenizer import NoisyLatentDraws

SEM_TOKENS = ("all", "visible", "masked")


@dataclass
class RecTokConfig(DistillerConfig):
    """RecTok options (module docstring); defaults follow the official code where it applies."""

    name: str = "rectok"
    stage: int = 1                      # 1: tokenizer training; 2: decoder-only fine-tune
    semantic: dict[str, Any] = field(default_factory=lambda: {"name": "digits_ssl"})  # name: none = off
    sem_weight: float = 1.0
    sem_tokens: str = "all"             # all | visible | masked: where the semantic term is taken
    noise: bool = True                  # false: t = 0 (plain autoencoder)
    time_shift: float = 0.0             # k; 0: √(tokens·channels / 4096)
    mask_min: float = -0.1              # r = max(0, U(mask_min, mask_max))
    mask_max: float = 0.4
    kl_weight: float = 1.0e-6
    perceptual: str = "random_conv"     # a registered perceptual net, or none
    perceptual_weights: str = ""
    perceptual_weight: float = 1.0
    gan_weight: float = 0.0             # > 0: PatchGAN hinge term from gan_start on
    gan_start: int = 0
    gan_lr: float = 0.0                 # 0: the run's learning rate
    disc_width: int = 32

    def validate(self) -> None:
        """Ranges and names, each a one-line ConfigError naming its key."""
        if self.stage not in (1, 2):
            raise ConfigError(f"distiller.stage must be 1 or 2, got {self.stage}")
        if not isinstance(self.semantic.get("name"), str) or not self.semantic["name"]:
            raise ConfigError("distiller.semantic.name must name a semantic teacher (or none)")
        if self.sem_tokens not in SEM_TOKENS:
            raise ConfigError(f"distiller.sem_tokens must be one of {', '.join(SEM_TOKENS)}, "
                              f"got {self.sem_tokens!r}")
        if not self.mask_min <= self.mask_max < 1.0:
            raise ConfigError(f"distiller.mask_min <= distiller.mask_max < 1 is needed, got "
                              f"{self.mask_min}, {self.mask_max}")
        if self.time_shift < 0:
            raise ConfigError(f"distiller.time_shift must be >= 0 (0: automatic), got {self.time_shift}")
        for key in ("sem_weight", "kl_weight", "perceptual_weight", "gan_weight", "gan_lr"):
            if getattr(self, key) < 0:
                raise ConfigError(f"distiller.{key} must be >= 0, got {getattr(self, key)}")
        if self.perceptual == "digits":
            raise ConfigError("distiller.perceptual=digits is the FID metric's feature net: training on it "
                              "would reward copying the metric; use random_conv, lpips or none")
        if self.perceptual != "none":
            PERCEPTUAL_NETS.get(self.perceptual)

    @property
    def semantic_name(self) -> str:
        """The semantic teacher's name (``none``: no semantic term)."""
        return str(self.semantic["name"])


def time_shift_k(tokens: int, channels: int) -> float:
    """RecTok's shift ``k = √(tokens·channels / 4096)`` (4096 = the reference latent size)."""
    return math.sqrt(tokens * channels / 4096.0)


def shift_time(u: Tensor, k: float) -> Tensor:
    """Shifted time ``t = k·u / (1 + (k − 1)·u)`` (monotone, t(0) = 0, t(1) = 1; k > 1 adds noise)."""
    return k * u / (1.0 + (k - 1.0) * u)


def mask_ratio(v: float, lo: float, hi: float) -> float:
    """``r = max(0, lo + (hi − lo)·v)`` for ``v ~ U(0, 1)``: ``P(r = 0) = −lo / (hi − lo)`` when lo < 0."""
    return max(0.0, lo + (hi - lo) * v)


def build_semantic(spec: dict[str, Any], tokens: int) -> nn.Module:
    """The frozen semantic teacher ``F`` of ``spec`` (``{name, **kw}``) at ``tokens`` tokens."""
    from flowdistill.models.semantic_teachers import build_semantic_teacher

    kw = {k: v for k, v in spec.items() if k != "name"}
    net = build_semantic_teacher(spec["name"], tokens=tokens, **kw)
    return net.eval().requires_grad_(False)


@register_distiller("rectok")
class RecTok(Distiller):
    """Trains a tokenizer (the student) with RecTok's loss; see the module docstring."""

    Config = RecTokConfig
    needs_data = True
    needs_teacher = False
    eval_nfe = (1,)

    def __init__(self, cfg: RecTokConfig, student: nn.Module, teacher: nn.Module | None = None, *,
                 inference_only: bool = False):
        """``student``: a tokenizer (``num_tokens``, ``config.latent_channels``/``sem_dim``); no teacher."""
        super().__init__(cfg, student, teacher, inference_only=inference_only)
        conf = student.config
        self.tokens = int(student.num_tokens)
        self.channels = int(conf.latent_channels)
        self.k = cfg.time_shift or time_shift_k(self.tokens, self.channels)
        self.use_sem = cfg.stage == 1 and cfg.semantic_name != "none" and cfg.sem_weight > 0
        if self.use_sem and not int(conf.sem_dim) and not inference_only:
            raise ConfigError(f"distiller.semantic.name={cfg.semantic_name} needs a semantic decoder: set "
                              f"model.params.sem_dim to the teacher's feature size (or semantic.name=none)")
        self._perceptual = (LazyPerceptual(cfg.perceptual, cfg.perceptual_weights)
                            if cfg.perceptual != "none" and cfg.perceptual_weight > 0 else None)
        self.disc = (PatchDiscriminator(int(conf.in_channels), cfg.disc_width)
                     if cfg.gan_weight > 0 and not inference_only else None)
        if cfg.stage == 2:
            if not isinstance(getattr(student, "decoder", None), nn.Module):
                raise ConfigError("distiller.stage=2 needs a tokenizer with a pixel decoder module `decoder`")
            for name, p in student.named_parameters():
                p.requires_grad_(name.startswith("decoder."))
        # latent statistics (stage 2): count, sum, sum of squares of z, checkpointed with the distiller
        self.register_buffer("latent_moments", torch.zeros(3, dtype=torch.float64))

    # -- pieces -------------------------------------------------------------------------
    def semantic_teacher(self, device: torch.device) -> nn.Module:
        """The frozen semantic teacher on ``device`` (built on first use; not a submodule)."""
        net = self.__dict__.get("_semantic")
        if net is None:
            net = build_semantic(dict(self.cfg.semantic), self.tokens)
            dim = int(getattr(net, "dim", -1))
            if dim != int(self.student.config.sem_dim):
                raise ConfigError(f"model.params.sem_dim={self.student.config.sem_dim} but semantic teacher "
                                  f"{self.cfg.semantic_name!r} gives {dim}-d features: "
                                  f"set model.params.sem_dim={dim}")
            self.__dict__["_semantic"] = net
        return net.to(device)

    def perceptual_loss(self, x_hat: Tensor, x: Tensor) -> Tensor:
        """Mean perceptual distance ``P(x̂, x)`` (0 when off)."""
        if self._perceptual is None:
            return x.new_zeros(())
        return self._perceptual(x.device)(x_hat, x).mean()

    def semantic_loss(self, feats: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """``mean (1 − cos(D_sem(z_t), F(x)))`` over the tokens ``sem_tokens`` selects (mask 1 = masked)."""
        d = 1.0 - F.cosine_similarity(feats, target.to(feats.dtype), dim=-1)  # [B, N]
        w = {"all": torch.ones_like(mask), "visible": 1.0 - mask, "masked": mask}[self.cfg.sem_tokens]
        return (w * d).sum() / w.sum().clamp_min(1.0)

    def batch_mask_ratio(self, rng: StepRNG) -> float:
        """This batch's mask ratio ``max(0, U(mask_min, mask_max))`` (one draw, the same on every process)."""
        v = float(torch.rand((), generator=rng.generator()))
        return mask_ratio(v, self.cfg.mask_min, self.cfg.mask_max)

    def gan_active(self, step: int) -> bool:
        """Whether the adversarial term is on at ``step``."""
        return self.disc is not None and step >= self.cfg.gan_start

    # -- the contract ---------------------------------------------------------------------
    def optim_groups(self, lr: float) -> list[OptimGroup]:
        """Stage 1: the whole tokenizer; stage 2: the pixel decoder only. Plus ``disc`` with a GAN."""
        groups = [OptimGroup("student", [p for p in self.student.parameters() if p.requires_grad], lr)]
        if self.disc is not None:
            groups.append(OptimGroup.trainable("disc", self.disc, self.cfg.gan_lr or lr, betas=(0.5, 0.9)))
        return groups

    def trainable_nets(self) -> dict[str, nn.Module]:
        """The tokenizer, and the discriminator when the GAN term is on."""
        nets: dict[str, nn.Module] = {"student": self.student}
        if self.disc is not None:
            nets["disc"] = self.disc
        return nets

    def loss(self, batch: dict[str, Tensor], step: int, group: str, rng: StepRNG) -> dict[str, Tensor]:
        """Stage-1 or stage-2 tokenizer loss (``student``), or the discriminator's hinge loss (``disc``)."""
        x = batch["x"]
        if group == "disc":
            if not self.gan_active(step):
                return self.no_update(device=x.device)
            with torch.no_grad():
                x_hat = self._reconstruct(x, step, rng)["x_hat"]
            disc = self.net("disc")
            d = hinge_d_loss(disc(x), disc(x_hat))
            return {"loss": d, "disc": d.detach()}
        out = self._reconstruct(x, step, rng)
        x_hat = out.pop("x_hat")
        rec = (x_hat - x).pow(2).mean()
        perc = self.perceptual_loss(x_hat, x)
        loss = rec + self.cfg.perceptual_weight * perc
        logs = {"rec": rec.detach(), "perceptual": perc.detach()}
        if self.cfg.stage == 1:
            kl, sem = out["kl"], out.get("sem")
            loss = loss + self.cfg.kl_weight * kl
            logs["kl"] = kl.detach()
            if sem is not None:
                loss = loss + self.cfg.sem_weight * sem
                logs["sem"] = sem.detach()
            logs["mask_ratio"], logs["t"] = out["mask_ratio"], out["t"]
        if self.gan_active(step):
            g = hinge_g_loss(self.disc(x_hat))  # its grads on disc are cleared before disc's own step
            loss = loss + self.cfg.gan_weight * g
            logs["gan_g"] = g.detach()
        return {"loss": loss, **logs}

    def _reconstruct(self, x: Tensor, step: int, rng: StepRNG) -> dict[str, Tensor]:
        """The stage's forward pass: ``x_hat`` and (stage 1) ``kl``, ``sem``, ``mask_ratio``, ``t``.

        One call of the student through the engine's wrapper (``forward(x, noisy=draws)``, so DDP /
        FSDP see it); the draws come from the step's RNG, sliced per process, so one or N processes
        train alike. Stage 2: no mask, ``ξ = 0`` (the posterior mean), ``t = 0``."""
        b = x.shape[0]
        g = self.student.grid
        n, shape = self.tokens, (int(self.student.config.latent_channels), g, g)
        model = self.net("student")
        if self.cfg.stage == 2:
            zeros = torch.zeros(b, *shape, dtype=x.dtype, device=x.device)
            draws = NoisyLatentDraws(0.0, None, zeros, torch.zeros(b, device=x.device), zeros)
            out = model(x, noisy=draws)
            self._accumulate(out["z"])
            return {"x_hat": out["x_hat"]}
        r = self.batch_mask_ratio(rng)
        mask_noise = rng.rand(b, n).to(x.device) if r > 0 else None
        z_noise = rng.randn(b, *shape).to(x)
        t = (shift_time(rng.rand(b), self.k) if self.cfg.noise else torch.zeros(b)).to(x)
        eps = rng.randn(b, *shape).to(x)
        out = model(x, noisy=NoisyLatentDraws(r, mask_noise, z_noise, t, eps, semantic=self.use_sem))
        res = {"x_hat": out["x_hat"], "kl": out["kl"], "mask_ratio": torch.tensor(r), "t": t.mean().detach()}
        if self.use_sem:
            with torch.no_grad():
                target = self.semantic_teacher(x.device)(x)
            res["sem"] = self.semantic_loss(out["features"], target, out["mask"])
        return res

    @torch.no_grad()
    def _accumulate(self, z: Tensor) -> None:
        """Add a batch of clean latents to the running moments (stage 2 only; training only)."""
        if not self.training:
            return
        z = z.detach().to(torch.float64)
        self.latent_moments += torch.stack([z.new_tensor(z.numel()), z.sum(), z.pow(2).sum()]).to(
            self.latent_moments.device)

    def latent_stats(self) -> tuple[float, float] | None:
        """``(shift, scale) = (mean z, 1/std z)`` of the latents seen in stage 2 (None before any)."""
        n, s, sq = (float(v) for v in self.latent_moments)
        if n < 2:
            return None
        mean = s / n
        var = max(sq / n - mean * mean, 1e-12)
        return mean, 1.0 / math.sqrt(var)

    def after_step(self, step: int, group: str) -> None:
        """Stage 2: write the latent statistics so far to the student's config (the exported model's
        ``shift_factor`` / ``scaling_factor``; with EMA off, the student is what is exported)."""
        stats = self.latent_stats() if group == "student" and self.cfg.stage == 2 else None
        if stats is not None:
            self.student.register_to_config(shift_factor=stats[0], scaling_factor=stats[1])

    def _sample(self, noise: Tensor, nfe: int, cond: Tensor | None, model: nn.Module,
                **options: Any) -> Tensor:
        """A tokenizer has no prior: "sampling" reconstructs its input, ``D_pix(mode E(x))`` (nfe unused)."""
        return model.decode(model.encode(noise).latent_dist.mode()).sample
