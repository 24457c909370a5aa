"""The data of a pipeline job: prompt / latent caches as batch sources, and the latent shape.

Batches come from the prompt-embedding cache (``data: {name: prompts, root: CACHE}``: condition-only
items, the loop adds the prior noise of the latent shape for data-free methods) or the latent cache
(``data.name=latents``: ``x`` and ``cond``). The latent shape is the VAE's downsampling of
``data.image_size`` pixels with the denoiser's channels (Flux: unpacked, ``in_channels/4``);
``data.image_size=0`` takes the shape the cache recorded (:func:`job_latent_shape`). Reflow and
InstaFlow train on couplings the guided teacher generates
(:func:`~.pipeline_job.couple_pipeline`): each pair keeps its prompt as an index into the cache, and
:class:`PromptIndexed` looks the embeddings up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowdistill.config import DiffusersTeacherSpec, JobConfig
from flowdistill.data.registry import register_dataset
from flowdistill.data.sources import IndexedSource
from flowdistill.errors import ConfigError
from flowdistill.integrations.diffusers.pipeline_teacher import PipelineTeacher, load_pipeline_teacher


def open_store(root: str, latents: bool = False):
    """The prompt (or latent) cache at ``root`` (:mod:`.prompt_cache`); a one-line error when absent."""
    from flowdistill.integrations.diffusers.prompt_cache import LatentStore, PromptEmbeddingStore

    if not str(root or "").strip():
        raise ConfigError(f"data.name={'latents' if latents else 'prompts'} needs data.root=CACHE "
                          f"(written by `flowdistill embed`)")
    if not Path(root).is_dir():
        raise ConfigError(f"data.root={root}: no such cache directory (write it with `flowdistill embed`)")
    try:
        return (LatentStore if latents else PromptEmbeddingStore)(root)
    except (OSError, ValueError, KeyError) as e:  # (the cache's own errors pass through as they are)
        raise ConfigError(f"data.root={root}: not a readable {'latent' if latents else 'prompt'} cache: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


_COND_KEYS = ("prompt_embeds", "pooled_prompt_embeds")


class PromptSource(IndexedSource):
    """Condition-only items from a prompt-embedding cache: ``{"cond": {"prompt_embeds",
    "pooled_prompt_embeds"}}``. ``sample_shape`` is the latent shape the prior noise takes; a
    data-free method's prior batch gets these conditions (:class:`~flowdistill.training.loop.Trainer`)."""

    condition_only = True

    def __init__(self, store: Any, sample_shape: tuple[int, ...]):
        self.store, self.sample_shape = store, tuple(sample_shape)
        if len(store) == 0:
            raise ConfigError("data.root: the prompt cache is empty")

    def __len__(self) -> int:
        """Number of cached prompts."""
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Item ``i`` (unbatched)."""
        return {"cond": {k: v[0] for k, v in self.get_many(torch.tensor([i]))["cond"].items()}}

    def get_many(self, idx: Tensor) -> dict[str, Any]:
        """One read of the store for the batch ``idx``."""
        got = self.store.get_many(idx.long())
        return {"cond": {k: got[k] for k in _COND_KEYS if k in got}}


class LatentSource(PromptSource):
    """Items ``{"x": latents, "cond": {...}}`` of a latent cache (data-based methods)."""

    condition_only = False

    def get_many(self, idx: Tensor) -> dict[str, Any]:
        """Latents and their captions' embeddings for the batch ``idx``."""
        got = self.store.get_many(idx.long())
        x = got["latents"]
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ConfigError(f"data.root: cached latents have shape {list(x.shape[1:])}, the teacher at "
                              f"data.image_size takes {list(self.sample_shape)}")
        return {"x": x.float(), "cond": {k: got[k] for k in _COND_KEYS if k in got}}


def _cache_shape(spec: Any) -> tuple[int, ...]:
    """Latent shape of a cache named without a job teacher: ``data.image_size`` on the manifest's
    pipeline when positive, else the manifest's recorded ``latent_shape``."""
    store = open_store(spec.root, spec.name == "latents")
    man = store.manifest or {}
    if int(spec.image_size) <= 0 and man.get("latent_shape"):
        return tuple(int(v) for v in man["latent_shape"])
    pipe = man.get("pipeline")
    if not pipe:
        raise ConfigError(f"data.root={spec.root}: the manifest names no pipeline; give teacher.diffusers")
    return load_pipeline_teacher(DiffusersTeacherSpec(diffusers=str(pipe))).latent_shape(spec.image_size)


