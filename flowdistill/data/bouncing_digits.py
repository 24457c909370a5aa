"""Bouncing digits: a built-in video problem with an exact generator (no download).

Each clip shows 1–2 of scikit-learn's bundled 8×8 digits (:mod:`flowdistill.data.digits`; the
``"train"`` split for training data, the held-out ``"test"`` split for evaluation reference clips)
moving at constant velocity inside a ``size × size`` frame and bouncing elastically off the walls.

Conventions (fixed):

- Sprite: the 8×8 digit upscaled to ``digit_size × digit_size`` (default 12, bilinear, as
  :func:`~flowdistill.data.digits.upscale_digits`), intensity ``I = (x + 1) / 2 ∈ [0, 1]``.
- Coordinates: pixel ``(row i, column j)`` has its centre at ``(x, y) = (j, i)``. A digit's position
  is the centre of its sprite box, ``p = top_left + (d − 1)/2`` with ``d = digit_size``; it lives in
  ``[lo, hi]² = [(d − 1)/2, size − 1 − (d − 1)/2]²``, so the sprite never leaves the frame.
- Dynamics (exact, closed form, per coordinate): the free path ``q(f) = p₀ + v₀·f`` folded into
  ``[lo, hi]`` by reflection with period ``2L`` (``L = hi − lo``)::

      r = (q − lo) mod 2L,   p(f) = lo + (r if r ≤ L else 2L − r),
      v(f) = v₀ · (+1 if r < L else −1)

  i.e. constant velocity and an elastic bounce (position and velocity mirrored) at each wall. The
  velocity stored for frame ``f`` is the one in effect on leaving frame ``f`` (towards ``f + 1``).
- Draws: number of digits uniform in ``digits = (min, max)``; start ``p₀`` uniform in ``[lo, hi]²``;
  speed uniform in ``speed = (min, max)`` px/frame with a uniform random direction.
- Rendering: each sprite is translated to its sub-pixel position by bilinear interpolation
  (``grid_sample``, zero outside the sprite), so motion is smooth and the intensity-weighted centroid
  of a lone digit moves exactly with ``p``; digits are combined by ``max``; frames are ``2·I − 1`` in
  ``[-1, 1]``, shape ``[F, 1, size, size]``.
- Determinism: everything is drawn from the ``generator`` passed in, in a fixed order.

Registered datasets (``kind="video"``): ``bouncing_digits`` — an infinite exact source of clips
(``data.params``: ``frames`` (16), ``size`` (32), ``digits`` ([1, 2]), ``speed`` ([1.0, 2.5]),
``digit_size`` (12)); split ``"train"`` draws train digits, ``"test"`` test digits. Batch items are
``{"x": [frames, 1, size, size]}`` (+ ``"cond"``: the first digit's label, when conditional).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flowdistill.data.registry import register_dataset
from flowdistill.data.sources import SamplerSource
from flowdistill.errors import ConfigError

DEFAULT_FRAMES = 16
DEFAULT_SIZE = 32
DEFAULT_DIGITS = (1, 2)
DEFAULT_SPEED = (1.0, 2.5)
DEFAULT_DIGIT_SIZE = 12


@dataclass
class BouncingClips:
    """A batch of generated clips and their true dynamics.

    ``frames [n, F, 1, S, S]`` in [-1, 1]; ``positions [n, F, D, 2]`` digit centres (px, ``(x, y)``)
    and ``velocities [n, F, D, 2]`` (px/frame, in effect on leaving each frame), NaN for absent
    digits; ``labels [n, D]`` (−1 when absent); ``present [n, D]`` bool; ``D = digits[1]``.
    """

    frames: Tensor
    positions: Tensor
    velocities: Tensor
    labels: Tensor
    present: Tensor
    size: int
    digit_size: int

    @property
    def bounds(self) -> tuple[float, float]:
        """``(lo, hi)``: the range of each position coordinate."""
        return position_bounds(self.size, self.digit_size)


def position_bounds(size: int, digit_size: int) -> tuple[float, float]:
    """``(lo, hi) = ((d − 1)/2, size − 1 − (d − 1)/2)``: where a sprite centre may be."""
    half = (digit_size - 1) / 2.0
    return half, size - 1 - half


def reflect(q: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    """Fold free positions ``q`` into ``[lo, hi]`` by elastic reflection.

    Returns ``(p, sign)``: ``p = lo + (r if r ≤ L else 2L − r)`` with ``r = (q − lo) mod 2L``, and
    ``sign = ±1`` the factor the free velocity is multiplied by (−1 on the mirrored half-period).
    """
    length = hi - lo
    r = torch.remainder(q - lo, 2.0 * length)
    back = r >= length
    p = lo + torch.where(back, 2.0 * length - r, r)
    return p, torch.where(back, -1.0, 1.0).to(q.dtype)


@functools.lru_cache(maxsize=8)
def digit_sprites(split: str, digit_size: int) -> tuple[Tensor, Tensor]:
    """Sprites ``[N, d, d]`` (intensity in [0, 1]) and labels ``[N]`` of a digits split (cached)."""
    from flowdistill.data.digits import digits_tensors, upscale_digits

    x, y = digits_tensors(split, 8)
    x = upscale_digits(x, digit_size)
    return ((x[:, 0] + 1.0) / 2.0).clamp(0.0, 1.0), y


def render(sprites: Tensor, positions: Tensor, size: int) -> Tensor:
    """Intensity images ``[M, size, size]`` of sprites ``[M, d, d]`` centred at ``positions [M, 2]``.

    Bilinear translation: canvas pixel ``(x, y)`` reads the sprite at ``(x − p_x + (d−1)/2,
    y − p_y + (d−1)/2)`` with bilinear interpolation and zero outside (``grid_sample``,
    ``align_corners=True``: sprite pixel ``k`` sits at normalised ``−1 + 2k/(d−1)``).
    """
    m, d = sprites.shape[0], sprites.shape[-1]
    coords = torch.arange(size, dtype=torch.float32)
    half = (d - 1) / 2.0
    gx = (coords.view(1, 1, size) - positions[:, 0].view(m, 1, 1) + half) * (2.0 / (d - 1)) - 1.0
    gy = (coords.view(1, size, 1) - positions[:, 1].view(m, 1, 1) + half) * (2.0 / (d - 1)) - 1.0
    grid = torch.stack([gx.expand(m, size, size), gy.expand(m, size, size)], dim=-1)
    out = F.grid_sample(sprites.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[:, 0]


def _check_range(name: str, value: Sequence[float], integer: bool = False) -> tuple[float, float]:
    """``(lo, hi)`` from a 2-sequence with ``0 ≤ lo ≤ hi`` (a ConfigError naming ``name`` otherwise)."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"data.params.{name} must be a [min, max] pair, got {value!r}") from None
    if not 0 <= lo <= hi or (integer and (lo != int(lo) or hi != int(hi) or hi < 1)):
        rule = " (integers, max >= 1)" if integer else ""
        raise ConfigError(f"data.params.{name} must satisfy 0 <= min <= max{rule}, got {list(value)!r}")
    return lo, hi


