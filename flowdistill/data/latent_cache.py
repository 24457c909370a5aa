"""Cached tokenizer latents: a dataset encoded once through an image tokenizer, sharded on disk.

A latent generator (RecTok's DiT, METHODS.md §6; any flow-matching teacher) trains on ``z``, the
tokenizer's latent of a training image, not on pixels. Encoding the dataset once keeps the
tokenizer out of training. The tokenizer is any module with ``AutoencoderKL``'s interface:
``encode(x).latent_dist`` with ``.mode()`` / ``.sample(generator)``, ``decode(z).sample`` and
``config.scaling_factor`` / ``config.shift_factor`` (:class:`flowdistill.models.tokenizer.TokenizerModel`;
this module never imports a model — the caller loads it, :mod:`flowdistill.models.latent_codec`).

Latents are stored **normalised**, as diffusers pipelines hand them to the denoiser::

    latents = (z − shift_factor) · scaling_factor,      z = mode(E(x))  (posterior mean, default)
                                                          or a posterior sample (``mode="sample"``)

so :func:`denormalise` inverts it before ``decode``. Fields: ``latents`` ``[n, C, h, w]`` (float32)
and ``cond`` ``[n]`` (int64) when the source has labels. The store is the generic
:mod:`flowdistill.data.tensor_cache` (shards, manifest, atomic, resumable, rank ``r`` of ``w``
writes shards ``r, r + w, …``); its header names the tokenizer (path, weights digest, factors),
the source dataset (its data spec, so evaluation finds the pixel reference) and the options.
A posterior sample draws its noise from a generator seeded by ``(seed, first row of the batch)``,
so a sampled cache is also the same for any number of processes and after a resume.

The registered dataset ``tokenizer_latents`` (:mod:`flowdistill.data.registry`:
``data.name: tokenizer_latents``, ``data.root: CACHE_DIR``) reads it: sample shape from the
manifest, conditional when labels are stored, and for evaluation the source dataset's real images
as reference with the tokenizer as decoder (``data.params.decoder: RUN_OR_MODEL_DIR`` overrides the
tokenizer the manifest names).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from flowdistill.data.couplings import shard_seed, state_sha256
from flowdistill.data.sources import IndexedSource
from flowdistill.data.tensor_cache import TensorCache, TensorCacheError, write_cache
from flowdistill.errors import ConfigError

FORMAT = "flowdistill-tokenizer-latents/1"
MODES = ("mean", "sample")
#: the data-spec keys recorded for the source dataset
SPEC_KEYS = ("name", "image_size", "root", "conditional", "params")


def tokenizer_factors(tokenizer: Any) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of a tokenizer's config (1 and 0 where it has none)."""
    conf = getattr(tokenizer, "config", None) or {}
    get = conf.get if hasattr(conf, "get") else (lambda k, d=None: getattr(conf, k, d))
    scale, shift = get("scaling_factor", None), get("shift_factor", None)
    return float(1.0 if scale is None else scale), float(0.0 if shift is None else shift)


def normalise(z: Tensor, scaling_factor: float, shift_factor: float) -> Tensor:
    """``(z − shift) · scale``: a tokenizer latent → the generator's (unit-variance) space."""
    return (z - shift_factor) * scaling_factor


def denormalise(latents: Tensor, scaling_factor: float, shift_factor: float) -> Tensor:
    """``latents / scale + shift``: the generator's space → the tokenizer's decoder input."""
    return latents / scaling_factor + shift_factor


@torch.no_grad()
def encode_batch(tokenizer: Any, x: Tensor, mode: str = "mean", generator: torch.Generator | None = None,
                 factors: tuple[float, float] | None = None) -> Tensor:
    """Images ``[B, C, H, W]`` in [−1, 1] → normalised latents ``[B, c, h, w]`` (module docstring).

    ``mode``: ``"mean"`` (the posterior mean, deterministic) or ``"sample"`` (one posterior draw
    from ``generator``); ``factors`` default to the tokenizer's own.
    """
    if mode not in MODES:
        raise ConfigError(f"encode mode must be one of {', '.join(MODES)}, got {mode!r}")
    p = next(tokenizer.parameters())
    dist = tokenizer.encode(x.to(p.device, p.dtype)).latent_dist
    z = dist.mode() if mode == "mean" else dist.sample(generator=generator)
    scale, shift = factors if factors is not None else tokenizer_factors(tokenizer)
    return normalise(z.float().cpu(), scale, shift)


