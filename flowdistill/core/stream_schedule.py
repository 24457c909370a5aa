"""Per-frame noise levels of a streaming buffer (StreamDiT, arXiv 2507.03745; METHODS.md §5).

A buffer of ``B = K + N·c`` frames, ordered oldest → newest: ``K`` clean reference frames, then
``N`` chunks of ``c`` frames (chunk ``j = 0`` is the oldest, the next to be emitted). Each chunk
takes ``s`` micro-steps (model calls) to move down one chunk's worth of levels. Levels live on
**indices** of the teacher's ``N·s``-step grid, ascending from ``t = 0``:
``g_0 = 0 < g_1 < … < g_{N·s} = 1`` (:func:`partition_grid`, optionally SD3-shifted).

Staircase (the project's convention note; METHODS.md §5 writes ``(N−1−j)·s + m``, which would put
the oldest chunk at the noisiest level — that is the index counted from ``t = 1``): after ``m``
micro-steps since the last shift (``m = 0 … s``), chunk ``j`` sits at grid index

    i_j(m) = j·s + (s − m),       level t_j(m) = g[i_j(m)],

so the oldest chunk occupies indices ``s … 1`` during a cycle and reaches ``g_0 = 0`` at ``m = s``,
when it is emitted, the buffer shifts by ``c`` frames and fresh noise enters as chunk ``N − 1`` at
index ``N·s`` (``t = 1``). Reference frames sit at ``t = 0``. Every frame thus walks the whole
teacher grid ``N·s → 0``, one index per micro-step.

Limiting cases: ``K = 0, N = 1, c = B`` is ordinary full-sequence flow matching (every frame at one
level); ``c = 1, s = 1`` is the diagonal (FIFO-Diffusion / Rolling-Diffusion) scheme, frame ``j``
at ``g[j + 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flowdistill.core.timesteps import shift_time
from flowdistill.errors import ConfigError


@dataclass(frozen=True)
class Partition:
    """Buffer partition: ``ref`` (K) clean reference frames + ``chunks`` (N) chunks of ``chunk`` (c)
    frames, ``micro`` (s) micro-steps per chunk. ``buffer = K + N·c``; the teacher grid has ``N·s``
    steps."""

    ref: int
    chunks: int
    chunk: int
    micro: int

    def __post_init__(self) -> None:
        for key, low in (("ref", 0), ("chunks", 1), ("chunk", 1), ("micro", 1)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"partition.{key} must be an integer >= {low}, got {v!r}")

    @property
    def buffer(self) -> int:
        """Frames in the buffer, ``K + N·c``."""
        return self.ref + self.chunks * self.chunk

    @property
    def steps(self) -> int:
        """Teacher grid steps ``N·s`` (= micro-steps a frame spends in the buffer)."""
        return self.chunks * self.micro

    @classmethod
    def from_buffer(cls, buffer: int, *, ref: int, chunk: int, micro: int) -> Partition:
        """The partition of a ``buffer``-frame buffer into ``ref`` + chunks of ``chunk`` frames;
        ConfigError unless ``chunk`` divides ``buffer − ref``."""
        if not isinstance(buffer, int) or buffer < 1:
            raise ConfigError(f"partition.buffer must be a positive integer, got {buffer!r}")
        if not isinstance(chunk, int) or chunk < 1 or not isinstance(ref, int) or not 0 <= ref < buffer:
            raise ConfigError(f"partition.chunk must be >= 1 and partition.ref in [0, {buffer}), "
                              f"got chunk={chunk!r}, ref={ref!r}")
        if (buffer - ref) % chunk:
            raise ConfigError(f"partition.chunk {chunk} does not divide the buffer's {buffer - ref} "
                              f"non-reference frames (buffer {buffer} − ref {ref})")
        return cls(ref=ref, chunks=(buffer - ref) // chunk, chunk=chunk, micro=micro)


def partition_grid(partition: Partition, shift: float = 1.0, dtype=torch.float32) -> Tensor:
    """Teacher grid ``g [N·s + 1]`` ascending from 0 to 1: ``g_i = shift(i/(N·s))`` with the SD3 shift
    ``k·u / (1 + (k − 1)·u)`` (:func:`~flowdistill.core.timesteps.shift_time`; ``shift = 1`` is
    uniform, ``> 1`` puts more steps near ``t = 1``)."""
    if not shift > 0:
        raise ConfigError(f"grid shift must be positive, got {shift!r}")
    u = torch.linspace(0.0, 1.0, partition.steps + 1, dtype=torch.float64)
    g = shift_time(u, float(shift))
    g[0], g[-1] = 0.0, 1.0
    return g.to(dtype)


def _check_grid(partition: Partition, grid: Tensor) -> None:
    if grid.ndim != 1 or grid.numel() != partition.steps + 1:
        raise ConfigError(f"grid must have N·s + 1 = {partition.steps + 1} points for {partition}, "
                          f"got shape {list(grid.shape)}")


def buffer_indices(partition: Partition, micro_step: int | Tensor) -> Tensor:
    """Per-frame grid indices ``[B]`` (or ``[batch, B]`` for a ``[batch]`` tensor ``micro_step``):
    0 for the ``K`` reference frames, ``j·s + (s − m)`` for the ``c`` frames of chunk ``j``."""
    k, n, c, s = partition.ref, partition.chunks, partition.chunk, partition.micro
    m = torch.as_tensor(micro_step)
    if m.is_floating_point() or bool(((m < 0) | (m > s)).any()):
        raise ConfigError(f"micro_step must be an integer in [0, s = {s}], got {micro_step!r}")
    j = torch.arange(n, device=m.device).repeat_interleave(c)  # chunk of each non-reference frame
    idx = j * s + s - m.long()[..., None]
    ref = torch.zeros(*m.shape, k, dtype=torch.long, device=m.device)
    return torch.cat([ref, idx], dim=-1)


def buffer_levels(partition: Partition, grid: Tensor, micro_step: int | Tensor) -> Tensor:
    """Per-frame levels ``t [B]`` (``[batch, B]`` for a tensor ``micro_step [batch]``) of the buffer
    after ``m`` micro-steps since the last shift: reference frames ``g_0 = 0``; chunk ``j`` (0 =
    oldest) at ``g[j·s + (s − m)]``, ``0 ≤ m ≤ s`` (``m = s``: the oldest chunk is clean, ready to
    emit). ``grid`` ascending, ``N·s + 1`` points (:func:`partition_grid`)."""
    _check_grid(partition, grid)
    idx = buffer_indices(partition, micro_step)
    return grid.to(idx.device)[idx]


def levels_at(grid: Tensor, index: Tensor) -> Tensor:
    """Levels at fractional grid indices: linear interpolation between ``g[⌊i⌋]`` and ``g[⌈i⌉]``
    (exactly the grid point at an integer index)."""
    index = index.to(grid.device).clamp(0, grid.numel() - 1)
    lo = index.floor().long().clamp(max=grid.numel() - 2)
    frac = (index - lo).to(grid.dtype)
    return grid[lo] + frac * (grid[lo + 1] - grid[lo])


def sample_training_levels(partitions: Sequence[Partition], weights: Sequence[float] | None, batch: int,
                           grid_shift: float = 1.0, generator: torch.Generator | None = None,
                           jitter: bool = True, device="cpu") -> tuple[Tensor, Tensor]:
    """Training levels for a batch of buffers mixing partition schemes (StreamDiT's mixed training).

    Per sample: a partition ``p ~ weights`` (all partitions must have the same buffer size), a
    micro-step ``m ~ U{0, …, s_p − 1}`` and, with ``jitter``, one ``u ~ U[0, 1)`` shared by the
    buffer; chunk frames get ``t = g[i − 1] + (1 − u)·(g[i] − g[i − 1])`` with ``i = j·s + (s − m)``
    their staircase index, i.e. a point inside the interval the frame crosses during that micro-step
    (``u = 0`` is the staircase itself). Sharing ``u`` keeps the buffer on the continuous-time
    trajectory of the stream (every chunk is the same fraction of the way through its micro-step);
    over ``m`` and ``u`` the chunk levels cover ``(0, 1]``. Reference frames stay at 0.
    Returns ``(levels [batch, B], partition_id [batch])`` (float32, long).
    """
    if not partitions:
        raise ConfigError("streamdit partitions must list at least one partition")
    sizes = {p.buffer for p in partitions}
    if len(sizes) != 1:
        raise ConfigError(f"all partitions must have the same buffer size, got {sorted(sizes)}")
    w = torch.as_tensor([1.0] * len(partitions) if weights is None else list(weights))
    if w.numel() != len(partitions) or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ConfigError(f"partition weights must be {len(partitions)} non-negative numbers with a "
                          f"positive sum, got {weights!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be a positive integer, got {batch!r}")
    pid = torch.multinomial(w.float(), batch, replacement=True, generator=generator)
    u = torch.rand(batch, generator=generator) if jitter else torch.zeros(batch)
    m_unit = torch.rand(batch, generator=generator)
    levels = torch.empty(batch, sizes.pop())
    for k, part in enumerate(partitions):
        sel = pid == k
        if not bool(sel.any()):
            continue
        grid = partition_grid(part, grid_shift, dtype=torch.float64)
        m = (m_unit[sel] * part.micro).long().clamp(max=part.micro - 1)
        idx = buffer_indices(part, m)  # [b_k, B]
        lower = (idx - 1).clamp(min=0)
        frac = (1 - u[sel])[:, None].double()
        t = grid[lower] + frac * (grid[idx] - grid[lower])
        t[:, : part.ref] = 0.0
        levels[sel] = t.float()
    return levels.to(device), pid.to(device)


WARMUPS = ("clamp", "stretch")


def warmup_indices(partition: Partition, step: int, steps_per_call: int = 1, mode: str = "clamp",
                   generated_refs: bool = True) -> Tensor:
    """Per-frame (fractional) grid indices ``[B]`` after ``step`` warm-up calls that fill the first
    buffer from pure noise, ``0 ≤ step ≤ W = N·s / steps_per_call``.

    Every generated frame starts at index ``N·s`` (``t = 1``) and ends at its staircase index
    ``i_f`` = :func:`buffer_indices` ``(partition, 0)`` (0 for reference frames). ``mode``:

    * ``"clamp"`` (default): ``idx_f(w) = max(i_f, N·s − w·k)`` — all frames walk down the teacher
      grid together, ``k`` indices per call, each stopping when it reaches its staircase level. Every
      frame, warm-up ones included, is then integrated along exactly the teacher grid, and a
      ``k = s`` student's jumps end on grid points (so its distillation target is the same s-step
      teacher result as in streaming);
    * ``"stretch"``: ``idx_f(w) = N·s − (N·s − i_f)·w / W`` — every frame moves at its own constant
      index speed and all reach the staircase at the last call (levels between grid points are
      interpolated, :func:`levels_at`).

    Reference frames given as context (``generated_refs=False``) stay at index 0.
    """
    k = steps_per_call
    if mode not in WARMUPS:
        raise ConfigError(f"warmup must be one of {WARMUPS}, got {mode!r}")
    if not isinstance(k, int) or k < 1 or partition.micro % k:
        raise ConfigError(f"steps_per_call must divide partition.micro = {partition.micro}, got {k!r}")
    total = partition.steps // k
    if not 0 <= step <= total:
        raise ConfigError(f"warm-up step must lie in [0, {total}], got {step!r}")
    target = buffer_indices(partition, 0).double()
    top = float(partition.steps)
    if mode == "clamp":
        idx = target.clamp(min=top - step * k)
    else:
        idx = top - (top - target) * (step / total)
    if not generated_refs:
        idx[: partition.ref] = 0.0
    return idx
