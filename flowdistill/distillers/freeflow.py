"""FreeFlow: data-free flow-map distillation ("Flow Map Distillation Without Data", Tong et al.,
arXiv 2511.19428), METHODS.md §1, in the project's convention (``t`` = noise level, generation
``1 → 0``, ``X(x, t, s) = x + (s − t)·u(x, t, s)``).

The student is a two-time average-velocity net ``u_θ(x, t, s)`` started from the teacher
(``u(x, t, s) = v_T(x, t)`` at initialisation). It never sees data: every batch is prior noise
``ε ~ N(0, I)`` (and random class labels for a conditional teacher).

**Prediction.** Along the exact flow map, ``d/ds X(x, t, s) = v_T(X(x, t, s), s)``, i.e.

    u(x, t, s) + (s − t)·∂_s u(x, t, s) = v_T(X(x, t, s), s),

so the student regresses its own average velocity onto a stop-gradient target,

    L_pred = E ‖u_θ(x_t, t, s) − sg[ v_T(X_θ(x_t, t, s), s) − (s − t)·∂_s u_θ(x_t, t, s) ]‖².

``∂_s u`` is a derivative in the scalar ``s`` only (tangent 1 on ``s``), taken by forward-mode
JVP or a central finite difference (``derivative``). At ``t = 1``, ``x_t = ε`` and ``δ = 1 − s``
this is FreeFlow's ``F + δ·∂_δF = v_T(f(ε, δ), 1 − δ)`` with ``F(ε, δ) = u(ε, 1, 1 − δ)``.
Target times: ``s = t − δ``, ``δ = t·(1 − U)`` uniform on ``(0, t]``, with a share
``s_zero_share`` put exactly at ``s = 0`` (the jump that sampling uses; the paper's "share at
``δ = 1``").

*Beyond the paper* (``multi_start``): a share ``multi_start_share`` of the batch starts at
``t ~ U(t_min, 1)`` from a point on the student's own path, ``x_t = sg(X_θ(ε, 1, t))`` (one
no-grad student jump — still data-free), and applies the same identity from there. This trains the
map from intermediate times, which is what 2-, 4-, … step sampling uses, and keeps it
consistent with the one-jump path.

*Beyond the paper* (``shortcut_weight``): the composition of two half jumps is a second
stop-gradient target for the same ``u`` (the self-consistency of shortcut models, Frans et al.
2024, METHODS.md §1 "related objectives"); with ``m = (t + s)/2``,

    L_sc = E ‖u_θ(x_t, t, s) − sg[ ½·(u_θ(x_t, t, m) + u_θ(X_θ(x_t, t, m), m, s)) ]‖²,

robustly weighted like ``L_pred`` and added with weight ``shortcut_weight``. Short jumps are the
accurate ones (``u → v_T`` as ``s → t``); this carries their accuracy to the long jumps that 1- and
2-step sampling use, which the derivative identity alone reaches slowly. Measured on the
checkerboard (1200 steps, see ``configs/freeflow_checkerboard.yaml``): weight 0.1 took the 1/2/4-jump
sliced W2 from 0.038/0.034/0.030 to 0.032/0.031/0.029; weight 1 diverged (NaN at step 584).

*Beyond the paper* (``correction_nfe``): the correction may also see the student's 2-, 4-…-jump
samples (gradient through every jump), the batch split evenly among the listed jump counts. On
the checkerboard ``[1, 2]`` did not help (1/2/4 jumps 0.038/0.036/0.035 against 0.038/0.034/0.030
for ``[1]``), so the default stays ``[1]``.

**Derivative** (decided here, measured). With the reference nets' default ``t − s`` embedding,
sinusoids of ``1000·(t − s)`` (the teacher's time scale), the exact ``∂_s u`` (``derivative="jvp"``)
is dominated by high-frequency features and makes a noisy, self-reinforcing target; a central
difference over a wide stencil (``derivative="fd"``, ``fd_step=0.02``, a low-pass derivative) works
there, and ``"fd"`` stays the default of this config class. The teacher is one-time and has no
``t − s`` branch, so the student may embed ``t − s`` at its own, small scale (model option
``delta_time_scale``, e.g. 5) and still start exactly as the teacher; ``u`` is then smooth in
``s`` and the exact JVP is the better derivative. On the checkerboard (1200 steps, two teachers,
sliced W2 at 1/2/4 jumps) ``delta_time_scale=5`` + ``"jvp"`` gave 0.046/0.042/0.039 and
0.040/0.043/0.041 against 0.047/0.064/0.046 and 0.054/0.064/0.041 for ``"fd"`` at scale 1000, so
``configs/freeflow_checkerboard.yaml`` uses it.

**Robust weighting** (MeanFlow-style, ``adaptive_p``). Near ``s → 0`` the teacher velocity off the
data manifold scales like ``dist/s``, so a few residuals are huge; each sample's squared residual
is divided by ``sg(‖Δ‖²/D + c)^p`` (``p = 1`` default), which bounds their pull. ``s_weight_c > 0``
additionally weighs residuals by ``((s + c)/(1 + c))²`` (error in x₀ units).

**Correction** (distribution matching on the student's samples, DMD-style; ``core.dmd``).
``x̂ = X_θ(ε, 1, 0)`` with gradient, ``x_r = (1 − r)·sg(x̂) + r·n`` with ``r`` from ``r_sampler``
and fresh ``n``; ``v_real`` is the (guided) teacher and ``v_fake`` a fake-velocity net ``ψ``
(a trainable copy of the teacher). ``g = λ(r)·(v_real − v_fake)`` (DMD's per-sample
normaliser ``λ``), ``L_corr = ½‖x̂ − sg(x̂ − g)‖²``, whose gradient at ``x̂`` is ``g``: descending
it moves ``x̂`` along ``v_fake − v_real`` ∝ ``E_real[x₀|x_r] − E_fake[x₀|x_r]``, toward the
teacher's marginal. ``ψ`` learns the student's noising flow by flow matching on ``sg(x̂)``,
``L_ψ = ‖v_ψ(x_r, r) − (n − sg(x̂))‖²``, in its own optimiser group ``"fake"`` that runs
``fake_repeats`` times before every student step (two time scales).

**Balancing** (open in the paper; decided here). Both gradients are known in closed form at the
network output: ``∂L_pred/∂u = 2·w_pred·w_i·(u − target)/N_pred`` (``w_i`` the robust per-sample
weights) and ``∂L_corr/∂x̂ = g/N_corr``
(``x̂ = ε − u(ε, 1, 0)``, so at the network output the sign flips and the norm is the same). The
correction is scaled by the detached factor

    κ = correction_fraction · RMS(∂L_pred/∂u) / RMS(∂L_corr/∂x̂),

so its gradient at the student output is a fixed fraction of the prediction's whatever the
scales of the two losses (the DMD gradient's size changes a lot as ψ and the student move); with
``mode="correction"`` (ablation) there is no prediction gradient to compare with and ``κ = 1``.
The correction is switched on at step ``correction_warmup`` (``ψ`` trains from step 0, so it
tracks the student before it is used).

Sampling: ``nfe`` jumps edge to edge on a uniform grid from ``t = 1`` to ``0``
(:func:`~flowdistill.core.flowmap.sample_flow_map`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flowdistill.core.broadcast import bcast
from flowdistill.core.derivatives import directional_derivative
from flowdistill.core.distributed import global_rms
from flowdistill.core.dmd import dm_gradient_at, dm_surrogate_loss, fake_velocity_loss, make_fake_velocity_net
from flowdistill.core.flowmap import flow_map_chain, flow_map_jump, sample_flow_map, shortcut_target
from flowdistill.core.rng import StepRNG
from flowdistill.core.timesteps import TimeSamplerConfig
from flowdistill.core.weights import adaptive_weight
from flowdistill.distillers.base import (
    BenchRow,
    Distiller,
    DistillerConfig,
    OptimGroup,
    check_names,
    register_distiller,
)
from flowdistill.errors import ConfigError

MODES = ("both", "prediction", "correction")


def _r_sampler_default() -> TimeSamplerConfig:
    return TimeSamplerConfig(name="uniform", t_min=0.02, t_max=0.98)


@dataclass
class FreeFlowConfig(DistillerConfig):
    """FreeFlow options (see the module docstring for the maths)."""

    name: str = "freeflow"
    mode: str = "both"  # both | prediction | correction (ablations)
    # prediction
    derivative: str = "fd"  # fd | jvp  (∂_s u); see "Derivative" in the module docstring
    fd_step: float = 0.02
    prediction_weight: float = 1.0
    adaptive_p: float = 1.0  # per-sample weight 1/sg(‖Δ‖²/D + c)^p (0 = plain L2)
    adaptive_c: float = 1e-3
    s_weight_c: float = 0.0  # > 0: weight the residual by ((s + c)/(1 + c))² (0 = off)
    s_zero_share: float = 0.25  # share of the batch with s = 0 (δ = t)
    multi_start: bool = True  # beyond the paper: start times along the student's own path
    multi_start_share: float = 0.5  # share of the batch that starts at t < 1
    t_min: float = 0.05  # multi-start times t ~ U(t_min, 1)
    shortcut_weight: float = 0.0  # beyond the paper: self-consistency X(t→s) = X(m→s)∘X(t→m) (0 = off)
    # correction
    correction: bool = True
    correction_fraction: float = 0.5
    correction_warmup: int = 0
    # beyond the paper: the student's samples that the correction sees are made with these numbers
    # of jumps (the batch split evenly among them), so the 2-, 4-step outputs are corrected too
    correction_nfe: list[int] = field(default_factory=lambda: [1])
    dm_normalize: bool = True
    r_sampler: TimeSamplerConfig = field(default_factory=_r_sampler_default)
    fake_repeats: int = 2
    fake_lr_scale: float = 1.0
    # conditioning (the teacher's guidance is the job's guidance: section, applied when it is built)
    uncond_share: float = 0.1  # conditional teachers: share of null labels in the prior batch
    sample_grid: str = "uniform"

    def validate(self) -> None:
        """Names and ranges up front, each error naming its key."""
        if self.mode not in MODES:
            raise ConfigError(f"distiller.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.derivative not in ("jvp", "fd"):
            raise ConfigError(f"distiller.derivative must be 'jvp' or 'fd', got {self.derivative!r}")
        if not self.fd_step > 0:
            raise ConfigError(f"distiller.fd_step must be positive, got {self.fd_step}")
        for key in ("s_zero_share", "multi_start_share", "uncond_share"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"distiller.{key} must be in [0, 1], got {v}")
        if not 0.0 <= self.t_min < 1.0:
            raise ConfigError(f"distiller.t_min must be in [0, 1), got {self.t_min}")
        if self.adaptive_p < 0 or not self.adaptive_c > 0:
            raise ConfigError("distiller.adaptive_p must be >= 0 and distiller.adaptive_c positive")
        if self.shortcut_weight < 0:
            raise ConfigError(f"distiller.shortcut_weight must be >= 0, got {self.shortcut_weight}")
        if self.prediction_weight < 0 or self.correction_fraction < 0:
            raise ConfigError("distiller.prediction_weight and distiller.correction_fraction must be >= 0")
        if self.correction_warmup < 0:
            raise ConfigError(f"distiller.correction_warmup must be >= 0, got {self.correction_warmup}")
        if not self.correction_nfe or any(int(k) < 1 for k in self.correction_nfe):
            raise ConfigError(f"distiller.correction_nfe must be a non-empty list of positive jump counts, "
                              f"got {list(self.correction_nfe)}")
        if self.fake_repeats < 1:
            raise ConfigError(f"distiller.fake_repeats must be >= 1, got {self.fake_repeats}")
        if not self.fake_lr_scale > 0:
            raise ConfigError(f"distiller.fake_lr_scale must be positive, got {self.fake_lr_scale}")
        if self.mode == "correction" and not self.correction:
            raise ConfigError("distiller.mode='correction' needs distiller.correction=true")
        check_names(grid=self.sample_grid)
        try:
            self.r_sampler.build()
        except ValueError as e:
            raise ConfigError(f"distiller.r_sampler: {e}") from None

    @property
    def uses_prediction(self) -> bool:
        """Whether the prediction loss is on."""
        return self.mode in ("both", "prediction")

    @property
    def uses_correction(self) -> bool:
        """Whether the correction loss (and the fake net) is on."""
        return self.correction and self.mode in ("both", "correction")


def _rms(x: Tensor) -> Tensor:
    """RMS over the global batch (all processes), so the balancing is the same on 1 or N."""
    return global_rms(x)


@register_distiller("freeflow")
class FreeFlow(Distiller):
    """Data-free flow-map distillation of a velocity teacher into a two-time student."""

    Config = FreeFlowConfig
    needs_data = False
    needs_teacher = True
    student_two_time = True
    sample_options = {}  # jumps on distiller.sample_grid; no solver to choose
    eval_nfe = (1, 2, 4)
    bench_rows = (BenchRow("FreeFlow"),
                  BenchRow("FreeFlow (prediction only)", ("distiller.mode=prediction",)),
                  BenchRow("FreeFlow (correction only)", ("distiller.mode=correction",
                                                          "distiller.correction_warmup=0")))

    def __init__(self, cfg: FreeFlowConfig, student: nn.Module, teacher: nn.Module | None = None, *,
                 inference_only: bool = False):
        super().__init__(cfg, student, teacher, inference_only=inference_only)
        scfg = getattr(student, "config", None)
        if scfg is not None and not getattr(scfg, "two_time", True):
            raise ConfigError("freeflow needs a two-time student u(x, t, s) (model two_time=true)")
        self.num_classes = int(getattr(scfg, "num_classes", 0) or 0)
        self.r_sampler = cfg.r_sampler.build()
        # ψ: the fake-velocity net, a trainable one-time copy of the teacher's net (not of its guided
        # field: ψ learns the student's conditional flow, unguided). Part of the trainable
        # (checkpointed) state, never of the exported student. No teacher (inference) → no ψ.
        self.fake: nn.Module | None = None
        if teacher is not None and cfg.uses_correction:
            self.fake = make_fake_velocity_net(teacher)  # core.dmd, shared with TSCD's DMD term

    # -- parameter groups --------------------------------------------------------------
    def trainable_nets(self) -> dict[str, nn.Module]:
        """The student and, when the correction is on, the fake-velocity net ψ."""
        nets = {"student": self.student}
        if self.fake is not None:
            nets["fake"] = self.fake
        return nets

    def optim_groups(self, lr: float) -> list[OptimGroup]:
        """``"fake"`` (ψ, ``fake_repeats`` updates per step) first, then ``"student"``."""
        groups = []
        if self.fake is not None:
            groups.append(OptimGroup.trainable("fake", self.fake, lr * self.cfg.fake_lr_scale,
                                               repeats=self.cfg.fake_repeats))
        groups.append(OptimGroup.trainable("student", self.student, lr))
        return groups

    # -- batches -----------------------------------------------------------------------
    def prior_batch(self, rng: StepRNG, local_batch: int, sample_shape: tuple[int, ...]) -> dict[str, Tensor]:
        """Noise, plus random labels (a share of them null) for a conditional teacher."""
        batch = {"noise": rng.randn(local_batch, *sample_shape)}
        if self.num_classes > 0:
            labels = rng.randint(self.num_classes, local_batch)
            null = rng.rand(local_batch) < self.cfg.uncond_share
            batch["cond"] = torch.where(null.to(labels.device), torch.full_like(labels, self.num_classes),
                                        labels)
        return batch

    def _v_real(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """The teacher velocity ``v_T`` — guided as the job's ``guidance:`` section says (the
        teacher comes ready, DESIGN.md §1)."""
        return self.teacher(x, t, cond=cond)

    # -- losses ------------------------------------------------------------------------
    def loss(self, batch: dict[str, Tensor], step: int, group: str, rng: StepRNG) -> dict[str, Tensor]:
        """``group="fake"``: ψ's flow-matching loss; ``group="student"``: prediction + correction."""
        if group == "fake":
            return self._fake_loss(batch, rng)
        if group != "student":
            raise ValueError(f"freeflow has groups 'fake' and 'student', got {group!r}")
        eps, cond = batch["noise"], batch.get("cond")
        out: dict[str, Tensor] = {}
        total = eps.new_zeros(())
        grad_pred_rms = None
        if self.cfg.uses_prediction:
            l_pred, mse, grad_pred_rms = self._prediction(eps, cond, rng)
            out["pred"] = l_pred.detach()
            out["pred_mse"] = mse
            total = total + self.cfg.prediction_weight * l_pred
        if self.cfg.uses_correction and step >= self.cfg.correction_warmup:
            l_corr, grad_corr_rms = self._correction(eps, cond, rng)
            if grad_pred_rms is not None:
                kappa = self.cfg.correction_fraction * grad_pred_rms / (grad_corr_rms + 1e-12)
            else:
                kappa = torch.ones((), device=eps.device)
            out["corr"] = l_corr.detach()
            out["corr_scale"] = kappa.detach()
            total = total + kappa.detach() * l_corr
        if grad_pred_rms is None and "corr" not in out:  # neither loss is on at this step
            return self.no_update(out, eps.device)
        out["loss"] = total
        return out

    def _prediction(self, eps: Tensor, cond: Tensor | None, rng: StepRNG) -> tuple[Tensor, Tensor, Tensor]:
        """``L_pred`` (weighted), its unweighted MSE, and the RMS of its gradient at ``u`` (closed
        form, detached)."""
        cfg = self.cfg
        b = eps.shape[0]
        ones = torch.ones(b, device=eps.device, dtype=eps.dtype)
        u_start, u_delta, u_zero = rng.rand(b), rng.rand(b), rng.rand(b)
        u_start, u_delta, u_zero = (v.to(eps.device, eps.dtype) for v in (u_start, u_delta, u_zero))
        # start times: t = 1 (x_t = ε), or t ~ U(t_min, 1) on the student's own path
        t = ones.clone()
        x_t = eps
        if cfg.multi_start and cfg.multi_start_share > 0:
            inner = u_start < cfg.multi_start_share
            t = torch.where(inner, cfg.t_min + (1 - cfg.t_min) * u_start / cfg.multi_start_share, ones)
            with torch.no_grad():
                jumped = flow_map_jump(self.student, eps, ones, t, cond)
            x_t = torch.where(inner.reshape(-1, *([1] * (eps.ndim - 1))), jumped, eps).detach()
        # target times s = t − δ, δ ~ U(0, t], a share exactly at s = 0
        delta = t * (1 - u_delta)
        s = torch.where(u_zero < cfg.s_zero_share, torch.zeros_like(t), t - delta).clamp_min(0.0)

        def u_of_s(s_: Tensor) -> Tensor:  # the bare student: JVP cannot pass an engine wrapper
            return self.student(x_t, t, s_, cond=cond)

        student = self.net("student")

        def u_of_s_wrapped(s_: Tensor) -> Tensor:  # the gradient-carrying call (DDP averages it)
            return student(x_t, t, s_, cond=cond)

        u, du_ds = directional_derivative(u_of_s, (s,), (ones,), method=cfg.derivative, h=cfg.fd_step,
                                          forward=None if student is self.student else u_of_s_wrapped)
        with torch.no_grad():
            dt = bcast(s - t, eps)
            x_s = x_t + dt * u.detach()
            target = self._v_real(x_s, s, cond) - dt * du_ds
        diff = u - target
        sq = diff.pow(2).reshape(b, -1).mean(dim=1)  # per-sample ‖Δ‖²/D
        if cfg.s_weight_c > 0:  # residual in x₀ units: ‖(s + c)·Δ‖², damps the stiff s → 0 end
            sq = sq * ((s + cfg.s_weight_c) / (1 + cfg.s_weight_c)).pow(2)
        w = self._robust_weight(sq)
        l_pred = (w * sq).mean()
        scale = w if cfg.s_weight_c <= 0 else w * ((s + cfg.s_weight_c) / (1 + cfg.s_weight_c)).pow(2)
        grad = 2 * bcast(scale, diff) * diff.detach()
        if cfg.shortcut_weight > 0:
            diff_sc = u - self._shortcut_target(x_t, t, s, cond)
            sq_sc = diff_sc.pow(2).reshape(b, -1).mean(dim=1)
            w_sc = cfg.shortcut_weight * self._robust_weight(sq_sc)
            l_pred = l_pred + (w_sc * sq_sc).mean()
            grad = grad + 2 * bcast(w_sc, diff_sc) * diff_sc.detach()
        grad = cfg.prediction_weight * grad / diff.numel()
        return l_pred, sq.detach().mean(), _rms(grad)

    def _robust_weight(self, sq: Tensor) -> Tensor:
        """MeanFlow-style per-sample weight ``1/sg(‖Δ‖²/D + c)^p`` (ones when ``p = 0``);
        :func:`flowdistill.core.weights.adaptive_weight` with the config's ``p, c``."""
        return adaptive_weight(sq, self.cfg.adaptive_p, self.cfg.adaptive_c)

    def _shortcut_target(self, x_t: Tensor, t: Tensor, s: Tensor, cond: Tensor | None) -> Tensor:
        """Average velocity of two half jumps of the student, ``½·(u(x_t, t, m) + u(X(x_t, t, m), m, s))``
        with ``m = (t + s)/2`` (no grad): :func:`flowdistill.core.flowmap.shortcut_target`."""
        return shortcut_target(self.student, x_t, t, s, cond)

    def _student_samples(self, eps: Tensor, cond: Tensor | None) -> Tensor:
        """The student's samples (with gradient when enabled): sample ``i`` is made with
        ``k = correction_nfe[i mod len]`` jumps on the sampling grid, ``x̂ = X_θ(ε, 1, 0)`` for
        ``k = 1``, the ``k``-step chain of jumps otherwise (gradient through every jump)."""
        nfes = [int(k) for k in self.cfg.correction_nfe]
        student = self.net("student")
        if len(nfes) == 1:
            return flow_map_chain(student, eps, nfes[0], self.cfg.sample_grid, cond)
        which = torch.arange(eps.shape[0], device=eps.device) % len(nfes)
        out = torch.empty_like(eps)
        for j, k in enumerate(nfes):
            idx = (which == j).nonzero(as_tuple=True)[0]
            if idx.numel():
                sub = None if cond is None else cond[idx]
                x_k = flow_map_chain(student, eps[idx], k, self.cfg.sample_grid, sub)
                out = out.index_put((idx,), x_k)
        return out

    def _correction(self, eps: Tensor, cond: Tensor | None, rng: StepRNG) -> tuple[Tensor, Tensor]:
        """Raw ``L_corr`` (mean over the batch) and the RMS of its gradient at ``x̂``."""
        b = eps.shape[0]
        x_hat = self._student_samples(eps, cond)
        r = rng.times(self.r_sampler, b).to(eps.device, eps.dtype)
        n = rng.randn(b, *eps.shape[1:]).to(eps.device, eps.dtype)
        g = dm_gradient_at(x_hat, r, n, self.teacher, self.fake, cond, normalize=self.cfg.dm_normalize)
        l_corr = dm_surrogate_loss(x_hat, g).mean()
        grad_rms = _rms(g) / g.numel()  # ∂(mean_b ½‖x̂ − sg(x̂ − g)‖²/D)/∂x̂ = g/(B·D)
        return l_corr, grad_rms

    def _fake_loss(self, batch: dict[str, Tensor], rng: StepRNG) -> dict[str, Tensor]:
        """``L_ψ = ‖v_ψ(x_r, r) − (n − sg(x̂))‖²`` on the student's current one-step samples."""
        if self.fake is None:
            raise RuntimeError("freeflow: no fake-velocity net (correction off or inference-only)")
        eps, cond = batch["noise"], batch.get("cond")
        b = eps.shape[0]
        with torch.no_grad():
            x_hat = self._student_samples(eps, cond)
        r = rng.times(self.r_sampler, b).to(eps.device, eps.dtype)
        n = rng.randn(b, *eps.shape[1:]).to(eps.device, eps.dtype)
        return {"loss": fake_velocity_loss(self.net("fake"), x_hat, r, n, cond)}

    # -- sampling ----------------------------------------------------------------------
    def _sample(self, noise: Tensor, nfe: int, cond: Tensor | None, model: nn.Module) -> Tensor:
        """``nfe`` flow-map jumps on the ``sample_grid`` from ``t = 1`` to ``0`` (no options)."""
        return sample_flow_map(model, noise, nfe, grid=self.cfg.sample_grid, cond=cond)
