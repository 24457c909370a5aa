"""StreamDiT distillation (``streamdit_distill``; arXiv 2507.03745, METHODS.md §5): a two-time
student covering each chunk's ``s`` micro-steps in one call. The teacher's buffered flow matching,
the buffer and the staircase are in :mod:`flowdistill.distillers.streamdit`.

**Student** (``streamdit_distill``): a two-time VideoDiT started from the teacher
(``u(x, t, s) = v(x, t)`` at initialisation) covers each chunk's ``s`` micro-steps in one call, so
a pass costs ``N`` calls instead of ``N·s``. For the distilled partition, the state is the buffer
at micro-step ``m = 0`` (chunk ``j`` at ``t_j = g[j·s + s]``) and the target is the teacher's own
``s`` micro-steps from it (``teacher_solver``: Euler or Heun), all chunks at once, to
``s_j = g[j·s]``:

    X_T = Solver_teacher^{s}(X_t),     u* = (X_T − X_t)/(s⃗ − t⃗)  (per frame),
    L   = mean_{f ≥ K} ‖u_θ(X_t, t⃗, s⃗)_f − sg(u*_f)‖².

The regression is in average-velocity units (``‖·‖/|s − t|`` of the state error), so chunks with a
short interval weigh as much as long ones, and at initialisation the residual is the teacher's own
curvature over the interval (small). States (``states``):

* ``"data"`` (default): real clips noised at the staircase levels, ``X_t,f = (1 − t_f)·X_f +
  t_f·E_f``. For an exact teacher this *is* the distribution of the streaming sampler's buffer at
  ``m = 0``: the per-frame path factorises, so ``∂_τ_f p_τ = −∇_f·(p_τ v_f)`` for every frame
  separately and any per-frame schedule (the staircase, the shift, fresh noise entering at
  ``t = 1``) transports the noised-data marginal to itself. It costs ``s`` teacher calls per step
  and no rollout.
* ``"teacher"``: buffers taken from the teacher's own streaming sampler (a pool of ``pool_size``
  streams, advanced one pass every ``pool_refresh`` steps), i.e. the states sampling meets,
  teacher errors included. Costs a rollout; measured worse than data states on the bench (FID 5.24 vs
  4.24, long-stream stability 2.04× vs 1.16×: it inherits the teacher's drift; docs/streamdit.md).

Objective (``objective``):

* ``"multistep"`` (default): the regression above, ``s`` teacher micro-steps per target
  (``2s`` teacher calls with Heun).
* ``"consistency"``: a consistency-distillation target for the same map (the flow-map form of
  LCM / Hyper-SD, METHODS.md §3, here per frame on the staircase). A micro-step ``m ~ U{0..s−1}`` is
  drawn per sample, the state is noised data at the levels of micro-step ``m``, the teacher takes
  *one* micro-step and the target network ``θ⁻`` (:class:`~flowdistill.core.targets.TargetNetwork`)
  covers the rest:

      X_{m+1} = Solver_teacher(X_m),   X_T = X_{m+1} + (s⃗ − t⃗_{m+1})·u_θ⁻(X_{m+1}, t⃗_{m+1}, s⃗),
      L = mean_{f ≥ K} ‖u_θ(X_m, t⃗_m, s⃗)_f − sg((X_T − X_m)_f/(s_f − t_{m,f}))‖²,

  so the student learns every map ``m → s`` of the interval (at ``m = s − 1`` the target is the
  teacher's step alone) at one teacher micro-step per target instead of ``s``. Its error compounds
  through ``θ⁻`` where the multistep target's does not; docs/streamdit.md has the ablation.
  Data states only.

Sampling: :class:`~flowdistill.core.streaming.StreamingSampler` with ``steps_per_call = s``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flowdistill.core.rng import StepRNG
from flowdistill.core.stream_schedule import buffer_levels
from flowdistill.core.targets import TARGET_MODES, TargetNetwork
from flowdistill.distillers.base import register_distiller
from flowdistill.distillers.streamdit import StreamDiT, StreamDiTConfig, check_solver, per_frame_loss
from flowdistill.errors import ConfigError

STATES = ("data", "teacher")
OBJECTIVES = ("multistep", "consistency")


@dataclass
class StreamDiTDistillConfig(StreamDiTConfig):
    """Distillation of one partition's ``s`` micro-steps into one student call."""

    name: str = "streamdit_distill"
    partitions: list[list[int]] = field(default_factory=lambda: [[2, 2]])  # the ONE distilled [c, s]
    states: str = "data"  # data | teacher (see the module docstring)
    pool_size: int = 64  # states="teacher": streams kept in the pool
    pool_refresh: int = 20  # states="teacher": steps between advancing the pool one pass
    teacher_solver: str = "euler"  # the teacher's micro-step solver in the target: euler | heun
    objective: str = "multistep"  # multistep | consistency (see the module docstring)
    target: str = "ema"  # objective=consistency: θ⁻ is the online student or an EMA copy
    target_decay: float = 0.95  # target=ema: θ⁻ ← d·θ⁻ + (1 − d)·θ after each step

    def validate(self) -> None:
        """As the teacher's, plus: exactly one partition; a known state source."""
        super().validate()
        if len(self.partitions) != 1:
            raise ConfigError(f"distiller.partitions of streamdit_distill must hold exactly one [chunk, "
                              f"micro_steps] (the distilled partition), got {list(self.partitions)}")
        if self.states not in STATES:
            raise ConfigError(f"distiller.states must be one of {', '.join(STATES)}, got {self.states!r}")
        if self.pool_size < 1 or self.pool_refresh < 1:
            raise ConfigError("distiller.pool_size and distiller.pool_refresh must be >= 1")
        check_solver("distiller.teacher_solver", self.teacher_solver)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"distiller.objective must be one of {', '.join(OBJECTIVES)}, "
                              f"got {self.objective!r}")
        if self.objective == "consistency" and self.states != "data":
            raise ConfigError("distiller.objective: consistency draws its states from data (states: data), "
                              f"got states: {self.states}")
        if self.target not in TARGET_MODES:
            raise ConfigError(f"distiller.target must be one of {', '.join(TARGET_MODES)}, "
                              f"got {self.target!r}")
        if not 0.0 <= self.target_decay <= 1.0:
            raise ConfigError(f"distiller.target_decay must be in [0, 1], got {self.target_decay}")


