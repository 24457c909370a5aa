"""Sharded, resumable caches of per-item tensors: prompt embeddings and VAE latents on disk.

Layout of a cache directory (the prompt cache of :mod:`.prompt_cache`, the latent cache of
:mod:`.latent_cache`)::

    ROOT/manifest.json                 header + the list of complete shards (+ "complete")
    ROOT/manifest.lock                 advisory lock for concurrent manifest updates
    ROOT/prompts.jsonl                 the prompts (captions), one {"prompt": ...} a line, in cache order
    ROOT/negative.safetensors          the negative prompt's embeddings, batch 1 (classifier-free guidance)
    ROOT/shard-000000.safetensors      rows 0 … shard_size − 1 of every field ("prompt_embeds" [n, L, D],
    ROOT/shard-000001.safetensors      "pooled_prompt_embeds" [n, P], "latents" [n, C, h, w], ...)

The manifest header holds what fixes the content — the format, the pipeline class and the
identity of the encoders (a digest of their weights), the sha256 of the item list, the shard and
batch sizes, the negative prompt, encoding options — and ``fields``: each field's per-item shape
and dtype. Shards are written and listed exactly as coupling shards are
(:mod:`flowdistill.data.couplings`: temporary name, fsync, rename, then listed under a lock), so a
kill leaves a manifest that lists only complete shards, and the store is marked ``complete`` when
the last shard is listed.

**Processes.** Rank ``r`` of ``w`` encodes shards ``r, r + w, …``. Rank 0 creates (or reopens) the
store before the others start: under ``torch.distributed`` they wait at a barrier; run in sequence
(rank 0 first) they find it ready. Shard ``k`` is always encoded in the same fixed batches of
``batch_size`` items, so the bytes do not depend on the number of processes or on a resume.
**Resume** keeps every listed shard whose checksum still matches and re-encodes the rest; a
different item list (or pipeline, or setting) is refused, naming the differing header key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from flowdistill.atomic import atomic_file, atomic_write_text
from flowdistill.data.couplings import (
    MANIFEST,
    file_sha256,
    load_json_manifest,
    manifest_lock,
    num_shards,
    shard_count,
    shard_name,
    write_manifest,
    write_shard,
)
from flowdistill.errors import FlowDistillError

NEGATIVE = "negative.safetensors"
PROMPTS = "prompts.jsonl"
#: safetensors header dtype names → torch dtype names, for the fields a cache stores.
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
#: Header keys that are not settings: filled in while writing, or informative (the path the
#: pipeline was loaded from; its encoders' weights digest is the identity that is checked).
_MUTABLE = ("shards", "complete", "pipeline")


class EmbeddingCacheError(FlowDistillError):
    """A prompt or latent cache is missing, incomplete, corrupt, or made with other settings."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def fields_of(tensors: dict[str, Tensor]) -> dict[str, dict]:
    """Per-item shape and dtype of each field of a batch: ``{name: {"shape": [...], "dtype": ...}}``."""
    return {k: {"shape": list(v.shape[1:]), "dtype": dtype_name(v.dtype)} for k, v in sorted(tensors.items())}


def read_cache_manifest(root: str | os.PathLike, fmt: str) -> dict:
    """The manifest of the cache at ``root``, checked to be of format ``fmt``."""
    return load_json_manifest(root, fmt, EmbeddingCacheError,
                              f"cache ({MANIFEST} missing); write it with "
                              f"`flowdistill embed PIPELINE_DIR PROMPTS --out {root}`")


