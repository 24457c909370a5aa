"""Prompt-embedding and VAE-latent caches of diffusers pipelines, on the generic tensor store.

The store itself (layout, manifest, shards, atomic writes, processes, resume) is
:mod:`flowdistill.data.tensor_cache`; this module adds what the pipeline caches share: the
item list ``prompts.jsonl`` and the negative prompt's embeddings.

Layout of a cache directory (the prompt cache of :mod:`.prompt_cache`, the latent cache of
:mod:`.latent_cache`)::

    ROOT/manifest.json                 header + the list of complete shards (+ "complete")
    ROOT/manifest.lock                 advisory lock for concurrent manifest updates
    ROOT/prompts.jsonl                 the prompts (captions), one {"prompt": ...} a line, in cache order
    ROOT/negative.safetensors          the negative prompt's embeddings, batch 1 (classifier-free guidance)
    ROOT/shard-000000.safetensors      rows 0 … shard_size − 1 of every field ("prompt_embeds" [n, L, D],
    ROOT/shard-000001.safetensors      "pooled_prompt_embeds" [n, P], "latents" [n, C, h, w], ...)

The manifest header holds the pipeline class and the identity of the encoders (a digest of
their weights), the item list's sha256, the negative prompt and the encoding options; shards,
processes (rank r of w encodes shards r, r + w, …) and resume work as the generic store says.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from flowdistill.atomic import atomic_file
from flowdistill.data.tensor_cache import (
    TensorCache,
    TensorCacheError,
    dtype_name,
    fields_of,
)
from flowdistill.data.tensor_cache import read_cache_manifest as _read_manifest
from flowdistill.data.tensor_cache import write_cache as _write_store

NEGATIVE = "negative.safetensors"
PROMPTS = "prompts.jsonl"
HOW = "flowdistill embed PIPELINE_DIR PROMPTS --out DIR"
#: the pipeline caches raise the store's error (one class, so callers catch either name)
EmbeddingCacheError = TensorCacheError


def read_cache_manifest(root: str | os.PathLike, fmt: str) -> dict:
    """The manifest of the cache at ``root``, checked to be of format ``fmt``."""
    return _read_manifest(root, fmt, f"`{HOW}`")


def write_cache(root: str | os.PathLike, header: dict, items: Sequence[dict], negative: dict[str, Tensor],
                encode: Callable[[int, int], dict[str, Tensor]], *, rank: int = 0, world: int = 1,
                resume: bool = False, progress: bool = True, desc: str = "embed") -> Path:
    """Write a sharded cache of ``len(items)`` rows at ``root`` (see the module docstring).

    ``header``: the settings (``format``, ``shard_size``, ``batch_size``, ``fields``, identity...);
    ``items``: one JSON-able dict per row (written to ``prompts.jsonl``); ``negative``: the batch-1
    negative embeddings; ``encode(start, stop)``: the fields of rows ``start … stop − 1`` (called on
    fixed batches of ``header["batch_size"]`` rows inside each shard). Returns ``root``.
    """
    def write_negative(root: Path) -> None:
        """The negative prompt's embeddings, batch 1."""
        with atomic_file(root / NEGATIVE) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in sorted(negative.items())}, str(tmp))

    return _write_store(root, header, len(items), encode, items=items, items_file=PROMPTS,
                        extra_files=write_negative, rank=rank, world=world, resume=resume,
                        progress=progress, desc=desc)


class EmbeddingCache(TensorCache):
    """A complete cache read row by row: ``len()``, ``get_many(idx)``, ``negative()``, ``prompts``
    (the generic reader :class:`~flowdistill.data.tensor_cache.TensorCache` plus the negative and
    the prompt list)."""

    ITEMS_FILE = PROMPTS
    HOW = "`flowdistill embed ...`"

    def __init__(self, root: str | os.PathLike):
        super().__init__(root)
        self._prompts: list[str] | None = None

    def negative(self) -> dict[str, Tensor]:
        """The negative prompt's embeddings, batch 1 (for classifier-free guidance)."""
        return load_file(str(self.root / NEGATIVE))

    @property
    def prompts(self) -> list[str]:
        """The prompts (captions), in cache order."""
        if self._prompts is None:
            self._prompts = [it["prompt"] for it in self.items]
        return self._prompts


__all__ = ["NEGATIVE", "PROMPTS", "EmbeddingCache", "EmbeddingCacheError", "dtype_name", "fields_of",
           "read_cache_manifest", "write_cache"]