@torch.no_grad()
def measure_factors(tokenizer: Any, source: IndexedSource, n: int = 1024,
                    batch_size: int = 128) -> tuple[float, float]:
    """``(1 / std z, mean z)`` over the posterior means of the first ``n`` items of ``source``: the
    factors that give the cached latents zero mean and unit variance (one scalar each, as
    ``AutoencoderKL``'s ``scaling_factor`` / ``shift_factor``), for a tokenizer whose config holds none."""
    n = min(int(n), len(source))
    z = torch.cat([encode_batch(tokenizer, source.get_many(torch.arange(a, min(a + batch_size, n)))["x"],
                                factors=(1.0, 0.0)) for a in range(0, n, batch_size)])
    return float(1.0 / z.std()), float(z.mean())


def spec_record(spec: Any) -> dict[str, Any]:
    """The JSON record of a data spec (name, image_size, root, conditional, params)."""
    rec = {k: getattr(spec, k, None) for k in SPEC_KEYS}
    rec["params"] = dict(rec.get("params") or {})
    rec["root"] = str(rec.get("root") or "")
    return rec


def encode_dataset(tokenizer: Any, source: IndexedSource, root: str | os.PathLike, *, data: Any,
                   tokenizer_path: str = "", mode: str = "mean", seed: int = 0, batch_size: int = 64,
                   shard_size: int = 1024, rank: int = 0, world: int = 1, resume: bool = False,
                   progress: bool = True, factors: tuple[float, float] | None = None) -> Path:
    """Encode every item of ``source`` (an indexed dataset of images) into a latent cache at ``root``.

    ``data``: the data spec ``source`` was built from (recorded, so evaluation finds its real
    images); ``tokenizer_path``: where the tokenizer was loaded from (recorded; the decoder default).
    Labels are stored when the source is conditional. ``rank``/``world``: this process writes
    shards ``rank, rank + world, …``; ``resume`` keeps the complete shards of an existing cache made
    with the same settings (another tokenizer, dataset or option is refused, naming the key).
    ``factors``: ``(scaling_factor, shift_factor)`` to normalise with instead of the tokenizer's own
    (e.g. :func:`measure_factors`; recorded in the header, which the decoder undoes). Returns ``root``.
    """
    if mode not in MODES:
        raise ConfigError(f"encode mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(source, IndexedSource) or len(source) == 0:
        raise ConfigError(f"dataset {getattr(data, 'name', '?')!r} is not a non-empty indexed image dataset; "
                          f"only those can be encoded")
    scale, shift = tokenizer_factors(tokenizer) if factors is None else (float(factors[0]), float(factors[1]))
    probe = encode_batch(tokenizer, source.get_many(torch.arange(1))["x"], "mean", factors=(scale, shift))
    fields = {"latents": {"shape": list(probe.shape[1:]), "dtype": "float32"}}
    if source.conditional:
        fields["cond"] = {"shape": [], "dtype": "int64"}
    header = {"format": FORMAT, "tokenizer": str(tokenizer_path), "tokenizer_sha256": state_sha256(tokenizer),
              "scaling_factor": scale, "shift_factor": shift, "mode": mode,
              "seed": int(seed) if mode == "sample" else None, "data": spec_record(data),
              "num_classes": int(source.num_classes) if source.conditional else 0,
              "shard_size": int(shard_size), "batch_size": int(batch_size), "fields": fields}

    def encode(a: int, b: int) -> dict[str, Tensor]:
        """Rows ``a … b − 1``: their latents (and labels)."""
        items = source.get_many(torch.arange(a, b))
        g = torch.Generator().manual_seed(shard_seed(seed, a)) if mode == "sample" else None
        out = {"latents": encode_batch(tokenizer, items["x"], mode, g, (scale, shift))}
        if source.conditional:
            out["cond"] = items["cond"].long()
        return out

    return write_cache(root, header, len(source), encode, rank=rank, world=world, resume=resume,
                       progress=progress, desc="encode latents")


class LatentCache(TensorCache):
    """A complete latent cache: ``get_many(idx)`` → ``{"latents"[, "cond"]}``, plus what the header
    records (:attr:`latent_shape`, :attr:`factors`, :attr:`source_spec`, :attr:`tokenizer`)."""

    FORMAT = FORMAT
    HOW = "a recipe's encode stage (flowdistill recipe RECIPE)"

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(C, h, w)`` of the cached latents."""
        return tuple(self.fields["latents"]["shape"])

    @property
    def has_labels(self) -> bool:
        """Whether class labels are stored."""
        return "cond" in self.fields

    @property
    def factors(self) -> tuple[float, float]:
        """``(scaling_factor, shift_factor)`` the latents were normalised with."""
        return float(self.manifest["scaling_factor"]), float(self.manifest["shift_factor"])

    @property
    def tokenizer(self) -> str:
        """The tokenizer directory the cache was encoded with (as given to the encoder)."""
        return str(self.manifest.get("tokenizer") or "")

    @property
    def source_spec(self) -> SimpleNamespace:
        """The data spec of the encoded (pixel) dataset, as an attribute namespace."""
        return SimpleNamespace(**self.manifest["data"])


def open_cache(root: str | os.PathLike) -> LatentCache:
    """The latent cache at ``root``; a one-line :class:`~flowdistill.errors.ConfigError` naming
    ``data.root`` when it is missing, incomplete or not a latent cache."""
    if not str(root or "").strip():
        raise ConfigError("data.name=tokenizer_latents needs data.root=DIR (a latent cache written by an "
                          "encode stage)")
    try:
        return LatentCache(root)
    except TensorCacheError as e:
        raise ConfigError(f"data.root={root}: {e}") from None


class LatentSource(IndexedSource):
    """A latent cache as a map-style source: items ``{"x": latents[, "cond": label]}`` (float32)."""

    def __init__(self, cache: LatentCache, conditional: bool = False):
        if conditional and not cache.has_labels:
            raise ConfigError(f"data.conditional=true but the latent cache {cache.root} holds no labels "
                              f"(its dataset was unconditional)")
        self.cache = cache
        self.conditional = bool(conditional)
        self.num_classes = int(cache.manifest.get("num_classes") or 0) if self.conditional else 0
        self.sample_shape = cache.latent_shape

    def __len__(self) -> int:
        """Number of cached latents."""
        return len(self.cache)

    def get_many(self, idx: Tensor) -> dict[str, Tensor]:
        """Latents ``idx`` (and their labels when conditional)."""
        got = self.cache.get_many(idx)
        out = {"x": got["latents"].float()}
        if self.conditional:
            out["cond"] = got["cond"].long()
        return out

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        """Item ``i``."""
        return {k: v[0] for k, v in self.get_many(torch.tensor([int(i)])).items()}


@dataclass(frozen=True)
class LatentDecoding:
    """How samples of a latent dataset become images: the tokenizer to decode with (a run or model
    directory) and the factors to undo (:func:`denormalise`)."""

    tokenizer: str
    scaling_factor: float
    shift_factor: float


def decoding_of(spec: Any) -> LatentDecoding:
    """The decoding of ``data.name=tokenizer_latents`` at ``spec.root``: the manifest's tokenizer unless
    ``spec.params["decoder"]`` names another run or model directory."""
    cache = open_cache(spec.root)
    decoder = str((getattr(spec, "params", None) or {}).get("decoder") or cache.tokenizer)
    if not decoder:
        raise ConfigError(f"data.params.decoder: the latent cache {spec.root} names no tokenizer; set "
                          f"data.params.decoder=RUN_OR_MODEL_DIR")
    return LatentDecoding(decoder, *cache.factors)


__all__ = ["FORMAT", "MODES", "LatentCache", "LatentDecoding", "LatentSource", "decoding_of", "denormalise",
           "encode_batch", "encode_dataset", "measure_factors", "normalise", "open_cache", "spec_record",
           "tokenizer_factors"]