def _barrier() -> None:
    """Wait for every process when ``torch.distributed`` runs (a no-op otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _check_same(root: Path, man: dict, header: dict) -> None:
    """Every setting of ``header`` must equal the stored one (``EmbeddingCacheError`` naming the key)."""
    for k in sorted(set(header) | set(man)):
        if k in _MUTABLE:
            continue
        if man.get(k) != header.get(k):
            a, b = json.dumps(man.get(k))[:80], json.dumps(header.get(k))[:80]
            raise EmbeddingCacheError(f"the cache in {root} was made with another '{k}' ({a} there, "
                                      f"{b} now); write this one to another --out directory")


def _prepare(root: Path, header: dict, items: Sequence[dict], negative: dict[str, Tensor],
             resume: bool) -> None:
    """Rank 0: start a fresh store (item list, negative, header), or reopen a matching one."""
    root.mkdir(parents=True, exist_ok=True)
    with manifest_lock(root):
        exists = (root / MANIFEST).is_file()
        if exists and not resume:
            raise EmbeddingCacheError(f"{root} already holds a cache; pass --resume to finish it "
                                      f"or choose another --out directory")
        if not exists and resume:
            raise EmbeddingCacheError(f"--resume: {root} holds no cache to resume")
        for tmp in root.glob(".*.tmp-*"):  # leftovers of a killed writer (never listed)
            tmp.unlink(missing_ok=True)
        if exists:
            _check_same(root, read_cache_manifest(root, header["format"]), header)
        else:
            for old in root.glob("shard-*.safetensors"):
                old.unlink()
        # the item list and the negative are deterministic: (re)written atomically either way
        atomic_write_text(root / PROMPTS, "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
        with atomic_file(root / NEGATIVE) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in sorted(negative.items())}, str(tmp))
        if not exists:
            write_manifest(root / MANIFEST, {**header, "shards": [], "complete": False})


def _update(root: Path, fmt: str, fn: Callable[[dict], dict]) -> dict:
    """Read–modify–write the manifest under the lock."""
    with manifest_lock(root):
        man = fn(read_cache_manifest(root, fmt))
        write_manifest(root / MANIFEST, man)
    return man


def _mark_if_complete(man: dict) -> dict:
    """Set ``complete`` once every shard is listed with its full count."""
    recs = {s["index"]: s for s in man["shards"]}
    n, size = int(man["n_items"]), int(man["shard_size"])
    man["complete"] = all(k in recs and recs[k]["count"] == shard_count(k, n, size)
                          for k in range(num_shards(n, size)))
    return man


def write_cache(root: str | os.PathLike, header: dict, items: Sequence[dict], negative: dict[str, Tensor],
                encode: Callable[[int, int], dict[str, Tensor]], *, rank: int = 0, world: int = 1,
                resume: bool = False, progress: bool = True, desc: str = "embed") -> Path:
    """Write a sharded cache of ``len(items)`` rows at ``root`` (see the module docstring).

    ``header``: the settings (``format``, ``shard_size``, ``batch_size``, ``fields``, identity...);
    ``items``: one JSON-able dict per row (written to ``prompts.jsonl``); ``negative``: the batch-1
    negative embeddings; ``encode(start, stop)``: the fields of rows ``start … stop − 1`` (called on
    fixed batches of ``header["batch_size"]`` rows inside each shard). Returns ``root``.
    """
    from tqdm.auto import tqdm

    root, fmt = Path(root), header["format"]
    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    n, size, batch = len(items), int(header["shard_size"]), int(header["batch_size"])
    header = {**header, "n_items": n}
    if rank == 0:
        _prepare(root, header, items, negative, resume)
    _barrier()
    if rank != 0:
        if not (root / MANIFEST).is_file():
            raise EmbeddingCacheError(f"rank {rank}: {root} holds no cache yet; rank 0 creates it (run it "
                                      f"first, or launch all ranks together with torchrun)")
        _check_same(root, read_cache_manifest(root, fmt), header)
    records = {s["index"]: s for s in read_cache_manifest(root, fmt)["shards"]}
    todo = []
    for k in range(rank, num_shards(n, size), world):
        rec, path = records.get(k), root / shard_name(k)
        if not (rec is not None and rec["count"] == shard_count(k, n, size) and path.is_file()
                and file_sha256(path) == rec["sha256"]):
            todo.append(k)
    if any(k in records for k in todo):  # never list a shard being rewritten
        def drop(man: dict) -> dict:
            """Unlist the shards about to be rewritten."""
            man["shards"] = [s for s in man["shards"] if s["index"] not in todo]
            man["complete"] = False
            return man

        _update(root, fmt, drop)
    for k in tqdm(todo, desc=f"{desc}[{rank}/{world}]", disable=not (progress and rank == 0),
                  dynamic_ncols=True):
        start, stop = k * size, k * size + shard_count(k, n, size)
        parts = [encode(i, min(i + batch, stop)) for i in range(start, stop, batch)]
        tensors = {f: torch.cat([p[f] for p in parts]).cpu() for f in parts[0]}
        if fields_of(tensors) != header["fields"]:
            raise EmbeddingCacheError(f"shard {k}: encoded fields {fields_of(tensors)} differ from the "
                                      f"header's {header['fields']}")
        rec = write_shard(root, k, tensors, {"format": fmt, "index": str(k), "count": str(stop - start)})

        def add(man: dict, rec: dict = rec) -> dict:
            """List shard ``rec`` (replacing an older record of its index)."""
            man["shards"] = sorted([s for s in man["shards"] if s["index"] != rec["index"]] + [rec],
                                   key=lambda s: s["index"])
            return _mark_if_complete(man)

        _update(root, fmt, add)
    _update(root, fmt, _mark_if_complete)
    _barrier()
    return root


class EmbeddingCache:
    """A complete cache read row by row: ``len()``, ``get_many(idx)``, ``negative()``, ``prompts``.

    Opening checks the manifest (format, complete, every shard listed with its count); a shard is
    verified (sha256, field names, shapes and dtypes against the header's ``fields``) the first
    time this process opens it, and read memory-mapped, only the rows asked for.
    """

    FORMAT = ""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.manifest = man = read_cache_manifest(self.root, self.FORMAT)
        if not man.get("complete"):
            raise EmbeddingCacheError(f"the cache in {self.root} is incomplete ({len(man['shards'])} of "
                                      f"{num_shards(man['n_items'], man['shard_size'])} shards); finish it "
                                      f"with `flowdistill embed ... --resume`")
        self.fields: dict[str, dict] = man["fields"]
        self.records = {int(s["index"]): s for s in man["shards"]}
        counts = torch.tensor([int(self.records[k]["count"]) for k in sorted(self.records)], dtype=torch.long)
        self._ends = torch.cumsum(counts, 0)
        self._starts = self._ends - counts
        self._open: dict[int, Any] = {}
        self._prompts: list[str] | None = None

    def __len__(self) -> int:
        """Number of cached rows."""
        return int(self.manifest["n_items"])

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without open file handles (a DataLoader worker reopens and re-verifies)."""
        return {**self.__dict__, "_open": {}}

    def _handle(self, k: int) -> Any:
        """Shard ``k`` opened with ``safe_open``, verified on first use."""
        if k in self._open:
            return self._open[k]
        path, rec = self.root / shard_name(k), self.records[k]
        if not path.is_file() or file_sha256(path) != rec["sha256"]:
            raise EmbeddingCacheError(f"cache shard {path} is missing or its checksum differs from the "
                                      f"manifest; rewrite it with `flowdistill embed ... --resume`")
        f = safe_open(str(path), framework="pt")
        for name, spec in self.fields.items():
            head = f.get_slice(name) if name in f.keys() else None
            if head is None or list(head.get_shape()) != [rec["count"], *spec["shape"]] \
                    or _SAFETENSORS_DTYPES.get(head.get_dtype()) != spec["dtype"]:
                raise EmbeddingCacheError(f"cache shard {path}: field {name!r} missing or not "
                                          f"{spec['dtype']} {[rec['count'], *spec['shape']]}")
        self._open[k] = f
        return f

    def get_many(self, idx: Tensor) -> dict[str, Tensor]:
        """Rows ``idx`` of every field (CPU, stored dtype), in the order of ``idx``."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"cache index out of range [0, {len(self)})")
        pos = torch.searchsorted(self._ends, idx, right=True)
        local = idx - self._starts[pos]
        out = {name: torch.empty(len(idx), *spec["shape"], dtype=getattr(torch, spec["dtype"]))
               for name, spec in self.fields.items()}
        for p in torch.unique(pos).tolist():
            sel = torch.nonzero(pos == p).flatten()
            f = self._handle(sorted(self.records)[p])
            lo, hi = int(local[sel].min()), int(local[sel].max()) + 1
            for name in self.fields:
                out[name][sel] = f.get_slice(name)[lo:hi][local[sel] - lo]
        return out

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        """Row ``i``."""
        return {k: v[0] for k, v in self.get_many(torch.tensor([int(i)])).items()}

    def negative(self) -> dict[str, Tensor]:
        """The negative prompt's embeddings, batch 1 (for classifier-free guidance)."""
        return load_file(str(self.root / NEGATIVE))

    @property
    def items(self) -> list[dict]:
        """The rows' records from ``prompts.jsonl`` (``{"prompt": ...}`` [+ ``"image"``])."""
        lines = (self.root / PROMPTS).read_text().splitlines()
        return [json.loads(line) for line in lines if line]

    @property
    def prompts(self) -> list[str]:
        """The prompts (captions), in cache order."""
        if self._prompts is None:
            self._prompts = [it["prompt"] for it in self.items]
        return self._prompts


__all__ = ["NEGATIVE", "PROMPTS", "EmbeddingCache", "EmbeddingCacheError", "dtype_name", "fields_of",
           "read_cache_manifest", "write_cache"]
