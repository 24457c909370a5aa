"""Trajectory segmented consistency distillation (TSCD), with LCM and PCM as its special cases.

METHODS.md §3, in the project's convention (``t`` = noise level, ``x_t = (1 − t)·x + t·ε``,
generation ``1 → 0``, flow map ``X(x, t, s) = x + (s − t)·u(x, t, s)``). Papers: Hyper-SD (Ren et
al., arXiv 2404.13686, "trajectory segmented consistency distillation"), PCM (Wang et al., "Phased
Consistency Models", arXiv 2405.18407), LCM (Luo et al., "Latent Consistency Models", arXiv
2310.04378) and TCD (Zheng et al., "Trajectory Consistency Distillation", arXiv 2402.19159) for the
stochastic sampler.

**Segments.** The teacher's solver grid ``1 = t_N > … > t_0`` (``num_steps = N``, ``grid`` uniform or
shifted) is split into ``k = segments`` pieces whose edges are grid points,
``e_j = t_{floor(j·N/k)}``, ``j = 0 … k − 1`` (:func:`flowdistill.core.segments.segment_edges`;
on a shifted grid ``e_j = shift(j/k)`` when ``k | N``). ``e_0 = t_0`` is the grid's smallest time
(``0`` on every registered grid).

**Loss.** Per sample a grid index ``n ~ U{0, …, N − 1}`` (weight 1, as PCM), ``t = t_{n+1}``,
``t' = t_n`` and, from a data batch (consistency distillation uses data; ``needs_data``),

    x_t    = (1 − t)·x + t·ε
    x_t'   = teacher solver step from x_t to t'         (no grad; Euler, Heun, midpoint or DDIM)
    e      = e(t') = the largest edge ≤ t'              (edge_below)
    pred   = X_θ(x_t, t, e)
    target = X_θ⁻(x_t', t', e),   and exactly x_t' when t' = e (a jump of length 0)
    L      = d(pred, sg(target))

so the student learns to jump from anywhere in a segment to the segment's lower edge, consistent
along the teacher's trajectory. ``d`` is PCM/LCM's elementwise pseudo-Huber
``mean(√((pred − tgt)² + c²) − c)``, ``c = 0.001`` (``loss=pseudo_huber_elementwise``,
:func:`flowdistill.core.losses.pseudo_huber_elementwise`), ``l2``, or ``perceptual`` (a registered
perceptual net, :mod:`flowdistill.models.perceptual`). The target network ``θ⁻``
(:class:`flowdistill.core.targets.TargetNetwork`) is the online student under no-grad
(``target=online``: PCM, LCM-LoRA) or an EMA copy (``target=ema``, ``θ⁻ ← d·θ⁻ + (1 − d)·θ`` after
every optimiser step, :meth:`TSCD.after_step`; full-model LCM, ``d = 0.95``).

The teacher arrives guided as the job's ``guidance:`` section says (a fixed scale, as PCM-SD3's
``cond + 3·(cond − uncond)``); per-sample ``w ~ U[w_min, w_max]`` fed to a ``w``-conditioned
student (LCM) is not done here (``draws_guidance_scale = False``).

**Unified student** (Hyper-SD's one model for every step count): ``segment_choices = [1, 2, 4, 8]``
draws ``k`` per sample, so each sample trains the jump to the lower edge of *its* segmentation;
the sampler with ``nfe = k`` then uses exactly the jumps trained for that ``k``.

**Special cases** (one implementation, different config defaults): ``lcm`` is ``k = 1`` (every
sample jumps to ``t_0``: the consistency function ``X(x_t, t, 0)``); ``pcm`` is a fixed ``k``
with the online target and the elementwise pseudo-Huber; Hyper-SD trains ``k = 8 → 4 → 2 → 1``
progressively, each stage initialised from the previous one
(``configs/recipes/tscd_progressive_checkerboard.yaml``).

**Sampling** (:meth:`TSCD._sample`). With ``nfe`` network calls the student jumps edge to edge on
the edges of an ``nfe``-segment split of the *same* teacher grid,

    x ← X(x, 1, ẽ_{nfe−1}) → X(x, ẽ_{nfe−1}, ẽ_{nfe−2}) → … → X(x, ẽ_1, 0),

so ``nfe = k`` uses exactly the jumps the student was trained for, and ``nfe ≠ k`` uses other
edges (trained only where they coincide: a PCM student with ``k = 4`` sampled at ``nfe = 2`` jumps
``1 → ẽ_1 = t_{N/2}``, which is one of its edges, but ``nfe = 1`` asks for ``1 → 0`` across three
segments). The lowest edge ``ẽ_0`` is replaced by ``t = 0`` (the sampler "appends ``t = 0``": on every
registered grid ``ẽ_0 = t_0 = 0`` already, so this is the trained jump; on a grid whose smallest time
is above 0 the last jump goes on to 0 with the same call). ``nfe`` must be in ``[1, N]``.

Stochastic option ``gamma`` (TCD's γ): from ``τ_i`` jump to ``s' = (1 − γ)·τ_{i+1}``, then re-noise
back up to ``τ_{i+1}`` with fresh noise through the path's Gaussian transition
(:meth:`flowdistill.core.paths.AffinePath.forward_transition`). ``γ = 0`` is the deterministic
sampler; ``γ = 1`` jumps to ``0`` and re-noises (LCM's multistep sampler). The same ``nfe`` calls.
The fresh noise comes from a generator seeded by the option ``seed`` (default 0).

**Low-step extras** (Hyper-SD's one-step distribution matching and reward terms, PCM's adversarial
term; each off by default, each added to ``L``, which is unchanged bit for bit when they are off):
:mod:`flowdistill.distillers.tscd_extras` (the maths, the checks of their keys, the mixin
:class:`~flowdistill.distillers.tscd_extras.LowStepExtras` that :class:`TSCD` inherits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flowdistill.core.flowmap import flow_map_jump
from flowdistill.core.losses import premetric
from flowdistill.core.paths import PATHS
from flowdistill.core.rng import StepRNG
from flowdistill.core.segments import edge_below, segment_edges
from flowdistill.core.solvers import STEP_SOLVERS
from flowdistill.core.solvers import step as solver_step
from flowdistill.core.targets import TARGET_MODES, TargetNetwork
from flowdistill.core.timesteps import TimeSamplerConfig, build_grid
from flowdistill.distillers.base import (
    BenchRow,
    Distiller,
    DistillerConfig,
    OptimGroup,
    check_names,
    register_distiller,
)
from flowdistill.distillers.tscd_extras import LowStepExtras, dmd_r_sampler_default, validate_extras
from flowdistill.errors import ConfigError
from flowdistill.models.perceptual import PERCEPTUAL_NETS, LazyPerceptual

TSCD_LOSSES = ("pseudo_huber_elementwise", "l2", "perceptual")


@dataclass
class TSCDConfig(DistillerConfig):
    """TSCD options (module docstring)."""

    name: str = "tscd"
    segments: int = 4  # k: edges e_j = t_{floor(jN/k)} of the teacher grid
    # unified student (Hyper-SD's one model for all step counts): per sample k ~ U(segment_choices);
    # empty = the single k above
    segment_choices: list[int] = field(default_factory=list)
    num_steps: int = 50  # N: the teacher's solver grid
    grid: str = "uniform"  # a registered time grid (uniform | shifted)
    shift: float = 3.0  # grid=shifted: SD3 shift of the teacher grid
    solver: str = "euler"  # the teacher's step t_{n+1} → t_n: euler | heun | midpoint | ddim
    loss: str = "pseudo_huber_elementwise"  # pseudo_huber_elementwise | l2 | perceptual
    huber_c: float = 0.001  # pseudo_huber_elementwise: c (PCM/LCM 0.001)
    perceptual: str = "random_conv"  # loss=perceptual: a registered perceptual net
    perceptual_weights: str = ""
    target: str = "online"  # online (PCM, LCM-LoRA) | ema (full-model LCM)
    target_decay: float = 0.95  # target=ema: θ⁻ ← d·θ⁻ + (1 − d)·θ
    sample_gamma: float = 0.0  # default TCD γ of the sampler (0 = deterministic)
    # -- low-step extras (module docstring), each off by default --
    dmd_weight: float = 0.0  # one-step distribution matching (Hyper-SD); > 0 adds ψ and group "fake"
    dmd_r_sampler: TimeSamplerConfig = field(default_factory=dmd_r_sampler_default)
    dm_normalize: bool = True  # DMD's per-sample normaliser λ
    fake_repeats: int = 1  # ψ updates per training step
    fake_lr_scale: float = 1.0  # ψ's lr = train.lr × this
    reward: str = ""  # a registered reward (models.rewards.REWARDS); "" = none
    reward_params: dict[str, Any] = field(default_factory=dict)  # the reward's own options
    reward_weight: float = 0.0
    reward_margin: float = 0.0  # L_R = relu(margin − R(x̂0))
    adv_weight: float = 0.0  # PCM's adversarial term (PCM: 0.1); > 0 adds the heads and group "disc"
    adv_lr: float = 1.0e-5  # the discriminator heads' learning rate (PCM: 1e-5)
    adv_hidden: int = 64  # width of each discriminator head

    def validate(self) -> None:
        """Names and ranges up front, each error naming its key."""
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ConfigError(f"distiller.num_steps must be a positive integer, got {self.num_steps!r}")
        if not isinstance(self.segments, int) or not 1 <= self.segments <= self.num_steps:
            raise ConfigError(f"distiller.segments must be an integer in [1, distiller.num_steps="
                              f"{self.num_steps}], got {self.segments!r}")
        for k in self.segment_choices:
            if not isinstance(k, int) or not 1 <= k <= self.num_steps:
                raise ConfigError(f"distiller.segment_choices must hold integers in [1, distiller.num_steps="
                                  f"{self.num_steps}], got {list(self.segment_choices)!r}")
        if self.solver not in STEP_SOLVERS:
            raise ConfigError(f"distiller.solver must be one of {', '.join(STEP_SOLVERS)}, "
                              f"got {self.solver!r}")
        if self.loss not in TSCD_LOSSES:
            raise ConfigError(f"distiller.loss must be one of {', '.join(TSCD_LOSSES)}, got {self.loss!r}")
        check_names(loss=self.loss, grid=self.grid)
        if self.loss == "perceptual":
            PERCEPTUAL_NETS.get(self.perceptual)
        if not self.huber_c > 0:
            raise ConfigError(f"distiller.huber_c must be positive, got {self.huber_c}")
        if self.grid == "shifted" and not self.shift > 0:
            raise ConfigError(f"distiller.shift must be positive, got {self.shift}")
        if self.target not in TARGET_MODES:
            raise ConfigError(f"distiller.target must be one of {', '.join(TARGET_MODES)}, "
                              f"got {self.target!r}")
        if not 0.0 <= self.target_decay <= 1.0:
            raise ConfigError(f"distiller.target_decay must be in [0, 1], got {self.target_decay}")
        if not 0.0 <= self.sample_gamma <= 1.0:
            raise ConfigError(f"distiller.sample_gamma must be in [0, 1], got {self.sample_gamma}")
        validate_extras(self)

    @property
    def trained_segments(self) -> tuple[int, ...]:
        """The segment counts the student trains for: ``segment_choices`` or ``(segments,)``."""
        return tuple(self.segment_choices) or (self.segments,)

    def teacher_grid(self, device=None, dtype: torch.dtype = torch.float64) -> Tensor:
        """The teacher's grid ``t_N = 1 > … > t_0`` (sampling order)."""
        kw = {"shift": self.shift} if self.grid == "shifted" else {}
        return build_grid(self.grid, self.num_steps, device=device or "cpu", dtype=dtype, **kw)


