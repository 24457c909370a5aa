"""Prompt-embedding cache: a prompts file → the pipeline's own text embeddings, sharded on disk.

Data-free distillation (FreeFlow) needs only conditions: encoding the prompts once with the
teacher pipeline's ``encode_prompt`` (:mod:`.text_encoding`) lets training run without the text
encoders in memory. ``encode_prompts`` writes the cache (layout, atomicity, multi-process split and
resume: :mod:`.embedding_store`); ``PromptEmbeddingStore`` reads it::

    ROOT/manifest.json  ROOT/prompts.jsonl  ROOT/negative.safetensors  ROOT/shard-000000.safetensors …

Fields: ``prompt_embeds`` [n, L, D] and, for SD3 and Flux, ``pooled_prompt_embeds`` [n, P];
``negative.safetensors`` holds the same fields for the negative prompt (default ``""``, the
unconditional embedding of classifier-free guidance), batch 1. The manifest also records
``latent_shape`` ([C, h, w] of the denoiser's latent at ``resolution``), which the prior noise
of data-free training takes.

The ``flowdistill embed`` command (:func:`add_embed_parser`, :func:`cmd_embed`) writes a prompt
cache, or with ``--images FOLDER`` a latent cache (:mod:`.latent_cache`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path
from typing import Any

import torch

from flowdistill.errors import ConfigError
from flowdistill.integrations.diffusers.embedding_store import EmbeddingCache, write_cache
from flowdistill.integrations.diffusers.latent_cache import LatentStore, encode_image_folder
from flowdistill.integrations.diffusers.text_encoding import cache_header, encode_text, list_sha256

FORMAT = "flowdistill-prompt-embeddings/1"


def read_prompts(path: str | os.PathLike, key: str = "prompt") -> list[str]:
    """The prompts of a file: ``.txt`` (one a line, blank lines skipped), ``.jsonl`` (the ``key``
    field of each object) or ``.csv`` (the ``key`` column). A ``ConfigError`` naming the file for a
    missing or empty file, a missing key or column, or another extension."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"PROMPTS: no file {p}")
    suffix = p.suffix.lower()
    if suffix == ".txt":
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"PROMPTS: {p} line {i} is not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
                raise ConfigError(f"PROMPTS: {p} line {i} has no string {key!r} field")
            prompts.append(obj[key])
    elif suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or key not in reader.fieldnames:
                raise ConfigError(f"PROMPTS: {p} has no {key!r} column (columns: "
                                  f"{', '.join(reader.fieldnames or []) or 'none'})")
            prompts = [row[key] for row in reader]
    else:
        raise ConfigError(f"PROMPTS: {p} must be .txt (one prompt a line), .jsonl or .csv "
                          f"(a {key!r} field / column)")
    if not prompts:
        raise ConfigError(f"PROMPTS: {p} holds no prompts")
    return prompts


def encode_prompts(pipe: Any, prompts: list[str] | str | os.PathLike, root: str | os.PathLike, *,
                   batch_size: int = 8, negative_prompt: str = "", rank: int = 0, world: int = 1,
                   resume: bool = False, shard_size: int = 1024, max_sequence_length: int | None = None,
                   resolution: int | None = None, progress: bool = True) -> Path:
    """Encode ``prompts`` (a list, or a prompts file for :func:`read_prompts`) with the pipeline's
    own ``encode_prompt`` into a prompt cache at ``root`` (see the module docstring).

    Rank ``rank`` of ``world`` encodes shards ``rank, rank + world, …`` (rank 0 first, or all under
    ``torch.distributed``); ``resume`` finishes an interrupted cache of the same prompts and
    settings. ``max_sequence_length``: T5 tokens (SD3/Flux; default the pipeline's); ``resolution``:
    the image size whose latent shape the manifest records (default the pipeline's). Returns ``root``.
    """
    if not isinstance(prompts, list):
        prompts = read_prompts(prompts)
    if not prompts:
        raise ConfigError("PROMPTS: the prompt list is empty")
    negative = encode_text(pipe, [negative_prompt], max_sequence_length)
    header = cache_header(pipe, FORMAT, negative=negative, negative_prompt=negative_prompt,
                          shard_size=shard_size, batch_size=batch_size,
                          max_sequence_length=max_sequence_length, resolution=resolution)
    header["items_sha256"] = list_sha256(prompts)
    return write_cache(root, header, [{"prompt": p} for p in prompts], negative,
                       lambda a, b: encode_text(pipe, prompts[a:b], max_sequence_length),
                       rank=rank, world=world, resume=resume, progress=progress, desc="embed prompts")


