"""The training DataLoader: one batch per :class:`BatchKey`, deterministic per (seed, step, rank).

The training loop knows, before it runs, which batches it will ask for: for each step, each due
parameter group, each repeat and each gradient-accumulation micro-batch. It lists them as keys;
:class:`StepBatches` maps a key to this process's slice of that global batch (through the source's
``local_batch``), and a ``torch.utils.data.DataLoader`` with ``batch_size=None`` serves them in
key order, with workers prefetching ahead. A batch therefore depends on its key only: 0 or N
workers, 1 or N processes (each process fetches only its own slice) and a resumed run all see
the same data.

Gradient accumulation splits a process's share again: micro-batch ``j`` of ``A`` on rank ``r``
of ``W`` is the slice ``r·A + j`` of ``W·A`` (see :func:`virtual_rank`), so ``A`` micro-batches
of ``b`` on one process are exactly the batch ``A·b`` of one process without accumulation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

#: Offset of the data streams' tags from the distillers' own random streams (StepRNG tags), so
#: drawing the data in a worker never shifts a distiller's random numbers.
DATA_TAG_OFFSET = 1 << 20


@dataclass(frozen=True)
class BatchKey:
    """Which batch: step, stream tag (group and repeat), this process's (virtual) rank and world."""

    step: int
    tag: int
    rank: int
    world: int
    local_batch: int


def virtual_rank(rank: int, world: int, micro: int, accum: int) -> tuple[int, int]:
    """``(rank, world)`` of micro-batch ``micro`` of ``accum`` on process ``rank`` of ``world``."""
    return rank * accum + micro, world * accum


def key_generator(seed: int, key: BatchKey) -> torch.Generator:
    """The CPU generator that draws ``key``'s global batch (same formula as StepRNG's streams)."""
    g = torch.Generator(device="cpu")
    k = ((seed * 1_000_003 + key.step) * 1009 + key.tag + DATA_TAG_OFFSET) * 7919
    g.manual_seed(k % (2**63 - 1))
    return g


class StepBatches(Dataset):
    """``dataset[key]`` is this process's slice of the batch ``key`` names (CPU tensors)."""

    def __init__(self, source: Any, seed: int):
        self.source, self.seed = source, seed

    def __getitem__(self, key: BatchKey) -> dict[str, Tensor]:
        return self.source.local_batch(key_generator(self.seed, key), key.rank, key.world, key.local_batch)

    def __len__(self) -> int:  # keys come from the sampler; the length is not used
        raise TypeError("StepBatches is indexed by BatchKey; iterate it through make_loader")


def make_loader(source: Any, keys: Iterable[BatchKey], seed: int, num_workers: int = 0,
                prefetch_factor: int = 2, pin_memory: bool = False) -> DataLoader:
    """A DataLoader that yields one batch per key, in key order."""
    kw: dict[str, Any] = {}
    if num_workers > 0:
        kw.update(prefetch_factor=prefetch_factor, persistent_workers=False)
    return DataLoader(StepBatches(source, seed), batch_size=None, sampler=_Keys(keys),
                      num_workers=num_workers, pin_memory=pin_memory, **kw)


class _Keys:
    """An iterable sampler over precomputed (or lazily generated) keys."""

    def __init__(self, keys: Iterable[BatchKey]):
        self.keys = keys

    def __iter__(self) -> Iterator[BatchKey]:
        return iter(self.keys)


def batch_for(source: Any, seed: int, step: int, tag: int = 0, rank: int = 0, world: int = 1,
              local_batch: int = 1) -> dict[str, Tensor]:
    """One batch without a DataLoader (tests, notebooks): what the loader serves for this key."""
    return StepBatches(source, seed)[BatchKey(step, tag, rank, world, local_batch)]