@register_distiller("tscd")
class TSCD(LowStepExtras, Distiller):
    """Segmented consistency distillation of a velocity teacher into a two-time flow-map student."""

    Config = TSCDConfig
    needs_data = True
    needs_teacher = True
    student_two_time = True
    #: a distilled flow map as teacher (Hyper-SD's previous stage): its step t → t' is its own jump
    accepts_flow_map_teacher = True
    sample_options = {"gamma": "TCD stochastic γ in [0, 1] (0 = deterministic); default sample_gamma",
                      "seed": "seed of the fresh noise of gamma > 0 (default 0)"}
    eval_nfe = (1, 2, 4, 8)
    bench_rows = (BenchRow("TSCD (k=4)", (), (1, 2, 4, 8)),
                  BenchRow("TSCD progressive 8→4→2→1", (), (1, 2, 4, 8), "recipes/tscd_progressive:k1"),
                  BenchRow("TSCD unified k∈{1,2,4,8}", ("distiller.segment_choices=[1,2,4,8]",),
                           (1, 2, 4, 8)))

    def __init__(self, cfg: TSCDConfig, student: nn.Module, teacher: nn.Module | None = None, *,
                 inference_only: bool = False):
        super().__init__(cfg, student, teacher, inference_only=inference_only)
        scfg = getattr(student, "config", None)
        if scfg is not None and not getattr(scfg, "two_time", True):
            raise ConfigError(f"{self.name} needs a two-time student u(x, t, s) (model two_time=true)")
        self.path = PATHS.build("linear")
        #: θ⁻: the online student (no weights of its own) or an EMA copy (checkpointed with the distiller)
        self.target = TargetNetwork(student, cfg.target, cfg.target_decay)
        self._perceptual = LazyPerceptual(cfg.perceptual, cfg.perceptual_weights)
        # low-step extras (tscd_extras): ψ and the heads only when training (a teacher) and switched on
        self._init_extras(cfg, teacher)

    # -- parameter groups --------------------------------------------------------------
    def trainable_nets(self) -> dict[str, nn.Module]:
        """The student and, when their terms are on, ψ (``fake``) and the discriminator heads (``disc``)."""
        return {"student": self.student, **self.extra_nets()}

    def optim_groups(self, lr: float) -> list[OptimGroup]:
        """``"fake"`` (ψ, ``fake_repeats`` updates), ``"disc"`` (lr ``adv_lr``), then ``"student"``."""
        return [*self.extra_groups(lr), OptimGroup.trainable("student", self.student, lr)]

    # -- grid --------------------------------------------------------------------------
    def grid_ascending(self, device, dtype: torch.dtype) -> Tensor:
        """Teacher grid ``t_0 < … < t_N`` (index ``n`` ascending with time)."""
        return self.cfg.teacher_grid(device, dtype).flip(0)

    def edges(self, k: int | None = None, device=None, dtype: torch.dtype = torch.float64) -> Tensor:
        """The ``k`` (default ``segments``) edges ``e_0 < … < e_{k−1}`` on the teacher grid."""
        return segment_edges(self.cfg.teacher_grid(device, dtype), self.cfg.segments if k is None else k)

    # -- loss --------------------------------------------------------------------------
    @torch.no_grad()
    def consistency_target(self, x_t: Tensor, t: Tensor, t_prev: Tensor, e: Tensor,
                           cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x_t', target)``: one teacher step ``x_t → x_t'`` and ``X_θ⁻(x_t', t', e)``, which is
        ``x_t'`` itself (exactly) where ``t' = e``."""
        x_tp = solver_step(self.teacher, x_t, t, t_prev, self.cfg.solver, cond=cond)
        jumped = flow_map_jump(self.target, x_tp, t_prev, e, cond)
        on_edge = (t_prev == e).reshape(-1, *([1] * (x_tp.ndim - 1)))
        return x_tp, torch.where(on_edge, x_tp, jumped)

    def loss(self, batch: dict[str, Tensor], step: int, group: str, rng: StepRNG) -> dict[str, Tensor]:
        """``group="student"``: ``d(X_θ(x_t, t, e), sg X_θ⁻(x_t', t', e))`` plus the extras that are
        on; ``"fake"``: ψ's flow matching; ``"disc"``: the heads' hinge loss (module docstring)."""
        if group == "fake":
            return self._fake_loss(batch, rng)
        if group == "disc":
            return self._disc_loss(batch, rng)
        if group != "student":
            raise ValueError(f"{self.name} has groups 'fake', 'disc' and 'student', got {group!r}")
        x, cond = batch["x"], batch.get("cond")
        x_t, t, t_prev, e, e_hi = self._draw(batch, rng)
        _, target = self.consistency_target(x_t, t, t_prev, e, cond)
        pred = flow_map_jump(self.net("student"), x_t, t, e, cond)
        per = self._premetric(pred, target)
        out = {"loss": per.mean(), "mse": (pred.detach() - target).pow(2).mean(),
               "boundary_share": (t_prev == e).float().mean()}
        self.extra_student_terms(x, cond, pred, target, e, e_hi, rng, out)
        return out

    def _draw(self, batch: dict[str, Tensor], rng: StepRNG) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(x_t, t, t', e, e⁺)`` for a data batch: ``ε``, grid index ``n``, the sample's phase
        ``[e, e⁺]`` and the point ``x_t`` on the path (the draws of the consistency loss, in order)."""
        x = batch["x"]
        b, N = x.shape[0], self.cfg.num_steps
        eps = rng.randn(b, *x.shape[1:]).to(x.device, x.dtype)
        n = rng.randint(N, b).to(x.device)
        grid = self.grid_ascending(x.device, x.dtype)
        t, t_prev = grid[n + 1], grid[n]
        e, e_hi = self.sample_phases(t_prev, grid, rng)
        return self.path.sample(x, eps, t), t, t_prev, e, e_hi

    def sample_edges(self, t_prev: Tensor, grid: Tensor, rng: StepRNG) -> Tensor:
        """Per sample the edge ``e(t')`` of its segmentation: the one ``k = segments``, or for a unified
        student ``k ~ U(segment_choices)`` per sample (one extra draw from ``rng``)."""
        return self.sample_phases(t_prev, grid, rng)[0]

    def sample_phases(self, t_prev: Tensor, grid: Tensor, rng: StepRNG) -> tuple[Tensor, Tensor]:
        """Per sample the phase ``[e, e⁺]`` holding ``t'`` in its segmentation (:meth:`sample_edges`'s
        draw): ``e = e(t')`` and ``e⁺`` the next edge above ``e``, or the grid's top ``t_N = 1``."""
        ks = self.cfg.trained_segments
        if len(ks) == 1:
            return self._phase(t_prev, segment_edges(grid, ks[0]), grid[-1])
        pick = rng.randint(len(ks), t_prev.shape[0]).to(t_prev.device)
        lo, hi = zip(*(self._phase(t_prev, segment_edges(grid, k), grid[-1]) for k in ks), strict=True)
        return (torch.stack(lo).gather(0, pick[None]).squeeze(0),  # [len(ks), B] -> [B]
                torch.stack(hi).gather(0, pick[None]).squeeze(0))

    @staticmethod
    def _phase(t_prev: Tensor, edges: Tensor, top: Tensor) -> tuple[Tensor, Tensor]:
        """``(e, e⁺)``: the largest edge ``≤ t'`` and the next edge above it (``top`` for the last)."""
        lo = edge_below(t_prev, edges)
        e = edges.to(device=t_prev.device, dtype=t_prev.dtype)
        above = torch.cat([e, top.reshape(1).to(e)])
        return lo, above[torch.searchsorted(e, lo.contiguous(), right=True)]

    def _premetric(self, pred: Tensor, target: Tensor) -> Tensor:
        kw: dict = {}
        if self.cfg.loss == "pseudo_huber_elementwise":
            kw["c"] = self.cfg.huber_c
        elif self.cfg.loss == "perceptual":
            kw["net"] = self._perceptual(pred.device)
        return premetric(self.cfg.loss)(pred, target, **kw)

    def after_step(self, step: int, group: str) -> None:
        """EMA target update ``θ⁻ ← d·θ⁻ + (1 − d)·θ`` after the student's step (no-op for the
        online target; the ``"fake"`` and ``"disc"`` steps leave it alone)."""
        if group == "student":
            self.target.update(self.student)

    # -- sampling ----------------------------------------------------------------------
    def scheduler_config(self) -> dict:
        """``FlowDistillScheduler`` keys that sample as :meth:`_sample` in diffusers pipelines: the
        segment edges of the teacher's ``num_steps``-step grid (its SD3 ``shift``) and the default γ."""
        return {"segment_steps": self.cfg.num_steps, "gamma": float(self.cfg.sample_gamma),
                "shift": float(self.cfg.shift) if self.cfg.grid == "shifted" else 1.0}

    def sample_times(self, nfe: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ``nfe + 1`` times of the sampler, ``1 > ẽ_{nfe−1} > … > ẽ_1 > 0`` (the edges of an
        ``nfe``-segment split of the teacher grid, the lowest replaced by 0)."""
        if not isinstance(nfe, int) or not 1 <= nfe <= self.cfg.num_steps:
            raise ConfigError(f"{self.name} samples with 1 to distiller.num_steps={self.cfg.num_steps} "
                              f"jumps, got nfe={nfe!r}")
        e = self.edges(nfe, device, torch.float64)
        times = torch.cat([torch.ones(1, device=e.device, dtype=e.dtype), e[1:].flip(0),
                           torch.zeros(1, device=e.device, dtype=e.dtype)])
        return times.to(dtype)

    def _sample(self, noise: Tensor, nfe: int, cond: Tensor | None, model: nn.Module,
                gamma: float | None = None, seed: int | None = None) -> Tensor:
        """``nfe`` jumps edge to edge (module docstring); ``gamma > 0``: TCD's stochastic variant."""
        gamma = self.cfg.sample_gamma if gamma is None else float(gamma)
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"{self.name}: sample option gamma must be in [0, 1], got {gamma}")
        tdtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
        times = self.sample_times(nfe, noise.device, tdtype)
        gen = None
        if gamma > 0:
            gen = torch.Generator(device="cpu").manual_seed(int(seed or 0))
        B = noise.shape[0]
        x = noise
        for i in range(nfe):
            t, s = times[i].expand(B), times[i + 1].expand(B)
            s_low = (1.0 - gamma) * s
            x = flow_map_jump(model, x, t, s_low, cond)
            if gamma > 0 and float(times[i + 1]) > 0:
                z = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
                x = self.path.forward_transition(x, s_low, s, z)
        return x


@dataclass
class LCMConfig(TSCDConfig):
    """LCM: one segment (every sample jumps to ``t_0``) with an EMA target, decay 0.95, sampled
    with LCM's multistep sampler (``γ = 1``: jump to 0, re-noise to the next time)."""

    name: str = "lcm"
    segments: int = 1
    target: str = "ema"
    sample_gamma: float = 1.0


@register_distiller("lcm")
class LCM(TSCD):
    """Latent Consistency Models (Luo et al., arXiv 2310.04378) as TSCD with ``k = 1``.

    The target is an **EMA** copy with decay 0.95, as LCM's full-model distillation: here the whole
    student is trained (no LoRA), which is the setting of LCM's EMA target; LCM-LoRA (and PCM)
    use the online student instead (``distiller.target=online``). The loss stays the elementwise
    pseudo-Huber with ``c = 0.001`` of LCM's released code. A one-segment student is trained only
    for jumps to ``t_0 = 0``, so its multistep sampler defaults to ``γ = 1`` (LCM's: predict the
    sample, re-noise it to the next time with fresh noise); ``gamma=0`` asks for the
    deterministic edge-to-edge jumps, which it was not trained for."""

    Config = LCMConfig
    bench_rows = (BenchRow("LCM (k=1)", (), (1, 2, 4, 8)),)


@dataclass
class PCMConfig(TSCDConfig):
    """PCM: a fixed number of phases, online target, elementwise pseudo-Huber ``c = 0.001``."""

    name: str = "pcm"
    segments: int = 4
    target: str = "online"
    loss: str = "pseudo_huber_elementwise"
    huber_c: float = 0.001


@register_distiller("pcm")
class PCM(TSCD):
    """Phased Consistency Models (Wang et al., arXiv 2405.18407) as TSCD with fixed ``k`` and the
    online no-grad target (PCM's EMA helper is never called in its training code). Benchmarked with
    ``k = NFE`` (one student per step count). PCM's adversarial term is the option ``adv_weight``
    (0.1 in PCM; off by default, see the module docstring)."""

    Config = PCMConfig
    bench_rows = tuple(BenchRow(f"PCM (k={k})", (f"distiller.segments={k}",), (k,)) for k in (1, 2, 4, 8))