@register_dataset("prompts", sample_shape=_cache_shape)
def _prompts(spec: Any, split: str) -> PromptSource:
    """Condition-only batches from the prompt cache at ``data.root`` (a pipeline job's data-free methods)."""
    return PromptSource(open_store(spec.root), _cache_shape(spec))


@register_dataset("latents", sample_shape=_cache_shape)
def _latents(spec: Any, split: str) -> LatentSource:
    """Latent + caption batches from the latent cache at ``data.root`` (data-based methods)."""
    return LatentSource(open_store(spec.root, True), _cache_shape(spec))


def check_data_name(cfg: JobConfig) -> None:
    if cfg.data.name not in ("prompts", "latents"):
        raise ConfigError(f"data.name={cfg.data.name!r}: a diffusers pipeline job reads 'prompts' (a prompt "
                          f"cache) or 'latents' (a latent cache)")


def build_source(cfg: JobConfig, shape: tuple[int, ...], store: Any = None) -> PromptSource:
    """The job's batch source at the teacher's latent ``shape`` (``store``: the cache, if open)."""
    check_data_name(cfg)
    latents = cfg.data.name == "latents"
    store = store if store is not None else open_store(cfg.data.root, latents)
    return (LatentSource if latents else PromptSource)(store, shape)


def job_latent_shape(teacher: PipelineTeacher, cfg: JobConfig, store: Any = None) -> tuple[int, int, int]:
    """The latent shape the job trains at: ``data.image_size`` pixels when it is positive; with
    ``data.image_size=0`` the cache's recorded ``latent_shape`` (the resolution it was embedded at),
    else the pipeline's default size (the denoiser's ``sample_size`` × the VAE factor)."""
    size = int(cfg.data.image_size)
    if size > 0:
        return teacher.latent_shape(size)
    rec = (getattr(store, "manifest", None) or {}).get("latent_shape") if store is not None else None
    if rec:
        shape = tuple(int(v) for v in rec)
        want = teacher.latent_shape(shape[-1] * teacher.vae_scale)
        if shape != want:
            raise ConfigError(f"data.root: the cache's latent_shape {list(shape)} is not the teacher's "
                              f"{list(want)}; set data.image_size=PIXELS")
        return want
    sample = getattr(teacher.model.config, "sample_size", None)
    if teacher.class_name == "FluxTransformer2DModel":
        sample = 128  # FluxPipeline.default_sample_size (latent cells: 1024 px with the usual VAE)
    if not isinstance(sample, int) or sample <= 0:
        raise ConfigError("data.image_size=0 and neither the cache nor the denoiser gives a size; "
                          "set data.image_size=PIXELS")
    return teacher.latent_shape(sample * teacher.vae_scale)


class PromptIndexed(nn.Module):
    """``net`` taking a prompt cache's row indices as its condition: a coupling store keeps the
    prompt of each pair as an index (its class label; the null label ``len(store)`` is the negative
    prompt, the unconditional branch), and this wrapper looks the embeddings up before calling
    ``net(x, t, s, cond=...)``. A dict or :class:`~.adapters.TextCondition` condition passes as it is."""

    def __init__(self, net: nn.Module, store: Any):
        super().__init__()
        self.net = net
        self.__dict__["store"] = store  # out of the module tree (not a tensor container)

    def lookup(self, idx: Tensor) -> dict[str, Tensor]:
        """The embeddings of rows ``idx`` (``len(store)``: the negative prompt's)."""
        n = len(self.store)
        i = idx.detach().to("cpu", torch.long).reshape(-1)
        if int(i.min()) < 0 or int(i.max()) > n:
            raise IndexError(f"prompt index out of range [0, {n}]")
        rows = self.store.get_many(i.clamp(max=n - 1))
        null = i == n
        if bool(null.any()):
            neg = self.store.negative()
            rows = {k: torch.where(null.reshape(-1, *[1] * (v.ndim - 1)), neg[k].to(v.dtype).expand_as(v), v)
                    for k, v in rows.items()}
        return {k: rows[k].to(idx.device) for k in _COND_KEYS if k in rows}

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, cond: Any = None, **kw: Any) -> Tensor:
        """``net`` with index conditions replaced by the cached embeddings."""
        if isinstance(cond, Tensor) and not cond.is_floating_point():
            cond = self.lookup(cond)
        return self.net(x, t, s, cond=cond, **kw)