class PromptEmbeddingStore(EmbeddingCache):
    """A complete prompt cache: ``len()``, ``get_many(idx)`` → ``{"prompt_embeds"[,
    "pooled_prompt_embeds"]}``, ``negative()``, ``prompts``, ``manifest``, ``latent_shape``."""

    FORMAT = FORMAT

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(C, h, w)`` of the denoiser's latent at the cache's resolution."""
        return tuple(self.manifest["latent_shape"])


# -- CLI: flowdistill embed -----------------------------------------------------------------------
def add_embed_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register ``flowdistill embed PIPELINE_DIR [PROMPTS] --out ROOT [--images FOLDER] …``."""
    sp = subparsers.add_parser(
        "embed", parents=parents, help="cache a pipeline's prompt embeddings (or image latents) for training",
        description="Encode a prompts file (.txt one a line, .jsonl / .csv with a 'prompt' field) with the "
                    "pipeline's own encode_prompt into a sharded, resumable cache at --out; with --images "
                    "FOLDER encode its images (and same-name .txt captions) to VAE latents instead. "
                    "Under torchrun each process encodes its share of the shards.")
    sp.add_argument("pipeline", metavar="PIPELINE_DIR", help="a diffusers pipeline directory (or hub id)")
    sp.add_argument("prompts", metavar="PROMPTS", nargs="?", default=None,
                    help="prompts file (.txt / .jsonl / .csv); omit with --images")
    sp.add_argument("--out", required=True, metavar="ROOT", help="cache directory to write")
    sp.add_argument("--images", default=None, metavar="FOLDER",
                    help="image-caption folder (NAME.png + NAME.txt) to encode to latents")
    sp.add_argument("--negative-prompt", default="", help="negative prompt for CFG (default: empty)")
    sp.add_argument("--batch-size", type=int, default=8, help="prompts (images) per encoder call")
    sp.add_argument("--shard-size", type=int, default=1024, help="rows per shard file")
    sp.add_argument("--resolution", type=int, default=None,
                    help="image size in pixels (latent cache: images are resized and centre-cropped to it; "
                         "default: the pipeline's default size)")
    sp.add_argument("--max-sequence-length", type=int, default=None,
                    help="T5 tokens for SD3 / Flux (default: the pipeline's)")
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype the encoders run (and the cache is stored) in")
    sp.add_argument("--device", default=None, help="device (default: this process's GPU, else cpu)")
    sp.add_argument("--resume", action="store_true", help="finish an interrupted cache")
    return sp


def _process() -> tuple[int, int, str]:
    """(rank, world, default device) of this process; joins ``torch.distributed`` under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not cuda)
        return state.process_index, state.num_processes, str(state.device)
    return 0, 1, "cuda" if cuda else "cpu"


def load_pipeline(path: str | os.PathLike, dtype: torch.dtype, device: str) -> Any:
    """The pipeline at ``path`` without its denoiser (only the encoders and the VAE are needed); a
    hub id is downloaded first (online), so the denoiser's config is read from the local copy."""
    from diffusers import DiffusionPipeline

    path = str(path)
    if not Path(path).exists():
        if path.startswith(("/", ".", "~")) or path.count("/") != 1:  # not an "org/name" hub id
            raise ConfigError(f"PIPELINE_DIR: no directory {path}")
        path = DiffusionPipeline.download(path)
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"PIPELINE_DIR: {path} is not a diffusers pipeline directory (no model_index.json)")
    comps = json.loads(index.read_text())
    skip = {k: None for k in ("transformer", "unet", "safety_checker") if k in comps}
    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, **skip)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def cmd_embed(args: argparse.Namespace) -> Path:
    """Run ``flowdistill embed`` from parsed arguments; returns the cache directory."""
    if (args.prompts is None) == (args.images is None):
        raise ConfigError("embed: give either PROMPTS (a prompt cache) or --images FOLDER (a latent cache)")
    rank, world, device = _process()
    pipe = load_pipeline(args.pipeline, getattr(torch, args.dtype), args.device or device)
    common = dict(batch_size=args.batch_size, negative_prompt=args.negative_prompt, rank=rank, world=world,
                  resume=args.resume, shard_size=args.shard_size, resolution=args.resolution,
                  max_sequence_length=args.max_sequence_length)
    if args.images is not None:
        root = encode_image_folder(pipe, args.images, args.out, **common)
        store: EmbeddingCache = LatentStore(root)
    else:
        root = encode_prompts(pipe, read_prompts(args.prompts), args.out, **common)
        store = PromptEmbeddingStore(root)
    if rank == 0:
        shapes = ", ".join(f"{k} {v['shape']}" for k, v in store.fields.items())
        print(f"{root}: {len(store)} rows ({shapes}), {len(store.records)} shards")
    return root


__all__ = ["FORMAT", "LatentStore", "PromptEmbeddingStore", "add_embed_parser", "cmd_embed",
           "encode_image_folder", "encode_prompts", "load_pipeline", "read_prompts"]
