"""Toy 2-D targets with exact samplers and natural labels.

Every target is a class with ``num_classes``, ``dim = 2`` and
``sample(n, generator=None) -> (x [n, 2] float32, labels [n] long)``. Sampling uses only torch ops
driven by ``generator`` (a CPU ``torch.Generator``; ``None`` means torch's global RNG), so the same
seed always gives the same points, and every point is an exact draw from the stated density — no
rejection loops, no fixed grids, no NumPy RNG.

Scaling convention (all targets): ``x = scale · (raw − offset)``, where ``offset`` is the exact
mean of the raw shape (so ``x`` has mean 0) and ``scale`` is chosen analytically so that the
covariance has trace 2, i.e. the *average* per-axis variance is exactly 1. Per-axis stds:

============  =================================================================  ===========
name          raw shape (before ``scale``)                                       std (x / y)
============  =================================================================  ===========
checkerboard  4×4 board on [-2, 2]², uniform on the 8 squares with even col+row  1.00 / 1.00
8gaussians    8 Gaussians (std 0.07) on the unit circle at angles k·π/4          1.00 / 1.00
moons         two interleaved unit half-circles (sklearn layout), noise 0.05     1.23 / 0.70
spirals       2 arms r·(cos θ, sin θ), θ = 3π·r, r = √u, arm 1 rotated by π,    ≈1 / ≈1
              noise 0.03
============  =================================================================  ===========

Checkerboard: both marginals are uniform on ``[-2, 2]``, so ``scale = √3 / 2`` and the board is
``[-√3, √3]²`` with unit std on both axes. Moons are anisotropic (wide, short); the scale still
makes tr Cov = 2. Use ``raw = x / dataset.scale + dataset.offset`` to go back to raw coordinates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowdistill.core.registry import Registry

TOY_DATASETS = Registry("dataset")


def _check_n(n: int) -> int:
    """Validate a sample count."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"sample size n must be a non-negative int, got {n!r}")
    return n


