"""Batch sources: where a training step's data comes from.

A source turns one :class:`~flowdistill.data.loader.BatchKey` (seed, step, stream tag, rank,
world, local batch) into this process's slice of the step's *global* batch, so the data do not
depend on the number of processes, on DataLoader workers, or on where a run was resumed. Two
kinds:

- :class:`IndexedSource` — a map-style dataset (``__len__``, ``__getitem__``); the step's
  generator draws the global batch's indices (with replacement) and each process fetches only its
  own slice, so a dataset never has to fit in memory (image folders read their files lazily,
  tensor stores their shards).
- :class:`SamplerSource` — an exact sampler ``sample(n, generator) -> (x, labels)`` (the toy
  targets); the global batch is drawn and sliced.

Items are dicts of CPU tensors: ``{"x": [...]}`` plus ``"cond"`` (long) for conditional sources
and any extra fields (``"noise"`` for couplings).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset


def _slice(full: Tensor, rank: int, world: int) -> Tensor:
    n = full.shape[0] // world
    return full[rank * n:(rank + 1) * n]


class IndexedSource(Dataset):
    """Base of map-style sources: subclasses implement ``__len__`` and ``__getitem__``.

    Attributes to set: ``sample_shape`` (shape of one ``x``), ``num_classes`` (0 when
    unconditional) and ``conditional``. Override :meth:`get_many` where a whole batch can be
    fetched faster than item by item (tensors in memory, one shard).
    """

    sample_shape: tuple[int, ...] = ()
    num_classes: int = 0
    conditional: bool = False

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def get_many(self, idx: Tensor) -> dict[str, Tensor]:
        """Items ``idx`` stacked into a batch (default: one ``__getitem__`` each)."""
        items = [self[int(i)] for i in idx]
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def local_batch(self, generator: torch.Generator, rank: int, world: int,
                    local_batch: int) -> dict[str, Tensor]:
        """This process's slice of the global batch whose indices ``generator`` draws."""
        if len(self) == 0:
            raise ValueError("dataset is empty")
        idx = torch.randint(len(self), (local_batch * world,), generator=generator)
        return self.get_many(_slice(idx, rank, world))


class TensorSource(IndexedSource):
    """Data held in memory (``x [N, ...]``, optional labels ``[N]``) — small sets such as digits."""

    def __init__(self, x: Tensor, y: Tensor | None = None, conditional: bool = False,
                 num_classes: int | None = None, extra: dict[str, Tensor] | None = None):
        if x.shape[0] == 0:
            raise ValueError("dataset is empty")
        self.x, self.y = x, y
        self.extra = dict(extra or {})
        self.conditional = conditional and y is not None
        if self.conditional:
            self.num_classes = int(num_classes) if num_classes else int(y.max().item()) + 1
        self.sample_shape = tuple(x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        """Item ``i`` (unbatched)."""
        return {k: v[0] for k, v in self.get_many(torch.tensor([i])).items()}

    def get_many(self, idx: Tensor) -> dict[str, Tensor]:
        """Index the tensors directly."""
        out = {"x": self.x[idx]}
        if self.conditional:
            out["cond"] = self.y[idx]
        out.update({k: v[idx] for k, v in self.extra.items()})
        return out


class SamplerSource:
    """Data from an exact sampler ``sample(n, generator) -> (x, labels)`` (toy targets)."""

    def __init__(self, dataset: Any, conditional: bool = False):
        self.dataset = dataset
        self.conditional = conditional
        self.num_classes = int(getattr(dataset, "num_classes", 0)) if conditional else 0
        x, _ = dataset.sample(1, torch.Generator().manual_seed(0))
        self.sample_shape = tuple(x.shape[1:])

    def local_batch(self, generator: torch.Generator, rank: int, world: int,
                    local_batch: int) -> dict[str, Tensor]:
        """Draw the global batch from ``generator`` and keep this process's slice."""
        x, y = self.dataset.sample(local_batch * world, generator=generator)
        out = {"x": _slice(x, rank, world)}
        if self.conditional:
            out["cond"] = _slice(y, rank, world)
        return out
