"""Batch sources: where a training step's data comes from.

A source returns the *local* slice of a global batch drawn from the step's
:class:`~flowdistill.core.rng.StepRNG`, so the data do not depend on the number of processes.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from flowdistill.core.rng import StepRNG


class BatchSource(Protocol):
    """``batch(rng, local_batch) -> {"x": [b, ...], "cond": [b] | None}``."""

    num_classes: int

    def batch(self, rng: StepRNG, local_batch: int) -> dict[str, Tensor]: ...


class SamplerSource:
    """Data from an exact sampler ``sample(n, generator) -> (x, labels)`` (toy targets)."""

    def __init__(self, dataset, conditional: bool = False):
        self.dataset = dataset
        self.conditional = conditional
        self.num_classes = int(getattr(dataset, "num_classes", 0)) if conditional else 0
        x, _ = dataset.sample(1, torch.Generator().manual_seed(0))
        self.sample_shape = tuple(x.shape[1:])

    def batch(self, rng: StepRNG, local_batch: int) -> dict[str, Tensor]:
        """Draw the global batch from the step's generator and keep this process's slice."""
        x, y = self.dataset.sample(local_batch * rng.world, generator=rng.generator())
        out = {"x": rng.slice(x)}
        if self.conditional:
            out["cond"] = rng.slice(y)
        return out


class TensorSource:
    """Data held in memory (``x [N, ...]``, optional labels ``[N]``), drawn with replacement."""

    def __init__(self, x: Tensor, y: Tensor | None = None, conditional: bool = False):
        if x.shape[0] == 0:
            raise ValueError("dataset is empty")
        self.x, self.y = x, y
        self.conditional = conditional and y is not None
        self.num_classes = int(y.max().item()) + 1 if self.conditional else 0
        self.sample_shape = tuple(x.shape[1:])

    def batch(self, rng: StepRNG, local_batch: int) -> dict[str, Tensor]:
        """Indices for the global batch from the step's generator; this process's slice."""
        idx = rng.slice(torch.randint(self.x.shape[0], (local_batch * rng.world,), generator=rng.generator()))
        idx = idx.cpu()
        out = {"x": self.x[idx].to(rng.device)}
        if self.conditional:
            out["cond"] = self.y[idx].to(rng.device)
        return out
