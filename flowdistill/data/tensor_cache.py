"""Sharded, resumable caches of per-item tensors on disk (the generic store under every cache).

Used by the tokenizer latent cache (:mod:`flowdistill.data.latent_cache`) and by the diffusers
prompt-embedding and VAE-latent caches (:mod:`flowdistill.integrations.diffusers.embedding_store`).
Layout of a cache directory::

    ROOT/manifest.json                 header + the list of complete shards (+ "complete")
    ROOT/manifest.lock                 advisory lock for concurrent manifest updates
    ROOT/ITEMS                         optional: one JSON record per row, in cache order (e.g. prompts.jsonl)
    ROOT/shard-000000.safetensors      rows 0 … shard_size − 1 of every field
    ROOT/shard-000001.safetensors      ...

The manifest header holds what fixes the content — the format, the identity of the encoder (a
digest of its weights), the sha256 of the item list, the shard and batch sizes, encoding options
— and ``fields``: each field's per-item shape and dtype. Shards are written and listed exactly as
coupling shards are (:mod:`flowdistill.data.couplings`: temporary name, fsync, rename, then listed
under a lock), so a kill leaves a manifest that lists only complete shards, and the store is
marked ``complete`` when the last shard is listed.

**Processes.** Rank ``r`` of ``w`` encodes shards ``r, r + w, …``. Rank 0 creates (or reopens) the
store before the others start: under ``torch.distributed`` they wait at a barrier; run in sequence
(rank 0 first) they find it ready. Shard ``k`` is always encoded in the same fixed batches of
``batch_size`` items, so the bytes do not depend on the number of processes or on a resume.
**Resume** keeps every listed shard whose checksum still matches and re-encodes the rest; a
different item list (or encoder, or setting) is refused, naming the differing header key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from flowdistill.atomic import atomic_write_text
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

#: safetensors header dtype names → torch dtype names, for the fields a cache stores.
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                       "I64": "int64", "I32": "int32"}
#: Header keys that are not settings: filled in while writing, or informative (paths the encoder
#: was loaded from; its weights digest is the identity that is checked).
MUTABLE = ("shards", "complete", "pipeline", "tokenizer")


class TensorCacheError(FlowDistillError):
    """A tensor cache is missing, incomplete, corrupt, or made with other settings."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def fields_of(tensors: dict[str, Tensor]) -> dict[str, dict]:
    """Per-item shape and dtype of each field of a batch: ``{name: {"shape": [...], "dtype": ...}}``."""
    return {k: {"shape": list(v.shape[1:]), "dtype": dtype_name(v.dtype)} for k, v in sorted(tensors.items())}


def read_cache_manifest(root: str | os.PathLike, fmt: str, how: str = "") -> dict:
    """The manifest of the cache at ``root``, checked to be of format ``fmt`` (``how``: the command
    that writes one, for the error message)."""
    return load_json_manifest(root, fmt, TensorCacheError,
                              f"cache ({MANIFEST} missing)" + (f"; write it with {how}" if how else ""))