def generate_clips(n: int, frames: int, *, size: int = DEFAULT_SIZE, digits: Sequence[int] = DEFAULT_DIGITS,
                   speed: Sequence[float] = DEFAULT_SPEED, generator: torch.Generator,
                   digit_size: int = DEFAULT_DIGIT_SIZE, split: str = "train") -> BouncingClips:
    """``n`` exact bouncing-digit clips of ``frames`` frames (see the module docstring for the rules).

    Draw order from ``generator``: digit counts, digit indices, start positions, speeds, directions —
    so a seeded generator gives the same clips on every machine.
    """
    dmin, dmax = (int(v) for v in _check_range("digits", digits, integer=True))
    smin, smax = _check_range("speed", speed)
    if n < 0 or frames < 1:
        raise ConfigError(f"bouncing digits need n >= 0 and frames >= 1, got n={n}, frames={frames}")
    if not 2 <= digit_size < size:
        raise ConfigError(f"data.params.digit_size must be in [2, size), got {digit_size} (size {size})")
    sprites, labels_all = digit_sprites(split, digit_size)
    lo, hi = position_bounds(size, digit_size)
    g = generator
    count = torch.randint(dmin, dmax + 1, (n,), generator=g)
    idx = torch.randint(sprites.shape[0], (n, dmax), generator=g)
    p0 = lo + (hi - lo) * torch.rand(n, dmax, 2, generator=g)
    spd = smin + (smax - smin) * torch.rand(n, dmax, generator=g)
    ang = 2.0 * math.pi * torch.rand(n, dmax, generator=g)
    v0 = torch.stack([spd * torch.cos(ang), spd * torch.sin(ang)], dim=-1)  # [n, D, 2]
    present = torch.arange(dmax).view(1, dmax) < count.view(n, 1)

    t = torch.arange(frames, dtype=torch.float64).view(1, frames, 1, 1)
    q = p0.double().unsqueeze(1) + v0.double().unsqueeze(1) * t  # [n, F, D, 2] free path
    pos, sign = reflect(q, lo, hi)
    # velocity on leaving frame f: the sign of the half-period the path is in just after f
    _, sign_after = reflect(q + 1e-9 * v0.double().unsqueeze(1), lo, hi)
    vel = v0.double().unsqueeze(1) * sign_after
    del sign
    pos, vel = pos.float(), vel.float()

    d = digit_size
    per_frame = sprites[idx].unsqueeze(1).expand(n, frames, dmax, d, d).reshape(-1, d, d)
    imgs = render(per_frame, pos.reshape(-1, 2), size).view(n, frames, dmax, size, size)
    imgs = imgs * present.view(n, 1, dmax, 1, 1)
    clip = (2.0 * imgs.amax(dim=2) - 1.0).unsqueeze(2).clamp(-1.0, 1.0)
    nan = torch.full_like(pos, float("nan"))
    mask = present.view(n, 1, dmax, 1)
    return BouncingClips(
        frames=clip.contiguous(),
        positions=torch.where(mask, pos, nan),
        velocities=torch.where(mask, vel, nan),
        labels=torch.where(present, labels_all[idx], torch.full_like(idx, -1)),
        present=present,
        size=size,
        digit_size=digit_size,
    )


