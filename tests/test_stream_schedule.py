"""Streaming buffer schedule: staircase formula by hand, limiting cases, training levels."""

from __future__ import annotations

import pytest
import torch

from flowdistill.core.stream_schedule import (
    Partition,
    buffer_indices,
    buffer_levels,
    levels_at,
    partition_grid,
    sample_training_levels,
)
from flowdistill.errors import ConfigError


def test_formula_by_hand():
    """K = 1, N = 3, c = 2, s = 2: grid 0, 1/6, …, 1; chunk j at index 2j + 2 − m."""
    p = Partition(ref=1, chunks=3, chunk=2, micro=2)
    assert p.buffer == 7 and p.steps == 6
    g = partition_grid(p)
    torch.testing.assert_close(g, torch.arange(7) / 6.0)
    assert buffer_indices(p, 0).tolist() == [0, 2, 2, 4, 4, 6, 6]  # newest chunk at t = 1
    assert buffer_indices(p, 1).tolist() == [0, 1, 1, 3, 3, 5, 5]
    assert buffer_indices(p, 2).tolist() == [0, 0, 0, 2, 2, 4, 4]  # oldest clean: emit, shift
    torch.testing.assert_close(buffer_levels(p, g, 1), torch.tensor([0, 1, 1, 3, 3, 5, 5]) / 6.0)
    # batched micro-steps give one row per sample
    assert buffer_indices(p, torch.tensor([0, 2])).tolist() == [[0, 2, 2, 4, 4, 6, 6], [0, 0, 0, 2, 2, 4, 4]]


def test_shift_then_next_cycle_continues_each_frame_one_index_per_step():
    """After the shift (drop chunk 0, fresh chunk at the end) the levels at m = 0 equal the old
    chunks' levels at m = s: every frame walks N·s → 0 one index per micro-step, no jumps."""
    p = Partition(ref=0, chunks=4, chunk=3, micro=3)
    end = buffer_indices(p, p.micro)
    start = buffer_indices(p, 0)
    torch.testing.assert_close(start[: -p.chunk], end[p.chunk:])
    assert start[-p.chunk:].tolist() == [p.steps] * p.chunk


def test_shifted_grid():
    p = Partition(ref=0, chunks=2, chunk=1, micro=2)
    g = partition_grid(p, shift=3.0)
    u = torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    torch.testing.assert_close(g, (3 * u / (1 + 2 * u)).float())  # SD3 shift by hand
    assert g[0] == 0 and g[-1] == 1 and bool((g[1:] > g[:-1]).all())


def test_limiting_cases_and_monotone_staircase():
    full = Partition(ref=0, chunks=1, chunk=8, micro=10)  # ordinary full-sequence FM
    g = partition_grid(full)
    for m in range(10):
        lv = buffer_levels(full, g, m)
        assert bool((lv == lv[0]).all()) and abs(float(lv[0]) - (10 - m) / 10) < 1e-6
    diag = Partition(ref=0, chunks=8, chunk=1, micro=1)  # diagonal / rolling
    torch.testing.assert_close(buffer_levels(diag, partition_grid(diag), 0), torch.arange(1, 9) / 8.0)
    p = Partition(ref=2, chunks=3, chunk=2, micro=4)
    g = partition_grid(p, shift=2.0)
    for m in range(p.micro + 1):
        lv = buffer_levels(p, g, m)
        assert bool((lv[1:] >= lv[:-1]).all())  # oldest (first) frames least noisy
        assert bool((lv[:2] == 0).all())


def test_validation_errors():
    with pytest.raises(ConfigError, match="partition.micro"):
        Partition(ref=0, chunks=2, chunk=2, micro=0)
    with pytest.raises(ConfigError, match="does not divide"):
        Partition.from_buffer(10, ref=1, chunk=2, micro=2)
    assert Partition.from_buffer(9, ref=1, chunk=2, micro=2) == Partition(1, 4, 2, 2)
    p = Partition(0, 2, 2, 2)
    with pytest.raises(ConfigError, match="micro_step"):
        buffer_indices(p, 3)
    with pytest.raises(ConfigError, match="N·s \\+ 1"):
        buffer_levels(p, torch.linspace(0, 1, 4), 0)
    with pytest.raises(ConfigError, match="same buffer size"):
        sample_training_levels([p, Partition(0, 1, 3, 2)], None, 4)
    with pytest.raises(ConfigError, match="weights"):
        sample_training_levels([p], [-1.0], 4)


def test_levels_at_interpolates():
    g = torch.tensor([0.0, 0.1, 0.5, 1.0])
    torch.testing.assert_close(levels_at(g, torch.tensor([0.0, 1.0, 1.5, 2.5, 3.0])),
                               torch.tensor([0.0, 0.1, 0.3, 0.75, 1.0]))


def test_training_levels_mix_partitions_and_cover_unit_interval():
    parts = [Partition(0, 1, 8, 4), Partition(0, 4, 2, 2), Partition(0, 8, 1, 1)]
    gen = torch.Generator().manual_seed(0)
    lv, pid = sample_training_levels(parts, [1, 2, 1], 4000, generator=gen)
    assert lv.shape == (4000, 8) and pid.shape == (4000,)
    frac = torch.bincount(pid, minlength=3).float() / 4000
    torch.testing.assert_close(frac, torch.tensor([0.25, 0.5, 0.25]), atol=0.03, rtol=0)  # ~5 sigma
    one = lv[pid == 0]
    assert bool((one == one[:, :1]).all())  # one chunk: all frames one level
    assert bool((lv > 0).all() and (lv <= 1).all())
    # jittered levels are continuous: every 1/20-wide bin of (0, 1] is hit, and no level repeats often
    hist = torch.histc(lv[pid == 1].flatten(), bins=20, min=0, max=1)
    assert bool((hist > 0).all())
    assert lv.unique().numel() > 3000
    # each jittered level lies inside its frame's micro-step interval (g[i-1], g[i]]
    diag = lv[pid == 2]
    lo = torch.arange(8) / 8.0
    assert bool(((diag > lo) & (diag <= lo + 1 / 8 + 1e-6)).all())
    # the staircase keeps its order within a sample
    assert bool((lv[:, 1:] >= lv[:, :-1] - 1e-6).all())


def test_training_levels_without_jitter_sit_on_the_grid():
    p = Partition(ref=1, chunks=3, chunk=1, micro=2)
    lv, _ = sample_training_levels([p], None, 200, grid_shift=3.0, generator=torch.Generator().manual_seed(1),
                                   jitter=False)
    g = partition_grid(p, 3.0)
    rows = {tuple(r) for r in lv.tolist()}
    expected = {tuple(buffer_levels(p, g, m).tolist()) for m in range(p.micro)}
    assert rows == expected  # both micro-steps drawn, nothing else