@register_distiller("streamdit_distill")
class StreamDiTDistill(StreamDiT):
    """A two-time student covering each chunk's ``s`` micro-steps in one call (module docstring)."""

    Config = StreamDiTDistillConfig
    needs_data = True
    needs_teacher = True
    student_two_time = True

    def __init__(self, cfg: StreamDiTDistillConfig, student: nn.Module, teacher: nn.Module | None = None, *,
                 inference_only: bool = False):
        super().__init__(cfg, student, teacher, inference_only=inference_only)
        scfg = getattr(student, "config", None)
        if scfg is not None and not getattr(scfg, "two_time", True):
            raise ConfigError("streamdit_distill needs a two-time student u(x, t, s) (model two_time=true)")
        self.part = self.parts[0]
        self._pool: Tensor | None = None  # states="teacher": the pool of buffers at m = 0
        #: objective=consistency: θ⁻ (an EMA copy is checkpointed with the distiller)
        self.target = (TargetNetwork(student, cfg.target, cfg.target_decay)
                       if cfg.objective == "consistency" and not inference_only else None)

    def micro_levels(self) -> Tensor:
        """Per-frame levels ``[s + 1, B]`` of one streaming interval: micro-steps ``m = 0..s``
        (``m = s``: chunk ``j`` at ``g[j·s]``, the oldest at 0, ready to emit)."""
        grid = self.grid_of(self.part)
        return torch.stack([buffer_levels(self.part, grid, m) for m in range(self.part.micro + 1)])

    def warmup_segment(self, w: int) -> Tensor:
        """Per-frame levels ``[s + 1, B]`` of the student's warm-up call ``w`` (``0 ≤ w < N``): the
        teacher's warm-up calls ``w·s .. w·s + s`` (a student call covers ``s`` of them)."""
        s = self.part.micro
        return torch.stack([self.warmup_levels(self.part, float(w * s + r)) for r in range(s + 1)])

    def segments(self, b: int, rng: StepRNG) -> Tensor:
        """Level sequences ``[b, s + 1, B]`` of this step's samples: the streaming interval, or for a
        share ``warmup_share`` a uniform warm-up call of the student (global-batch draws, sliced)."""
        n = b * rng.world
        seq = self.micro_levels()[None].repeat(n, 1, 1)
        if self.cfg.warmup_share > 0:
            g = rng.generator()
            warm = torch.rand(n, generator=g) < self.cfg.warmup_share
            which = torch.randint(self.part.chunks, (n,), generator=g)
            for i in warm.nonzero(as_tuple=True)[0].tolist():
                seq[i] = self.warmup_segment(int(which[i]))
        return rng.slice(seq)

    @torch.no_grad()
    def teacher_target(self, x_t: Tensor, levels: Tensor, cond: Tensor | None) -> Tensor:
        """The teacher's ``s`` micro-steps along ``levels [b, s + 1, B]`` (or ``[s + 1, B]``), all
        chunks at once, with ``teacher_solver`` (per frame, ``Δ = t_{m+1} − t_m``):

            euler:  x ← x + Δ·v_T(x, t_m)
            heun:   x' = x + Δ·v_T(x, t_m),   x ← x + Δ·(v_T(x, t_m) + v_T(x', t_{m+1}))/2

        (frames whose level does not change, the references, do not move). Heun is the teacher's
        streaming solver when it is the better sampler (docs/streamdit.md: with Euler the 16-step
        teacher's long streams lose their digits), at two teacher calls per micro-step."""
        b = x_t.shape[0]
        lv = levels.to(x_t.device, x_t.dtype)
        lv = lv[None].expand(b, -1, -1) if lv.ndim == 2 else lv
        x = x_t
        for m in range(lv.shape[1] - 1):
            dt = bcast_frames(lv[:, m + 1] - lv[:, m], x)
            v = self.teacher(x, lv[:, m], cond=cond)
            if self.cfg.teacher_solver == "heun":
                v = (v + self.teacher(x + dt * v, lv[:, m + 1], cond=cond)) / 2
            x = x + dt * v
        return x

    def start_states(self, x: Tensor, t: Tensor, rng: StepRNG) -> Tensor:
        """Real clips noised at the per-frame levels ``t [b, B]`` (``states="data"``)."""
        eps = rng.randn(x.shape[0], *x.shape[1:]).to(x.device, x.dtype)
        tt = bcast_frames(t.to(x.device, x.dtype), x)
        return (1 - tt) * x + tt * eps

    def noised_reference_view(self, x_t: Tensor, seq: Tensor, rng: StepRNG) -> tuple[Tensor, Tensor]:
        """With ``ref_noise > 0`` the streaming sampler shows its clean references at level
        ``r = sampling_ref_noise()`` (:class:`~flowdistill.core.streaming.StreamingSampler`), so the
        student's states and the teacher's micro-steps see them so too: references at level 0 for
        the whole segment become ``(1 − r)·x + r·ε`` at level ``r`` (they do not move, ``s = t``, so
        they carry no loss). One draw per segment, where the sampler draws per call."""
        k, r = self.cfg.ref_frames, self.cfg.sampling_ref_noise()
        if r <= 0 or not k:
            return x_t, seq
        clean = (seq[:, :, :k] == 0).flatten(1).all(dim=1)
        eps = rng.randn(*x_t[:, :k].shape).to(x_t)
        x_t, seq = x_t.clone(), seq.clone()
        x_t[clean, :k] = (1 - r) * x_t[clean, :k] + r * eps[clean]
        seq[clean, :, :k] = r
        return x_t, seq

    def loss(self, batch: dict[str, Tensor], step: int, group: str, rng: StepRNG) -> dict[str, Tensor]:
        """``‖u_θ(X_t, t⃗, s⃗) − (X_T − X_t)/(s⃗ − t⃗)‖²`` on the frames that move (module docstring)."""
        x = batch["x"]
        self._check_clip(x)
        cond = batch.get("cond")
        b = x.shape[0]
        seq = self.segments(b, rng).to(x.device, x.dtype)  # [b, s + 1, B]
        if self.cfg.objective == "consistency":
            return self._consistency_loss(x, seq, cond, rng)
        t, s = seq[:, 0], seq[:, -1]
        if self.cfg.states == "data":
            x_t = self.start_states(x, t, rng)
        else:
            x_t = self._pool_states(x, step, rng)
            seq = self.micro_levels()[None].expand(b, -1, -1).to(x)
        x_t, seq = self.noised_reference_view(x_t, seq, rng)
        t, s = seq[:, 0], seq[:, -1]
        return self._regress(x_t, t, s, self.teacher_target(x_t, seq, cond), cond)

    def _regress(self, x_t: Tensor, t: Tensor, s: Tensor, x_target: Tensor,
                 cond: Tensor | None) -> dict[str, Tensor]:
        """``‖u_θ(X_t, t⃗, s⃗) − sg((X_T − X_t)/(s⃗ − t⃗))‖²`` per frame (both objectives), and the
        state error of one student call against ``X_T`` (``x_err``)."""
        gap = s - t
        safe = torch.where(gap.abs() > 0, gap, torch.ones_like(gap))  # frames that stay: s = t
        u_target = (x_target - x_t) / bcast_frames(safe, x_t)
        u = self.net("student")(x_t, t, s, cond=cond)
        weights = self.frame_weights(t) * (gap != 0)  # a frame that stays (u(x, t, t) = v) is no target
        loss = per_frame_loss(self.premetric, u, u_target, weights)
        with torch.no_grad():
            x_student = x_t + bcast_frames(gap, x_t) * u
            err = per_frame_loss(self.premetric, x_student, x_target, weights)
        return {"loss": loss, "x_err": err}

    def _consistency_loss(self, x: Tensor, seq: Tensor, cond: Tensor | None,
                          rng: StepRNG) -> dict[str, Tensor]:
        """``objective="consistency"``: from micro-step ``m ~ U{0..s−1}`` one teacher micro-step,
        then ``θ⁻`` to the interval's end (module docstring). ``seq [b, s + 1, B]``."""
        b, s_micro = x.shape[0], seq.shape[1] - 1
        m = rng.randint(s_micro, b).to(x.device)
        rows = torch.arange(b, device=x.device)
        t_m, t_next, end = seq[rows, m], seq[rows, m + 1], seq[:, -1]
        x_m = self.start_states(x, t_m, rng)
        levels = torch.stack([t_m, t_next, end], dim=1)  # [b, 3, B]; references: level r throughout
        x_m, levels = self.noised_reference_view(x_m, levels, rng)
        t_m, end = levels[:, 0], levels[:, 2]
        return self._regress(x_m, t_m, end, self.consistency_target(x_m, levels[:, :2], end, cond), cond)

    @torch.no_grad()
    def consistency_target(self, x_m: Tensor, pair: Tensor, end: Tensor, cond: Tensor | None) -> Tensor:
        """``X_T = X_{m+1} + (s⃗ − t⃗_{m+1})·u_θ⁻(X_{m+1}, t⃗_{m+1}, s⃗)`` with ``X_{m+1}`` the teacher's
        micro-step along ``pair [b, 2, B]`` (``= X_{m+1}`` where ``t_{m+1} = s``)."""
        assert self.target is not None, "the consistency target needs a target network (training only)"
        y = self.teacher_target(x_m, pair, cond)
        rest = end - pair[:, 1]
        return y + bcast_frames(rest, y) * self.target(y, pair[:, 1], end, cond=cond)

    def after_step(self, step: int, group: str) -> None:
        """EMA update of ``θ⁻`` after the student's step (``objective="consistency"``, ``target="ema"``)."""
        if self.target is not None and group == "student":
            self.target.update(self.student)

    @torch.no_grad()
    def _pool_states(self, x: Tensor, step: int, rng: StepRNG) -> Tensor:
        """``states="teacher"``: ``len(x)`` buffers drawn from a pool of the teacher's streaming
        buffers at micro-step 0, advanced one pass (``s`` teacher calls and a shift) every
        ``pool_refresh`` steps; started from noised real clips and run ``N`` passes first, so the
        pool holds the teacher's own frames."""
        if self._pool is None:
            g = torch.Generator().manual_seed(int(rng.seed) * 7919 + 17)
            idx = torch.randint(x.shape[0], (self.cfg.pool_size,), generator=g)
            t = bcast_frames(self.micro_levels()[0].expand(self.cfg.pool_size, -1).to(x), x[idx])
            noise = torch.randn(self.cfg.pool_size, *x.shape[1:], generator=g).to(x.device, x.dtype)
            self._pool = (1 - t) * x[idx] + t * noise
            self._pool_gen = g
            for _ in range(self.part.chunks):
                self._advance_pool()
        elif step % self.cfg.pool_refresh == 0:
            self._advance_pool()
        pick = rng.randint(self._pool.shape[0], x.shape[0]).to(self._pool.device)
        return self._pool[pick]

    def _advance_pool(self) -> None:
        """One teacher pass on the pool: ``s`` micro-steps, emit the oldest chunk (it becomes
        reference), shift, fresh noise at ``t = 1`` enters."""
        pool = self._pool
        assert pool is not None
        x = self.teacher_target(pool, self.micro_levels(), None)
        c = self.part.chunk
        new = torch.randn(pool.shape[0], c, *pool.shape[2:], generator=self._pool_gen).to(pool)
        # chunk 0 reached t = 0: the last K clean frames (old refs + chunk 0) are frames [c, K + c);
        # chunks 1..N−1 now sit where chunks 0..N−2 start a pass; c fresh noise frames enter at t = 1
        self._pool = torch.cat([x[:, c:], new], dim=1)

    def _sample(self, noise: Tensor, nfe: int, cond: Tensor | None, model: nn.Module) -> Tensor:
        """Stream ``noise.shape[1]`` frames, ``N`` student calls per pass."""
        return self._stream_sample(noise, model)


def bcast_frames(v: Tensor, like: Tensor) -> Tensor:
    """``[B, F]`` per-frame values broadcast over ``[B, F, C, H, W]``."""
    return v.reshape(*v.shape[:2], *([1] * (like.ndim - 2)))


__all__ = ["StreamDiTDistill", "StreamDiTDistillConfig", "bcast_frames"]
