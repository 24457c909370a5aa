"""Per-step randomness that is independent of the number of processes.

Every draw is made for the *global* batch from a generator seeded by ``(seed, step, stream)``
and each process keeps its contiguous slice. One process with global batch ``B`` and ``W``
processes with ``B / W`` each therefore see exactly the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StepRNG:
    """Global-batch random draws for one training step, sliced to this process."""

    def __init__(self, seed: int, step: int, rank: int = 0, world: int = 1, device="cpu", tag: int = 0):
        self.seed, self.step, self.rank, self.world, self.tag = seed, step, rank, world, tag
        self.device = torch.device(device)
        self._stream = 0

    def generator(self) -> torch.Generator:
        """A fresh CPU generator for the next stream of this step."""
        g = torch.Generator(device="cpu")
        key = ((self.seed * 1_000_003 + self.step) * 1009 + self.tag) * 7919 + self._stream
        g.manual_seed(key % (2**63 - 1))
        self._stream += 1
        return g

    def slice(self, full: Tensor) -> Tensor:
        """This process's contiguous share of a global-batch tensor, on this process's device."""
        n = full.shape[0] // self.world
        return full[self.rank * n : (self.rank + 1) * n].to(self.device)

    def randn(self, local_batch: int, *shape: int) -> Tensor:
        """Standard normal ``[local_batch, *shape]`` (this process's slice)."""
        full = torch.randn(local_batch * self.world, *shape, generator=self.generator())
        return self.slice(full)

    def rand(self, local_batch: int, *shape: int) -> Tensor:
        """Uniform [0, 1) ``[local_batch, *shape]``."""
        return self.slice(torch.rand(local_batch * self.world, *shape, generator=self.generator()))

    def randint(self, high: int, local_batch: int) -> Tensor:
        """Integers in ``[0, high)`` of shape ``[local_batch]``."""
        g = self.generator()
        return self.slice(torch.randint(high, (local_batch * self.world,), generator=g))

    def times(self, sampler, local_batch: int) -> Tensor:
        """Training times from a :class:`~flowdistill.core.timesteps.TimeSampler`."""
        return self.slice(sampler(local_batch * self.world, generator=self.generator()))