def barrier() -> None:
    """Wait for every process when ``torch.distributed`` runs (a no-op otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def check_same(root: Path, man: dict, header: dict) -> None:
    """Every setting of ``header`` must equal the stored one (``TensorCacheError`` naming the key)."""
    for k in sorted(set(header) | set(man)):
        if k in MUTABLE:
            continue
        if man.get(k) != header.get(k):
            a, b = json.dumps(man.get(k))[:80], json.dumps(header.get(k))[:80]
            raise TensorCacheError(f"the cache in {root} was made with another '{k}' ({a} there, "
                                   f"{b} now); write this one to another --out directory")


def _prepare(root: Path, header: dict, items: Sequence[dict] | None, items_file: str, resume: bool,
             extra_files: Callable[[Path], None] | None) -> None:
    """Rank 0: start a fresh store (item list, extra files, header), or reopen a matching one."""
    root.mkdir(parents=True, exist_ok=True)
    with manifest_lock(root):
        exists = (root / MANIFEST).is_file()
        if exists and not resume:
            raise TensorCacheError(f"{root} already holds a cache; pass --resume to finish it "
                                   f"or choose another --out directory")
        if not exists and resume:
            raise TensorCacheError(f"--resume: {root} holds no cache to resume")
        for tmp in root.glob(".*.tmp-*"):  # leftovers of a killed writer (never listed)
            tmp.unlink(missing_ok=True)
        if exists:
            check_same(root, read_cache_manifest(root, header["format"]), header)
        else:
            for old in root.glob("shard-*.safetensors"):
                old.unlink()
        # the item list and the extra files are deterministic: (re)written atomically either way
        if items is not None:
            atomic_write_text(root / items_file,
                              "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
        if extra_files is not None:
            extra_files(root)
        if not exists:
            write_manifest(root / MANIFEST, {**header, "shards": [], "complete": False})


def update_cache_manifest(root: Path, fmt: str, fn: Callable[[dict], dict]) -> dict:
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


def write_cache(root: str | os.PathLike, header: dict, n_items: int,
                encode: Callable[[int, int], dict[str, Tensor]], *, items: Sequence[dict] | None = None,
                items_file: str = "items.jsonl", extra_files: Callable[[Path], None] | None = None,
                rank: int = 0, world: int = 1, resume: bool = False, progress: bool = True,
                desc: str = "encode") -> Path:
    """Write a sharded cache of ``n_items`` rows at ``root`` (see the module docstring).

    ``header``: the settings (``format``, ``shard_size``, ``batch_size``, ``fields``, identity...);
    ``encode(start, stop)``: the fields of rows ``start … stop − 1`` (called on fixed batches of
    ``header["batch_size"]`` rows inside each shard); ``items``: one JSON-able record per row,
    written to ``ROOT/items_file``; ``extra_files(root)``: writes any other deterministic file
    (rank 0, under the lock, before the manifest exists). Returns ``root``.
    """
    from tqdm.auto import tqdm

    root, fmt = Path(root), header["format"]
    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    if items is not None and len(items) != n_items:
        raise ValueError(f"{len(items)} item records for {n_items} rows")
    n, size, batch = int(n_items), int(header["shard_size"]), int(header["batch_size"])
    header = {**header, "n_items": n}
    if rank == 0:
        _prepare(root, header, items, items_file, resume, extra_files)
    barrier()
    if rank != 0:
        if not (root / MANIFEST).is_file():
            raise TensorCacheError(f"rank {rank}: {root} holds no cache yet; rank 0 creates it (run it "
                                   f"first, or launch all ranks together with torchrun)")
        check_same(root, read_cache_manifest(root, fmt), header)
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

        update_cache_manifest(root, fmt, drop)
    for k in tqdm(todo, desc=f"{desc}[{rank}/{world}]", disable=not (progress and rank == 0),
                  dynamic_ncols=True):
        start, stop = k * size, k * size + shard_count(k, n, size)
        parts = [encode(i, min(i + batch, stop)) for i in range(start, stop, batch)]
        tensors = {f: torch.cat([p[f] for p in parts]).cpu() for f in parts[0]}
        if fields_of(tensors) != header["fields"]:
            raise TensorCacheError(f"shard {k}: encoded fields {fields_of(tensors)} differ from the "
                                   f"header's {header['fields']}")
        rec = write_shard(root, k, tensors, {"format": fmt, "index": str(k), "count": str(stop - start)})

        def add(man: dict, rec: dict = rec) -> dict:
            """List shard ``rec`` (replacing an older record of its index)."""
            man["shards"] = sorted([s for s in man["shards"] if s["index"] != rec["index"]] + [rec],
                                   key=lambda s: s["index"])
            return _mark_if_complete(man)

        update_cache_manifest(root, fmt, add)
    update_cache_manifest(root, fmt, _mark_if_complete)
    barrier()
    return root


class TensorCache:
    """A complete cache read row by row: ``len()``, ``get_many(idx)``, ``items``.

    Opening checks the manifest (format, complete, every shard listed with its count); a shard is
    verified (sha256, field names, shapes and dtypes against the header's ``fields``) the first
    time this process opens it, and read memory-mapped, only the rows asked for. Subclasses set
    ``FORMAT``, ``ITEMS_FILE`` and ``HOW`` (the command that writes or finishes the cache).
    """

    FORMAT = ""
    ITEMS_FILE = "items.jsonl"
    HOW = ""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.manifest = man = read_cache_manifest(self.root, self.FORMAT, self.HOW)
        if not man.get("complete"):
            raise TensorCacheError(f"the cache in {self.root} is incomplete ({len(man['shards'])} of "
                                   f"{num_shards(man['n_items'], man['shard_size'])} shards); finish it "
                                   f"with {self.HOW or 'its writer'} --resume")
        self.fields: dict[str, dict] = man["fields"]
        self.records = {int(s["index"]): s for s in man["shards"]}
        counts = torch.tensor([int(self.records[k]["count"]) for k in sorted(self.records)], dtype=torch.long)
        self._ends = torch.cumsum(counts, 0)
        self._starts = self._ends - counts
        self._open: dict[int, Any] = {}

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
            raise TensorCacheError(f"cache shard {path} is missing or its checksum differs from the "
                                   f"manifest; rewrite it with {self.HOW or 'its writer'} --resume")
        f = safe_open(str(path), framework="pt")
        for name, spec in self.fields.items():
            head = f.get_slice(name) if name in f.keys() else None
            if head is None or list(head.get_shape()) != [rec["count"], *spec["shape"]] \
                    or _SAFETENSORS_DTYPES.get(head.get_dtype()) != spec["dtype"]:
                raise TensorCacheError(f"cache shard {path}: field {name!r} missing or not "
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

    @property
    def items(self) -> list[dict]:
        """The rows' records from the item file (empty when the cache keeps none)."""
        path = self.root / self.ITEMS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]


__all__ = ["MUTABLE", "TensorCache", "TensorCacheError", "barrier", "check_same", "dtype_name", "fields_of",
           "read_cache_manifest", "update_cache_manifest", "write_cache"]
