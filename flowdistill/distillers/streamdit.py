"""StreamDiT: buffered flow matching over a moving window of frames and its distillation
(arXiv 2507.03745, METHODS.md §5), in the project's convention (``t`` = noise level, generation
``1 → 0``, ``X(x, t, s) = x + (s − t)·u(x, t, s)``, clips ``[B, F, C, H, W]``, per-frame times
``[B, F]``).

**Buffer.** ``B = K + N·c`` frames: ``K`` clean reference frames (the most recently emitted, at
``t = 0``), then ``N`` chunks of ``c`` frames, oldest first. Levels live on the indices of the
teacher's ``N·s``-step grid ``0 = g_0 < … < g_{N·s} = 1`` (optionally shifted,
``grid_shift``): at micro-step ``m = 0..s−1`` chunk ``j`` (``0`` = oldest, nearest output, least
noisy) sits at ``g[j·s + (s − m)]``; after ``s`` calls chunk 0 reaches ``g_0 = 0`` and is
emitted. (METHODS.md writes ``(N−1−j)·s + m``, which counts from ``t = 1``; see
docs/streamdit.md, "Chunk indexing".) The schedule itself — partitions, grids, per-frame levels,
their training distribution — is :mod:`flowdistill.core.stream_schedule`; the streaming sampler
is :mod:`flowdistill.core.streaming`. This file holds the teacher's loss;
the distillation is :mod:`flowdistill.distillers.streamdit_distill`.

**Teacher** (``streamdit``): buffered flow matching. Per frame ``f`` with level ``t_f``,

    X_t,f = (1 − t_f)·X_f + t_f·E_f,    L = mean_{f ≥ K} ‖v_θ(X_t, t⃗)_f − (E_f − X_f)‖²,

with ``t⃗`` drawn by :func:`~flowdistill.core.stream_schedule.sample_training_levels` from the
config's partition mix (``partitions: [[c, s], ...]``, ``partition_weights``), jittered within
each frame's micro-step interval so training covers continuous ``t`` between grid points.
Reference frames enter clean (``t = 0``, ``E`` unused) and are left out of the loss
(``ref_loss_weight = 0``): their target at ``t = 0`` is ``E − X`` with ``E`` pure noise the net
cannot predict from a clean frame, so the term would only teach the net to output the mean
noise, ``0``, and never matters to sampling, where ``t = 0`` frames are never moved.
The limiting cases are partitions: one chunk ``[B − K, s]`` (all non-reference frames at one
level: ordinary full-sequence flow matching, conditioned on ``K`` clean frames),
``[1, 1]`` (diagonal / rolling diffusion), one partition, or a mix (the default).

The student (``streamdit_distill``) is :mod:`flowdistill.distillers.streamdit_distill`.

Sampling (both): :class:`~flowdistill.core.streaming.StreamingSampler` on the sampling partition
(``sample_partition``; the teacher advances one grid index per call, the student ``s``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flowdistill.core.losses import premetric
from flowdistill.core.rng import StepRNG
from flowdistill.core.stream_schedule import (
    Partition,
    levels_at,
    partition_grid,
    sample_training_levels,
    warmup_indices,
)
from flowdistill.core.streaming import SOLVERS, StreamingSampler
from flowdistill.distillers.base import Distiller, DistillerConfig, check_names, register_distiller
from flowdistill.errors import ConfigError


def _default_partitions() -> list[list[int]]:
    return [[2, 2], [1, 1], [4, 4], [8, 1]]


@dataclass
class StreamDiTConfig(DistillerConfig):
    """Buffered flow matching (the teacher); see the module docstring for the maths."""

    name: str = "streamdit"
    buffer_frames: int = 10  # B = ref_frames + N·c; data.params.frames must equal it
    ref_frames: int = 2  # K clean reference frames at t = 0
    partitions: list[list[int]] = field(default_factory=_default_partitions)  # [c, s] each
    partition_weights: list[float] = field(default_factory=list)  # empty: uniform
    grid_shift: float = 1.0  # shift of the teacher's N·s-step grid (1 = uniform)
    jitter: bool = True  # levels uniform within each frame's micro-step interval
    ref_loss_weight: float = 0.0  # weight of the reference frames' loss at t = 0 (0: excluded)
    warmup_share: float = 0.15  # share of the batch at the sampler's warm-up levels (cold start)
    ref_noise: float = 0.0  # train: clean references noised to r ~ U(0, ref_noise) (0: off)
    ref_noise_sample: float = -1.0  # stream: references seen at this level (negative: ref_noise / 2)
    ref_recycle: float = 0.0  # train: references replaced by the net's own x̂ from level r ~ U(0, this)
    ref_recycle_share: float = 0.5  # share of the buffers with clean references that are recycled
    loss: str = "l2"
    sample_solver: str = "euler"  # the streaming sampler's solver for a velocity model: euler | heun
    sample_partition: list[int] = field(default_factory=list)  # [c, s] streamed; empty: the first

    def validate(self) -> None:
        """Partitions must tile the buffer; every value in range; each error names its key."""
        check_names(loss=self.loss)
        if self.ref_frames < 0 or self.buffer_frames <= self.ref_frames:
            raise ConfigError(f"distiller.buffer_frames ({self.buffer_frames}) must exceed "
                              f"distiller.ref_frames ({self.ref_frames}) >= 0")
        if not self.partitions:
            raise ConfigError("distiller.partitions must list at least one [chunk, micro_steps] pair")
        for p in self.partitions:
            self._check_pair(list(p), "distiller.partitions")
        if self.partition_weights and (len(self.partition_weights) != len(self.partitions)
                                       or any(w < 0 for w in self.partition_weights)
                                       or not sum(self.partition_weights) > 0):
            raise ConfigError(f"distiller.partition_weights must be {len(self.partitions)} non-negative "
                              f"numbers with a positive sum (one per partition), got "
                              f"{list(self.partition_weights)}")
        if not self.grid_shift > 0:
            raise ConfigError(f"distiller.grid_shift must be positive, got {self.grid_shift}")
        if self.ref_loss_weight < 0:
            raise ConfigError(f"distiller.ref_loss_weight must be >= 0, got {self.ref_loss_weight}")
        if not 0.0 <= self.ref_noise < 1.0 or self.ref_noise_sample >= 1.0:
            raise ConfigError(f"distiller.ref_noise must be in [0, 1) and distiller.ref_noise_sample < 1, "
                              f"got {self.ref_noise}, {self.ref_noise_sample}")
        check_solver("distiller.sample_solver", self.sample_solver)
        if not 0.0 <= self.ref_recycle < 1.0 or not 0.0 <= self.ref_recycle_share <= 1.0:
            raise ConfigError(f"distiller.ref_recycle must be in [0, 1) and distiller.ref_recycle_share in "
                              f"[0, 1], got {self.ref_recycle}, {self.ref_recycle_share}")
        if not 0.0 <= self.warmup_share <= 1.0:
            raise ConfigError(f"distiller.warmup_share must be in [0, 1], got {self.warmup_share}")
        if self.sample_partition:
            self._check_pair(list(self.sample_partition), "distiller.sample_partition")

    def _check_pair(self, pair: list[int], key: str) -> None:
        """``[c, s]`` with ``c`` dividing ``B − K`` and ``s >= 1``."""
        free = self.buffer_frames - self.ref_frames
        if len(pair) != 2 or int(pair[0]) < 1 or int(pair[1]) < 1 or free % int(pair[0]):
            raise ConfigError(f"{key}: {pair} must be [chunk, micro_steps], both >= 1, with chunk dividing "
                              f"buffer_frames - ref_frames = {free}")

    def partition(self, pair: list[int]) -> Partition:
        """The :class:`Partition` of ``[c, s]`` in this buffer (``N = (B − K)/c``)."""
        c, s = int(pair[0]), int(pair[1])
        return Partition(ref=self.ref_frames, chunks=(self.buffer_frames - self.ref_frames) // c, chunk=c,
                         micro=s)

    def partition_list(self) -> list[Partition]:
        """Every training partition."""
        return [self.partition(p) for p in self.partitions]

    def sampling_ref_noise(self) -> float:
        """The level the streaming sampler shows the reference frames at (``ref_noise_sample``;
        negative: half the training maximum ``ref_noise``)."""
        return self.ref_noise / 2 if self.ref_noise_sample < 0 else float(self.ref_noise_sample)

    def sampling_partition(self) -> Partition:
        """The partition the sampler streams with (``sample_partition``, else the first)."""
        return self.partition(list(self.sample_partition) or list(self.partitions[0]))


def check_solver(key: str, name: str) -> None:
    """``name`` must be one of the streaming sampler's solvers (``euler``, ``heun``)."""
    if name not in SOLVERS:
        raise ConfigError(f"{key} must be one of {', '.join(SOLVERS)}, got {name!r}")


