"""MDT-dist: velocity matching (VM) and velocity distillation (VD), METHODS.md §4 (Zhou et al.,
"MDT-dist: Towards Fast 3D Generation via Velocity Matching and Velocity Distillation", arXiv
2509.04406), in the project's convention (``t`` = noise level, ``x_t = (1 − t)·x + t·ε``,
generation ``1 → 0``).

The student is a one-time net ``v_θ(x, t)`` started from the teacher, read as the *average
velocity to data*: ``x̂0 = x_t − t·v_θ(x_t, t)`` (the flow map ``X(x_t, t, 0)``).

**Velocity matching.** Along the teacher's trajectory ``t·u(x_t, t) = x_t − x_0``; differentiating
in ``t`` (``dx_t/dt = v_T``) gives the identity

    u(x_t, t) = v_T(x_t, t) − t·du/dt,     du/dt = ∂_x u·v_T + ∂_t u   (the tangent (v_T, 1)),

so ``L_VM = mean ‖v_θ(x_t, t) − sg(v_T − t·N(dv/dt))‖²`` with ``x_t`` from a data batch and

- ``t = σmin + Δ + (1 − Δ − σmin)·sigmoid(z)``, ``z ~ N(time_mean, time_std)`` (the official
  trainer's logit-normal(1, 1) mapped into ``[σmin + Δ, 1]``, so ``t − Δ ≥ σmin``);
- ``v_T`` the teacher, guided as the job's ``guidance:`` section says;
- ``dv/dt`` (``derivative``): ``"fd"`` the official one-sided difference along one teacher Euler
  step, ``(v_θ⁻(x_t, t) − v_θ⁻(x_t − Δ·v_T, t − Δ))/Δ`` (first order in Δ;
  :func:`flowdistill.core.derivatives.backward_difference`), or ``"jvp"`` the exact forward-mode
  derivative with tangent ``(v_T, 1)``. ``θ⁻`` (``target``) is the online student under no-grad
  (the official choice) or an EMA copy (:class:`flowdistill.core.targets.TargetNetwork`);
- ``N`` (``dvdt_norm``) the official per-sample normaliser ``d/(‖d‖ + c)``: ``"l2"`` is the public
  code's norm over all ``D`` elements, which bounds the correction by ``t`` in norm while ``‖v_T‖ ≈
  √D``, so the correction fades as dimension grows (measured in docs/mdt.md); ``"rms"`` uses
  ``‖d‖/√D`` instead, which keeps the correction's per-element scale the same at every ``D``;
  ``"none"`` is the exact identity. ``c`` is ``dvdt_c``;
- ``corr_clip`` ``ρ`` (off by default, not in the paper): a per-sample relative clip of the
  correction, ``t·N(d) ← t·N(d)·min(1, ρ·‖v_T‖/‖t·N(d)‖)``, which keeps its direction and bounds
  it by ``ρ`` times the teacher velocity at every ``D`` (between ``none``, which lets a noisy
  derivative through, and ``l2``, which caps it at ``t`` whatever ``‖v_T‖``).

**Velocity distillation.** The one-step sample from the *same* noise, with gradient,
``x̂ = ε − v_θ(ε, 1)``, is re-noised with the same ``ε`` and ``t``: ``x_r = (1 − t)·x̂ + t·ε``.
"Real" is the VM target there, ``v_real = v_T(x_r, t; w_VD) − t·N(dv/dt)(x_r)`` (the teacher
guided with the VD scale), "fake" the student's own velocity ``v_fake = v_θ(x_r, t)`` (no grad):
the student plays the fake score, no extra network. With ``g = v_real − v_fake`` the loss is
DMD's surrogate (:func:`flowdistill.core.dmd.dm_surrogate_loss`, scaled by 2 so its value is
``mean g²`` as the official ``‖v_fake − v_real + v_f − sg(v_f)‖²``)

    L_VD = 2·mean ½‖x̂ − sg(x̂ − g)‖²,   ∇_x̂ ∝ g = v_real − v_fake,

so a descent step moves ``x̂`` along ``v_fake − v_real = (x̂0_real − x̂0_fake)/t`` (toward the
real denoised estimate); with ``x̂ = ε − v_f`` (``v_f = v_θ(ε, 1)``) the gradient at the student's
output ``v_f`` is ``∝ v_fake − v_real``, as the official loss's. Per element and without DMD's
normaliser by default, as the official trainer (``vd_normalize`` turns DMD's
``1/mean|x̂ − x̂0_real|`` on). Total ``λ_VM·L_VM + λ_VD·L_VD`` (``lambda_vm``, ``lambda_vd``; a zero
weight skips its term's computation: the VM-only and VD-only ablations).

**Guidance.** The paper's ``(1 + w)·v_c − w·v_u`` is this project's CFG ``v_u + s·(v_c − v_u)``
(:mod:`flowdistill.core.guidance`) with ``s = 1 + w``: the job's ``guidance.scale`` guides VM's
teacher. VD's teacher has its own scale ``vd_guidance_scale`` (``null``: the same field), passed
per call as ``w=`` to the guided field (or to a CFG field built here from the bare conditional
teacher when ``guidance.scale`` is 1).

**Sampling** (decided here). The student is one-time (as the paper's: the TRELLIS flow
transformers keep their architecture), so ``k`` steps go ``1 = t_0 > t_1 > … > t_k = 0`` on
``sample_grid``, predicting ``x̂0`` at each time and moving to the next by re-noising:

- ``"euler"`` (default): ``x_s = x_t − (t − s)·v_θ(x_t, t)``, which is exactly the deterministic
  re-noise ``x_s = (1 − s)·x̂0 + s·ε̂`` with the noise ``ε̂ = (x_t − (1 − t)·x̂0)/t`` implied by ``x_t``
  and ``x̂0`` (DDIM's update on the linear path), and what the paper's Euler sampler does;
- ``"renoise"``: ``x_s = (1 − s)·x̂0 + s·z`` with fresh ``z`` (consistency models' multistep
  sampler; option ``seed``).

Both use the same ``k`` calls and coincide at ``k = 1``; VM trains ``x̂0`` at every ``t ∈ [Δ, 1]``,
so every intermediate call is a trained one. A two-time student ``u(x, t, s)`` would need the
MeanFlow identity at ``s ≠ 0`` (and is FreeFlow's and TSCD's territory here); not built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flowdistill.core.broadcast import bcast
from flowdistill.core.derivatives import backward_difference, directional_derivative
from flowdistill.core.dmd import dm_gradient, dm_surrogate_loss
from flowdistill.core.guidance import CFGField, GuidedField
from flowdistill.core.rng import StepRNG
from flowdistill.core.targets import TARGET_MODES, TargetNetwork
from flowdistill.core.timesteps import LogitNormalTime, build_grid
from flowdistill.distillers.base import BenchRow, Distiller, DistillerConfig, check_names, register_distiller
from flowdistill.errors import ConfigError

DERIVATIVES = ("fd", "jvp")
NORMS = ("l2", "rms", "none")
SAMPLERS = ("euler", "renoise")


@dataclass
class MDTConfig(DistillerConfig):
    """MDT-dist options (the module docstring gives the maths); defaults are the official trainer's."""

    name: str = "mdt"
    lambda_vm: float = 1.0
    lambda_vd: float = 1.0
    delta: float = 0.01  # Δ: the teacher step of the finite difference, and t ≥ σmin + Δ
    sigma_min: float = 1e-5
    time_mean: float = 1.0  # t = σmin + Δ + (1 − Δ − σmin)·sigmoid(N(time_mean, time_std))
    time_std: float = 1.0
    derivative: str = "fd"  # fd (one teacher step, first order) | jvp (exact, tangent (v_T, 1))
    target: str = "online"  # θ⁻ of dv/dt: online (no-grad student, official) | ema
    target_decay: float = 0.95
    dvdt_norm: str = "l2"  # l2 (official, fades with D) | rms (dimension-free) | none (exact identity)
    dvdt_c: float = 0.1
    corr_clip: float | None = None  # ρ: per-sample ‖t·N(dv/dt)‖ ≤ ρ·‖v_T‖ (None: off)
    vd_guidance_scale: float | None = None  # None: VD's teacher is VM's (the job's guidance:)
    vd_normalize: bool = False  # DMD's per-sample 1/mean|x̂ − x̂0_real| on the VD gradient
    vd_start: int = 0  # VD is on from this step (VM from 0)
    uncond_share: float = 0.0  # conditional data: share of labels replaced by the null label
    sampler: str = "euler"  # euler (deterministic re-noise) | renoise (fresh noise)
    sample_grid: str = "uniform"

    def validate(self) -> None:
        """Names and ranges up front, each error naming its key."""
        for key, choices in (("derivative", DERIVATIVES), ("target", TARGET_MODES), ("dvdt_norm", NORMS),
                             ("sampler", SAMPLERS)):
            _one_of(f"distiller.{key}", getattr(self, key), choices)
        for key in ("lambda_vm", "lambda_vd", "dvdt_c", "vd_start"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"distiller.{key} must be >= 0, got {getattr(self, key)}")
        if self.lambda_vm == 0 and self.lambda_vd == 0:
            raise ConfigError("distiller.lambda_vm and distiller.lambda_vd are both 0: nothing to train")
        if not 0.0 <= self.sigma_min < 1.0:
            raise ConfigError(f"distiller.sigma_min must be in [0, 1), got {self.sigma_min}")
        if not 0.0 < self.delta < 1.0 - self.sigma_min:
            raise ConfigError(f"distiller.delta must be in (0, 1 − sigma_min), got {self.delta}")
        if not self.time_std > 0:
            raise ConfigError(f"distiller.time_std must be positive, got {self.time_std}")
        if not 0.0 <= self.target_decay <= 1.0:
            raise ConfigError(f"distiller.target_decay must be in [0, 1], got {self.target_decay}")
        if not 0.0 <= self.uncond_share <= 1.0:
            raise ConfigError(f"distiller.uncond_share must be in [0, 1], got {self.uncond_share}")
        if self.corr_clip is not None and not self.corr_clip > 0:
            raise ConfigError(f"distiller.corr_clip must be > 0 (or null), got {self.corr_clip}")
        if self.vd_guidance_scale is not None and not self.vd_guidance_scale >= 0:
            raise ConfigError(f"distiller.vd_guidance_scale must be >= 0 (or null), "
                              f"got {self.vd_guidance_scale}")
        check_names(grid=self.sample_grid)

    def time_sampler(self) -> LogitNormalTime:
        """``t = σmin + Δ + (1 − Δ − σmin)·sigmoid(N(m, s))`` (the official trainer's times)."""
        return LogitNormalTime(self.time_mean, self.time_std, t_min=self.sigma_min + self.delta, t_max=1.0)


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    """A :class:`ConfigError` naming ``key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


def normalize_derivative(d: Tensor, mode: str, c: float) -> Tensor:
    """MDT-dist's per-sample normaliser ``d / (‖d‖ + c)``: ``"l2"`` the norm over all ``D``
    elements (official), ``"rms"`` ``‖d‖/√D``, ``"none"`` ``d`` unchanged."""
    if mode == "none":
        return d
    flat = d.reshape(d.shape[0], -1)
    norm = flat.norm(dim=1)
    if mode == "rms":
        norm = norm / flat.shape[1] ** 0.5
    elif mode != "l2":
        raise ValueError(f"dvdt_norm must be one of {', '.join(NORMS)}, got {mode!r}")
    return d / (bcast(norm, d) + c)


def clip_relative(corr: Tensor, ref: Tensor, rho: float) -> Tensor:
    """Per-sample relative clip ``k·min(1, ρ·‖ref‖/‖k‖)``: ``‖k‖ ≤ ρ·‖ref‖`` after, direction kept,
    samples already inside unchanged (norms over all non-batch elements)."""
    kn = corr.reshape(corr.shape[0], -1).norm(dim=1)
    rn = ref.reshape(ref.shape[0], -1).norm(dim=1)
    scale = (rho * rn / kn.clamp_min(1e-30)).clamp(max=1.0)
    return corr * bcast(scale, corr)


@register_distiller("mdt")
class MDT(Distiller):
    """MDT-dist: a one-time average-velocity student by velocity matching + velocity distillation."""

    Config = MDTConfig
    needs_data = True
    needs_teacher = True
    student_two_time = False
    sample_options = {"sampler": "euler (deterministic re-noise, default distiller.sampler) or renoise "
                                 "(fresh noise)",
                      "seed": "seed of renoise's fresh noise (default 0)"}
    eval_nfe = (1, 2)
    bench_rows = (BenchRow("MDT-dist VM+VD", (), (1, 2)),
                  BenchRow("MDT-dist VM only", ("distiller.lambda_vd=0",), (1, 2)),
                  BenchRow("MDT-dist VD only", ("distiller.lambda_vm=0",), (1, 2)))

    def __init__(self, cfg: MDTConfig, student: nn.Module, teacher: nn.Module | None = None, *,
                 inference_only: bool = False):
        super().__init__(cfg, student, teacher, inference_only=inference_only)
        scfg = getattr(student, "config", None)
        if scfg is not None and getattr(scfg, "two_time", False):
            raise ConfigError("mdt needs a one-time student v(x, t) (model two_time=false)")
        self.num_classes = int(getattr(scfg, "num_classes", 0) or 0)
        self.times = cfg.time_sampler()
        #: θ⁻ of dv/dt: the online student (no weights of its own) or an EMA copy (checkpointed)
        self.target = TargetNetwork(student, cfg.target, cfg.target_decay)
        # kept in a tuple, out of the module tree: it wraps the (frozen, unsaved) teacher
        self._vd_teacher = self._build_vd_teacher(teacher) if teacher is not None else None

    def _build_vd_teacher(self, teacher: nn.Module) -> tuple[nn.Module, float | None]:
        """``(field, w)``: VD's teacher called as ``field(x, t, cond, w=w)`` (``w=None``: as it is)."""
        w = self.cfg.vd_guidance_scale
        if w is None:
            return teacher, None
        if isinstance(teacher, GuidedField):
            return teacher, float(w)
        if w == 1.0:
            return teacher, None
        if self.num_classes == 0:
            raise ConfigError(f"distiller.vd_guidance_scale={w}: the teacher is unconditional (no null label "
                              f"to guide with); leave it null")
        return CFGField(teacher, float(w), self.num_classes), None

    # -- the VM target -----------------------------------------------------------------
    @torch.no_grad()
    def vm_target(self, x: Tensor, t: Tensor, cond: Tensor | None, v_teacher: Tensor,
                  v_here: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(v_T − k, k)`` at ``(x, t)`` along the teacher velocity ``v_teacher``, with the
        correction ``k = t·N(dv/dt)`` (clipped to ``corr_clip·‖v_T‖`` per sample when set).

        ``v_here``: ``v_θ⁻(x, t)`` already computed (the online student's own forward), reused
        by the finite difference."""
        cfg = self.cfg
        ones = torch.ones_like(t)

        def fn(x_, t_):
            return self.target.net(x_, t_, cond=cond)

        if cfg.derivative == "jvp":
            _, dvdt = directional_derivative(fn, (x, t), (v_teacher, ones), method="jvp")
        else:
            if cfg.target != "online":
                v_here = None
            _, dvdt = backward_difference(fn, (x, t), (v_teacher, ones), h=cfg.delta, value=v_here)
        corr = bcast(t, x) * normalize_derivative(dvdt, cfg.dvdt_norm, cfg.dvdt_c)
        if cfg.corr_clip is not None:
            corr = clip_relative(corr, v_teacher, cfg.corr_clip)
        return v_teacher - corr, corr

    # -- losses ------------------------------------------------------------------------
    def _labels(self, cond: Tensor | None, rng: StepRNG) -> Tensor | None:
        """The batch's labels with a share ``uncond_share`` replaced by the null label."""
        if cond is None or self.num_classes == 0 or self.cfg.uncond_share <= 0:
            return cond
        null = rng.rand(cond.shape[0]).to(cond.device) < self.cfg.uncond_share
        return torch.where(null, torch.full_like(cond, self.num_classes), cond)

    def loss(self, batch: dict[str, Tensor], step: int, group: str, rng: StepRNG) -> dict[str, Tensor]:
        """``λ_VM·L_VM + λ_VD·L_VD`` (module docstring)."""
        cfg = self.cfg
        x, cond = batch["x"], batch.get("cond")
        b = x.shape[0]
        eps = rng.randn(b, *x.shape[1:]).to(x.device, x.dtype)
        t = rng.times(self.times, b).to(x.device, x.dtype)
        cond = self._labels(cond, rng)
        student = self.net("student")
        out: dict[str, Tensor] = {}
        total = x.new_zeros(())
        if cfg.lambda_vm > 0:
            x_t = (1 - bcast(t, x)) * x + bcast(t, x) * eps
            with torch.no_grad():
                v_t = self.teacher(x_t, t, cond=cond)
            v = student(x_t, t, cond=cond)
            target, corr = self.vm_target(x_t, t, cond, v_t, v_here=v.detach())
            l_vm = (v - target).pow(2).mean()
            total = total + cfg.lambda_vm * l_vm
            out["vm"] = l_vm.detach()
            out["vm_corr_ratio"] = _ratio(corr, v_t)
        if cfg.lambda_vd > 0 and step >= cfg.vd_start:
            l_vd, g = self._vd(eps, t, cond, student)
            total = total + cfg.lambda_vd * l_vd
            out["vd"] = l_vd.detach()
            out["vd_grad_rms"] = g.pow(2).mean().sqrt()
        if "vm" not in out and "vd" not in out:
            return self.no_update(out, x.device)
        out["loss"] = total
        return out

    def _vd(self, eps: Tensor, t: Tensor, cond: Tensor | None, student: nn.Module) -> tuple[Tensor, Tensor]:
        """``(L_VD, g)``: the one-step sample from ``ε`` (with gradient), re-noised with the same
        ``ε`` and ``t``; ``g = v_real − v_fake`` there (DMD-normalised when ``vd_normalize``)."""
        ones = torch.ones_like(t)
        x_hat = eps - student(eps, ones, cond=cond)  # x̂ = ε − 1·v_θ(ε, 1)
        with torch.no_grad():
            x_r = (1 - bcast(t, eps)) * x_hat.detach() + bcast(t, eps) * eps
            field, w = self._vd_teacher
            v_t = field(x_r, t, cond=cond) if w is None else field(x_r, t, cond=cond, w=w)
            v_fake = self.student(x_r, t, cond=cond)
            v_real, _ = self.vm_target(x_r, t, cond, v_t, v_here=v_fake)
            g = dm_gradient(x_hat, x_r, t, v_real, v_fake, normalize=self.cfg.vd_normalize)
        return 2 * dm_surrogate_loss(x_hat, g).mean(), g

    def after_step(self, step: int, group: str) -> None:
        """EMA target update ``θ⁻ ← d·θ⁻ + (1 − d)·θ`` (no-op for the online target)."""
        self.target.update(self.student)

    # -- sampling ----------------------------------------------------------------------
    def _sample(self, noise: Tensor, nfe: int, cond: Tensor | None, model: nn.Module,
                sampler: str | None = None, seed: int | None = None) -> Tensor:
        """``nfe`` calls on ``sample_grid``: ``x̂0 = x_t − t·v(x_t, t)`` at each time, then to the next
        time by Euler (deterministic re-noise) or fresh noise (module docstring, "Sampling")."""
        sampler = self.cfg.sampler if sampler is None else sampler
        _one_of("mdt: sample option sampler", sampler, SAMPLERS)
        tdtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
        times = build_grid(self.cfg.sample_grid, nfe, device=noise.device, dtype=tdtype)
        gen = torch.Generator(device="cpu").manual_seed(int(seed or 0)) if sampler == "renoise" else None
        b, x = noise.shape[0], noise
        for i in range(nfe):
            t, s = times[i].expand(b), times[i + 1].expand(b)
            v = model(x, t, cond=cond)
            if sampler == "euler" or float(times[i + 1]) == 0.0:
                x = x - bcast(t - s, x) * v
            else:
                x0 = x - bcast(t, x) * v
                z = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
                x = (1 - bcast(s, x)) * x0 + bcast(s, x) * z
        return x


def _ratio(corr: Tensor, v: Tensor) -> Tensor:
    """Mean over the batch of ``‖t·N(dv/dt)‖ / ‖v_T‖`` per sample (how much the correction moves
    the target; logged, and the quantity docs/mdt.md measures against dimension)."""
    num = corr.reshape(corr.shape[0], -1).norm(dim=1)
    den = v.reshape(v.shape[0], -1).norm(dim=1).clamp_min(1e-12)
    return (num / den).mean().detach()