class ToyDataset:
    """Base class of the toy 2-D targets.

    Subclasses implement ``_sample_raw(n, generator) -> (raw [n, 2] float64, labels [n] long)``;
    :meth:`sample` maps raw points to ``x = scale · (raw − offset)`` in float32.
    """

    name: str = "toy"
    num_classes: int = 0
    dim: int = 2
    scale: float = 1.0
    offset: tuple[float, float] = (0.0, 0.0)

    def _sample_raw(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` exact i.i.d. draws: points ``[n, 2]`` float32 and labels ``[n]`` long (CPU)."""
        raw, labels = self._sample_raw(_check_n(n), generator)
        off = torch.tensor(self.offset, dtype=raw.dtype)
        x = (self.scale * (raw - off)).to(torch.float32)
        return x, labels.to(torch.long)

    def to_raw(self, x: Tensor) -> Tensor:
        """Inverse of the scaling: ``raw = x / scale + offset`` (for geometric checks)."""
        return x / self.scale + torch.tensor(self.offset, dtype=x.dtype, device=x.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale:.4f})"


@TOY_DATASETS.register("checkerboard")
class Checkerboard(ToyDataset):
    """Uniform density on the 8 "black" squares of a 4×4 board on ``[-2, 2]²`` (raw units).

    Square ``(col, row)`` (``col, row ∈ {0..3}``, counted from the lower-left corner ``(-2, -2)``)
    is filled when ``col + row`` is even. Label ``= 2·row + col // 2 ∈ {0..7}``. Both marginals are
    uniform on ``[-2, 2]`` (variance 4/3), so ``scale = √3/2`` gives unit std per axis.
    """

    name = "checkerboard"
    num_classes = 8

    def __init__(self) -> None:
        self.scale = math.sqrt(3.0) / 2.0
        self.offset = (0.0, 0.0)

    def _sample_raw(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Pick a filled square uniformly, then a uniform point inside it."""
        labels = torch.randint(0, 8, (n,), generator=generator)
        row = labels // 2
        col = 2 * (labels % 2) + row % 2
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        raw = torch.stack([col.double(), row.double()], dim=1) + u - 2.0
        return raw, labels

    @staticmethod
    def square_of(raw: Tensor) -> tuple[Tensor, Tensor]:
        """``(col, row)`` of raw points on the board (for checks)."""
        cr = torch.floor(raw + 2.0).long()
        return cr[:, 0], cr[:, 1]


@TOY_DATASETS.register("8gaussians")
class EightGaussians(ToyDataset):
    """Equal mixture of 8 isotropic Gaussians ``N(c_k, σ²I)`` with ``c_k = (cos kπ/4, sin kπ/4)``.

    Raw radius 1 and ``σ = component_std`` (default 0.07). Label = component ``k``. The covariance
    is ``(1/2 + σ²)·I``, so ``scale = 1/√(1/2 + σ²)`` (≈ 1.407: centres at radius ≈ 1.41, component
    std ≈ 0.098) gives unit std per axis.
    """

    name = "8gaussians"
    num_classes = 8

    def __init__(self, component_std: float = 0.07) -> None:
        if component_std < 0:
            raise ValueError(f"component_std must be >= 0, got {component_std}")
        self.component_std = float(component_std)
        self.scale = 1.0 / math.sqrt(0.5 + self.component_std**2)
        self.offset = (0.0, 0.0)

    @property
    def centres(self) -> Tensor:
        """The 8 component means in scaled coordinates, ``[8, 2]`` float32 (row ``k`` = label ``k``)."""
        ang = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
        return (self.scale * torch.stack([ang.cos(), ang.sin()], dim=1)).float()

    def _sample_raw(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``x = c_k + σ·z`` with ``k ~ U{0..7}`` and ``z ~ N(0, I)``."""
        labels = torch.randint(0, 8, (n,), generator=generator)
        ang = labels.double() * (math.pi / 4)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        raw = torch.stack([ang.cos(), ang.sin()], dim=1) + self.component_std * z
        return raw, labels


@TOY_DATASETS.register("moons")
class TwoMoons(ToyDataset):
    """Two interleaved half-circles (the scikit-learn layout) with Gaussian noise.

    Raw: moon 0 is ``(cos θ, sin θ)``, moon 1 is ``(1 − cos θ, 1/2 − sin θ)``, ``θ ~ U[0, π]``
    (continuous, unlike sklearn's even grid), plus ``N(0, noise²I)``. Label = moon index.
    The raw mean is ``(1/2, 1/4)``; the raw variances are

        Var x = 1/2 + 1/4 + noise²,
        Var y = (1/2 − 4/π²) + ((4/π − 1/2)/2)² + noise²,

    and ``scale = √(2 / (Var x + Var y))`` (≈ 1.42 for ``noise = 0.05``).
    """

    name = "moons"
    num_classes = 2

    def __init__(self, noise: float = 0.05) -> None:
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.noise = float(noise)
        var_x = 0.75 + self.noise**2
        var_y = (0.5 - 4 / math.pi**2) + ((4 / math.pi - 0.5) / 2) ** 2 + self.noise**2
        self.scale = math.sqrt(2.0 / (var_x + var_y))
        self.offset = (0.5, 0.25)

    def _sample_raw(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Pick a moon, a uniform angle on it, then add isotropic noise."""
        labels = torch.randint(0, 2, (n,), generator=generator)
        theta = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        upper = torch.stack([theta.cos(), theta.sin()], dim=1)
        lower = torch.stack([1.0 - theta.cos(), 0.5 - theta.sin()], dim=1)
        raw = torch.where((labels == 0)[:, None], upper, lower) + self.noise * z
        return raw, labels


@TOY_DATASETS.register("spirals")
class TwoSpirals(ToyDataset):
    """Two interleaved Archimedean spiral arms with Gaussian noise.

    Raw arm 0 is ``r·(cos θ, sin θ)`` with ``θ = turns·2π·r`` and ``r = √u``, ``u ~ U[0, 1]``
    (so points are roughly uniform along the arc); arm 1 is arm 0 rotated by π. Noise
    ``N(0, noise²I)`` (default 0.03) is added. Label = arm index. The mean is 0 by symmetry and
    ``E r² = 1/2``, so tr Cov = 1/2 + 2·noise² and ``scale = √(2 / (1/2 + 2·noise²))`` (≈ 2).
    """

    name = "spirals"
    num_classes = 2

    def __init__(self, noise: float = 0.03, turns: float = 1.5) -> None:
        if noise < 0 or turns <= 0:
            raise ValueError(f"need noise >= 0 and turns > 0, got noise={noise}, turns={turns}")
        self.noise = float(noise)
        self.turns = float(turns)
        self.scale = math.sqrt(2.0 / (0.5 + 2 * self.noise**2))
        self.offset = (0.0, 0.0)

    def arm(self, r: Tensor, label: Tensor | int) -> Tensor:
        """Noise-free raw point of arm ``label`` at radius ``r``.

        ``r·(cos θ, sin θ)`` with ``θ = 2π·turns·r + π·label``; ``[m] -> [m, 2]``.
        """
        theta = 2 * math.pi * self.turns * r + math.pi * torch.as_tensor(label, dtype=r.dtype)
        return torch.stack([r * theta.cos(), r * theta.sin()], dim=1)

    def _sample_raw(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Pick an arm, ``r = √u``, place the point on the arm, add noise."""
        labels = torch.randint(0, 2, (n,), generator=generator)
        r = torch.rand(n, generator=generator, dtype=torch.float64).sqrt()
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        raw = self.arm(r, labels) + self.noise * z
        return raw, labels


def get_toy(name: str, **kwargs) -> ToyDataset:
    """An instance of the toy target registered as ``name`` (``kwargs`` go to its constructor).

    An unknown name raises :class:`~flowdistill.core.registry.UnknownNameError` listing the
    available names.
    """
    return TOY_DATASETS.build(name, **kwargs)


def toy_batch(dataset: str | ToyDataset, n: int, generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> dict[str, Tensor]:
    """One training batch ``{"x": [n, 2], "cond": [n]}`` from a toy target (name or instance).

    Draws on the CPU with ``generator`` (so the batch does not depend on ``device``), then moves
    the tensors to ``device``.
    """
    ds = get_toy(dataset) if isinstance(dataset, str) else dataset
    x, y = ds.sample(n, generator=generator)
    if device is not None:
        x, y = x.to(device), y.to(device)
    return {"x": x, "cond": y}


__all__ = [
    "TOY_DATASETS",
    "Checkerboard",
    "EightGaussians",
    "ToyDataset",
    "TwoMoons",
    "TwoSpirals",
    "get_toy",
    "toy_batch",
]