def per_frame_loss(metric, pred: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """``Σ_f w_f·d(pred_f, target_f) / Σ_f w_f`` over the batch: the premetric ``d`` applied frame
    by frame (``pred, target [B, F, ...]``, ``weights [B, F]``), averaged with the frame weights."""
    b, f = pred.shape[:2]
    d = metric(pred.reshape(b * f, *pred.shape[2:]), target.reshape(b * f, *target.shape[2:])).reshape(b, f)
    return (d * weights).sum() / weights.sum().clamp_min(1e-12)


class _StreamingMixin:
    """Streaming for both distillers: the sampler on the sampling partition."""

    cfg: StreamDiTConfig
    student_two_time: bool

    def grid_of(self, part: Partition) -> Tensor:
        """The (shifted) ``N·s``-step grid of ``part``, ascending from 0."""
        return partition_grid(part, shift=self.cfg.grid_shift)

    def sampler(self, model: nn.Module, part: Partition | None = None,
                teacher_steps: bool = False, solver: str | None = None) -> StreamingSampler:
        """A :class:`StreamingSampler` for ``model`` on ``part`` (default the sampling partition).

        A two-time student covers a chunk's ``s`` micro-steps in one call (``steps_per_call = s``)
        unless ``teacher_steps``: then it steps grid index by grid index (``N·s`` calls a pass),
        jumping ``g_{i+1} → g_i`` each call. A velocity model (the teacher) steps with ``solver``
        (default ``sample_solver``; Heun: two evaluations a call)."""
        part = part or self.cfg.sampling_partition()
        two_time = bool(self.student_two_time)
        steps = part.micro if two_time and not teacher_steps else 1
        return StreamingSampler(model, part, grid=self.grid_of(part), steps_per_call=steps, two_time=two_time,
                                solver="euler" if two_time else (solver or self.cfg.sample_solver),
                                ref_noise=self.cfg.sampling_ref_noise())

    def streaming_partition(self, pair: list[int] | tuple[int, int] | None = None) -> Partition:
        """The partition ``[c, s]`` of this buffer (checked: ``c`` divides ``B − K``), default the
        sampling partition. Any partition may be streamed; one outside the training mix is out of
        the distribution the net learned (a distilled student: only its own ``c``, any ``s``
        only with ``teacher_steps``)."""
        if pair is None:
            return self.cfg.sampling_partition()
        self.cfg._check_pair(list(pair), "the streamed partition")
        return self.cfg.partition(list(pair))

    @torch.no_grad()
    def stream(self, n: int, num_frames: int, generator: torch.Generator, model: nn.Module | None = None,
               teacher_steps: bool = False, callback=None,
               partition: list[int] | tuple[int, int] | None = None,
               solver: str | None = None) -> tuple[Tensor, StreamingSampler]:
        """Stream ``num_frames`` frames for ``n`` independent clips (on ``partition`` ``[c, s]``,
        default the sampling partition; a teacher with ``solver``, default ``sample_solver``);
        returns the clips ``[n, num_frames, C, H, W]`` and the sampler (its ``nfe`` /
        ``frames_emitted`` counters)."""
        net = model if model is not None else self.student  # type: ignore[attr-defined]
        smp = self.sampler(net, self.streaming_partition(partition), teacher_steps=teacher_steps,
                           solver=solver)
        return smp.stream(n, num_frames, generator, callback=callback), smp

    def _stream_sample(self, noise: Tensor, model: nn.Module) -> Tensor:
        """:meth:`Distiller.sample` for video: stream ``F = noise.shape[1]`` frames per clip. The
        sampler draws its own noise frame by frame; ``noise`` fixes the seed (from its bits), so
        the same noise gives the same clips."""
        seed = int(noise.flatten()[:16].double().mul(1e6).round().abs().sum().item()) % (2**31 - 1)
        g = torch.Generator().manual_seed(seed)
        smp = self.sampler(model)
        return smp.stream(noise.shape[0], noise.shape[1], g).to(noise.device, noise.dtype)


@register_distiller("streamdit")
class StreamDiT(_StreamingMixin, Distiller):
    """Buffered flow matching over per-frame noise levels (trains the streaming teacher)."""

    Config = StreamDiTConfig
    needs_data = True
    needs_teacher = False
    sample_options = {}
    eval_nfe = (1,)

    def __init__(self, cfg: StreamDiTConfig, student: nn.Module, teacher: nn.Module | None = None, *,
                 inference_only: bool = False):
        super().__init__(cfg, student, teacher, inference_only=inference_only)
        self.premetric = premetric(cfg.loss)
        self.parts = cfg.partition_list()
        self.weights = list(cfg.partition_weights) or [1.0] * len(self.parts)

    def _check_clip(self, x: Tensor) -> None:
        """A clip of ``buffer_frames`` frames ``[B, F, C, H, W]``."""
        if x.ndim != 5 or x.shape[1] != self.cfg.buffer_frames:
            k = self.cfg.buffer_frames
            raise ConfigError(f"streamdit trains on clips [B, distiller.buffer_frames={k}, C, H, W]; got "
                              f"{list(x.shape)} (set data.params.frames={k})")

    def frame_weights(self, t: Tensor) -> Tensor:
        """Loss weight per frame ``[B, F]`` from the levels ``t``: 1, except ``ref_loss_weight`` on
        reference frames at ``t = 0`` (a reference frame above 0 is being generated: warm-up)."""
        w = torch.ones_like(t)
        k = self.cfg.ref_frames
        w[:, :k] = torch.where(t[:, :k] > 0, w[:, :k], torch.full_like(t[:, :k], self.cfg.ref_loss_weight))
        return w

    def warmup_levels(self, part: Partition, step: float, steps_per_call: int = 1) -> Tensor:
        """Levels ``[B]`` after ``step`` (fractional: between calls) warm-up calls of the sampler
        without context (``"clamp"``: every frame, the generated references included, walks down
        the grid from ``t = 1``, ``steps_per_call`` indices a call, and stops at its staircase
        level; :func:`~flowdistill.core.stream_schedule.warmup_indices`)."""
        grid = self.grid_of(part).double()
        lo = int(step)
        i0 = warmup_indices(part, lo, steps_per_call, "clamp", True)
        if step > lo:
            i1 = warmup_indices(part, lo + 1, steps_per_call, "clamp", True)
            i0 = i0 + (step - lo) * (i1 - i0)
        return levels_at(grid, i0).float()

    def training_levels(self, b: int, rng: StepRNG) -> tuple[Tensor, Tensor]:
        """Per-frame levels ``[b, B]`` and partition ids ``[b]`` of this step (global-batch draws,
        sliced to this process): the staircase of the partition mix
        (:func:`~flowdistill.core.stream_schedule.sample_training_levels`), and for a share
        ``warmup_share`` the levels of the sampler's warm-up from pure noise (a uniform warm-up
        call, jittered between calls), so a stream can start without context."""
        n = b * rng.world
        levels, pid = sample_training_levels(self.parts, self.weights, n, self.cfg.grid_shift,
                                             rng.generator(), jitter=self.cfg.jitter)
        if self.cfg.warmup_share > 0:
            g = rng.generator()
            warm = torch.rand(n, generator=g) < self.cfg.warmup_share
            pos = torch.rand(n, generator=g)
            for i in warm.nonzero(as_tuple=True)[0].tolist():
                part = self.parts[int(pid[i])]
                w = float(pos[i]) * part.steps  # warm-up call w in [0, N·s), fraction = jitter
                levels[i] = self.warmup_levels(part, w if self.cfg.jitter else float(int(w)))
        return rng.slice(levels), rng.slice(pid)

    def noise_references(self, t: Tensor, rng: StepRNG) -> Tensor:
        """Context noise augmentation (``ref_noise > 0``): buffers whose reference frames are clean
        get them at one level ``r ~ U(0, ref_noise)`` per buffer (global-batch draw, sliced), so the
        net learns not to copy its references' small errors — in a stream the references are its
        own outputs, and copying them compounds (measured: without it 3 of 4 streams of the mixed
        teacher fade to empty frames within 128 frames, docs/streamdit.md). Their loss weight stays
        ``ref_loss_weight`` (from the levels before noising). GameNGen (arXiv 2408.14837) §3.2.1."""
        k = self.cfg.ref_frames
        if self.cfg.ref_noise <= 0 or not k:
            return t
        r = rng.rand(t.shape[0]) * self.cfg.ref_noise
        clean = (t[:, :k] == 0).all(dim=1)
        t = t.clone()
        t[:, :k] = torch.where(clean[:, None], r.to(t)[:, None].expand(-1, k), t[:, :k])
        return t

    def recycle_references(self, x: Tensor, t: Tensor, rng: StepRNG, cond: Tensor | None = None) -> Tensor:
        """Error recycling (``ref_recycle > 0``): in a share ``ref_recycle_share`` of the buffers whose
        references are clean, replace the ``K`` references by the net's own reconstruction

            x̂_ref = x̃ − r·v_θ(x̃, r)_ref,   x̃_ref = (1 − r)·X_ref + r·ε,   r ~ U(0, ref_recycle),

        (no gradient; the other frames enter as pure noise at ``t = 1``, so the reconstruction sees
        only the references), and keep the *true* continuation as the target. In a stream the
        references are the net's own outputs — blurred, reshaped digits — and a net trained only on
        true references copies those errors, which compound until the digits vanish (measured,
        docs/streamdit.md). Trained this way the net maps its own kind of error back to a sharp
        continuation. Same idea as Stable Video Infinity's error-recycling fine-tuning
        (arXiv 2510.09212), with a one-call reconstruction as the error source."""
        k = self.cfg.ref_frames
        if self.cfg.ref_recycle <= 0 or not k:
            return x
        b = x.shape[0]
        r = (rng.rand(b) * self.cfg.ref_recycle).to(x)
        use = (rng.rand(b) < self.cfg.ref_recycle_share).to(x.device) & (t[:, :k] == 0).all(dim=1)
        eps = rng.randn(b, *x.shape[1:]).to(x)
        rr = r[:, None, None, None, None]
        x_in = torch.cat([(1 - rr) * x[:, :k] + rr * eps[:, :k], eps[:, k:]], dim=1)
        t_in = torch.ones_like(t)
        t_in[:, :k] = r[:, None]
        with torch.no_grad():
            v = self.net("student")(x_in, t_in, cond=cond)
        x_hat = x_in[:, :k] - rr * v[:, :k]
        x = x.clone()
        x[:, :k] = torch.where(use[:, None, None, None, None], x_hat, x[:, :k])
        return x

    def loss(self, batch: dict[str, Tensor], step: int, group: str, rng: StepRNG) -> dict[str, Tensor]:
        """Per-frame flow matching at the staircase levels (module docstring)."""
        x = batch["x"]
        self._check_clip(x)
        b = x.shape[0]
        t, pid = self.training_levels(b, rng)
        t = t.to(x.device, x.dtype)
        x = self.recycle_references(x, t, rng, batch.get("cond"))
        weights = self.frame_weights(t)
        t = self.noise_references(t, rng)
        eps = rng.randn(b, *x.shape[1:]).to(x.device, x.dtype)
        tt = t[:, :, None, None, None]
        x_t = (1 - tt) * x + tt * eps
        v = self.net("student")(x_t, t, cond=batch.get("cond"))
        loss = per_frame_loss(self.premetric, v, eps - x, weights)
        out = {"loss": loss}
        for i, part in enumerate(self.parts):  # logged per partition (no gradient)
            sel = pid == i
            if bool(sel.any()) and len(self.parts) > 1:
                with torch.no_grad():
                    out[f"loss_c{part.chunk}s{part.micro}"] = per_frame_loss(
                        self.premetric, v[sel], (eps - x)[sel], weights[sel])
        return out

    def _sample(self, noise: Tensor, nfe: int, cond: Tensor | None, model: nn.Module) -> Tensor:
        """Stream ``noise.shape[1]`` frames with the sampling partition (``nfe`` is fixed by the
        partition: ``N·s`` calls per pass for the teacher, ``N`` for the student)."""
        return self._stream_sample(noise, model)


__all__ = ["StreamDiT", "StreamDiTConfig", "check_solver", "per_frame_loss"]