class BouncingDigits:
    """An exact sampler of bouncing-digit clips: ``sample(n, generator) -> (clips, first labels)``.

    The interface of the toy targets, so :class:`~flowdistill.data.sources.SamplerSource` wraps it.
    """

    num_classes = 10

    def __init__(self, frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE,
                 digits: Sequence[int] = DEFAULT_DIGITS, speed: Sequence[float] = DEFAULT_SPEED,
                 digit_size: int = DEFAULT_DIGIT_SIZE, split: str = "train"):
        """Store the generator's parameters (checked on the first draw's rules now)."""
        self.frames, self.size, self.digit_size, self.split = int(frames), int(size), int(digit_size), split
        self.digits = tuple(int(v) for v in _check_range("digits", digits, integer=True))
        self.speed = _check_range("speed", speed)
        if self.frames < 1:
            raise ConfigError(f"data.params.frames must be >= 1, got {frames}")

    def generate(self, n: int, generator: torch.Generator) -> BouncingClips:
        """``n`` clips with their true dynamics."""
        return generate_clips(n, self.frames, size=self.size, digits=self.digits, speed=self.speed,
                              generator=generator, digit_size=self.digit_size, split=self.split)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(clips [n, F, 1, S, S], label of each clip's first digit [n])``."""
        c = self.generate(n, generator if generator is not None else torch.Generator().manual_seed(0))
        return c.frames, c.labels[:, 0]


def bouncing_digits_from_params(params: dict[str, Any] | None, split: str = "train") -> BouncingDigits:
    """A :class:`BouncingDigits` from a config's ``data.params`` (unknown keys are a ConfigError)."""
    params = dict(params or {})
    known = {"frames", "size", "digits", "speed", "digit_size"}
    extra = sorted(set(params) - known)
    if extra:
        raise ConfigError(f"data.params of bouncing_digits: unknown key(s) {extra} (known: {sorted(known)})")
    return BouncingDigits(frames=int(params.get("frames", DEFAULT_FRAMES)),
                          size=int(params.get("size", DEFAULT_SIZE)),
                          digits=params.get("digits", DEFAULT_DIGITS),
                          speed=params.get("speed", DEFAULT_SPEED),
                          digit_size=int(params.get("digit_size", DEFAULT_DIGIT_SIZE)),
                          split="test" if split == "test" else "train")


def reference_clips(params: dict[str, Any] | None, n: int, seed: int = 0,
                    split: str = "test") -> BouncingClips:
    """``n`` real clips for evaluation (test-split digits by default), drawn with ``seed``."""
    return bouncing_digits_from_params(params, split).generate(n, torch.Generator().manual_seed(seed))


def _shape(spec: Any) -> tuple[int, ...]:
    """``(frames, 1, size, size)`` from ``spec.params``."""
    p = dict(getattr(spec, "params", None) or {})
    size = int(p.get("size", DEFAULT_SIZE))
    return (int(p.get("frames", DEFAULT_FRAMES)), 1, size, size)


@register_dataset("bouncing_digits", kind="video", sample_shape=_shape)
def _bouncing_digits(spec: Any, split: str) -> SamplerSource:
    """Exact bouncing-digit clips (train digits for ``"train"``, test digits for ``"test"``)."""
    return SamplerSource(bouncing_digits_from_params(getattr(spec, "params", None), split),
                         conditional=bool(getattr(spec, "conditional", False)))


__all__ = ["BouncingClips", "BouncingDigits", "bouncing_digits_from_params", "digit_sprites",
           "generate_clips", "position_bounds", "reference_clips", "reflect", "render"]
