"""Coupling shards on disk: the ``(ε, x, c)`` pairs that reflow and InstaFlow train on.

A coupling is a noise draw ``ε ~ N(0, I)`` (with a condition ``c``) together with the teacher's
ODE solution ``x = ODE_T(ε; 1 → 0)`` (Rectified Flow / InstaFlow, arXiv 2309.06380; rfpp,
arXiv 2405.20320). This module is the *store*: its layout, the manifest, checksums, atomic writes,
and the readers that verify what they load. Generating couplings lives in
:mod:`flowdistill.data.coupling_generation` (from a ready field; :func:`flowdistill.api.couple`
builds the field from a job).

Layout of a coupling directory::

    ROOT/manifest.json                   header + the list of complete shards
    ROOT/manifest.lock                   advisory lock for concurrent manifest updates
    ROOT/shard-000000.safetensors        tensors "noise" [n, *shape], "sample" [n, *shape],
    ROOT/shard-000001.safetensors        "cond" [n] (int64, conditional stores only)
    ...

Shard ``k`` holds the pairs ``k·shard_size … min((k+1)·shard_size, n_pairs) − 1``; its noise (and
conditions) come from a generator seeded by :func:`shard_seed` ``(seed, k)`` alone, so a store is
the same whichever process wrote which shard. Each shard carries its own safetensors metadata
(teacher hashes, seed, index, count), and the manifest records its sha256 and shape.

**Atomicity.** A shard is written to a temporary name, fsynced and renamed; only then is it added
to the manifest, which is itself rewritten through a temporary file and a rename under an
``fcntl`` lock (several processes add shards concurrently). A kill at any moment therefore leaves
a manifest that lists only complete shards; an unlisted or mismatching shard file is regenerated
on resume.

**Readers** (:class:`CouplingStore`, :class:`CouplingSource`, :class:`CouplingStream`) verify
every shard they open — checksum, tensor names and shapes, the teacher hash in its metadata — and
raise :class:`CouplingError` naming the shard file when anything is off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from flowdistill.atomic import atomic_file, atomic_write_json
from flowdistill.data.sources import IndexedSource
from flowdistill.errors import FlowDistillError

FORMAT = "flowdistill-couplings/1"
MANIFEST = "manifest.json"
LOCK = "manifest.lock"
META_KEY = "flowdistill_coupling"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: safetensors header dtype names of the tensors a shard may hold.
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                       "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

try:  # POSIX advisory locks; elsewhere manifest updates are unlocked (single process)
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]


class CouplingError(FlowDistillError):
    """A coupling store or shard is missing, incomplete, corrupt, or from another teacher."""


# -- names, seeds and hashes ---------------------------------------------------------------
def shard_name(index: int) -> str:
    """``shard-000003.safetensors``."""
    return f"shard-{index:06d}.safetensors"


def shard_seed(seed: int, index: int) -> int:
    """Seed of shard ``index``'s generator: 63 bits of ``sha256("seed:index")``.

    A hash rather than an affine mix, so ``(seed, index)`` pairs never collide in practice (with
    ``seed·M + index`` seed 1 shard 0 would equal seed 0 shard M).
    """
    h = hashlib.sha256(f"flowdistill-couplings:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def shard_count(index: int, n_pairs: int, shard_size: int) -> int:
    """Number of pairs in shard ``index`` (the last one may be short)."""
    return max(0, min(shard_size, n_pairs - index * shard_size))


def num_shards(n_pairs: int, shard_size: int) -> int:
    """``ceil(n_pairs / shard_size)``."""
    return math.ceil(n_pairs / shard_size)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_sha256(obj: nn.Module | dict[str, Tensor]) -> str:
    """Content digest of a module's (or state dict's) tensors: names, dtypes, shapes and bytes.

    Unlike :func:`file_sha256` of the weights file it does not depend on how the file was
    serialised, so a distiller can check a loaded teacher against the store's manifest.
    """
    sd = obj.state_dict() if isinstance(obj, nn.Module) else obj
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def weights_file_sha256(model_dir: str | os.PathLike) -> str:
    """sha256 of a saved model's weights: its single ``*.safetensors`` file (several: a hash of
    their sorted ``name:sha256`` lines)."""
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CouplingError(f"no *.safetensors weights file in {d}")
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{f.name}:{file_sha256(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


# -- atomic writes (flowdistill.atomic) -------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_manifest(path: Path, obj: Any) -> None:
    """Write a manifest atomically, in one canonical form (sorted keys), so equal stores are equal
    byte for byte."""
    atomic_write_json(path, obj, indent=1, sort_keys=True)


def write_shard(root: Path, index: int, tensors: dict[str, Tensor], metadata: dict[str, str]) -> dict:
    """Write shard ``index`` atomically (temp name, fsync, rename) and return its manifest record.

    The record (file name, count, sha256, per-tensor shapes) is what :func:`add_shard` lists.
    """
    path = root / shard_name(index)
    with atomic_file(path) as tmp:
        # One metadata key holding sorted JSON: safetensors keeps metadata in a hash map whose order
        # changes from process to process, which would make identical shards differ in bytes.
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={META_KEY: json.dumps(metadata, sort_keys=True)})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; shards are shared data
        digest = file_sha256(tmp)
    count = int(next(iter(tensors.values())).shape[0])
    return {"index": int(index), "file": path.name, "count": count, "sha256": digest,
            "shapes": {k: list(v.shape) for k, v in sorted(tensors.items())}}


@contextlib.contextmanager
def manifest_lock(root: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``ROOT/manifest.lock`` (a no-op where ``fcntl`` is missing)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(root / LOCK, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def load_json_manifest(root: str | os.PathLike, fmt: str, error: type[Exception], missing: str) -> dict:
    """The JSON manifest of the sharded store at ``root``, checked to be of format ``fmt``; a
    missing, corrupt or foreign one raises ``error`` (``missing``: what the user should do)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise error(f"{root} holds no {missing}")
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path} is corrupt: {e}") from None
    if man.get("format") != fmt:
        raise error(f"{path}: unknown format {man.get('format')!r} (expected {fmt!r})")
    return man


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of the store at ``root`` (a :class:`CouplingError` if missing or unreadable)."""
    return load_json_manifest(root, FORMAT, CouplingError, f"coupling store ({MANIFEST} missing); "
                              f"generate it with `flowdistill couple CONFIG`")


def update_manifest(root: Path, fn: Callable[[dict], dict]) -> dict:
    """Read–modify–write the manifest atomically under the lock; returns the new manifest."""
    with manifest_lock(root):
        man = fn(read_manifest(root))
        write_manifest(root / MANIFEST, man)
    return man


def add_shard(root: Path, record: dict) -> None:
    """List a complete shard in the manifest (replacing an older record of the same index)."""

    def fn(man: dict) -> dict:
        shards = [s for s in man["shards"] if s["index"] != record["index"]] + [record]
        man["shards"] = sorted(shards, key=lambda s: s["index"])
        return man

    update_manifest(root, fn)


def drop_shards(root: Path, indices: set[int]) -> None:
    """Remove records from the manifest (before their shards are regenerated)."""
    if indices:
        def fn(man: dict) -> dict:
            man["shards"] = [s for s in man["shards"] if s["index"] not in indices]
            man["complete"] = False
            return man

        update_manifest(root, fn)


# -- reading -----------------------------------------------------------------------------
class CouplingStore:
    """A verified view of a coupling directory.

    Opening checks the manifest: the format, that it is complete (``require_complete``) and that
    every shard ``0 … num_shards − 1`` is listed with the expected count; ``teacher_sha256`` /
    ``teacher_state_sha256`` (if given) must equal the manifest's, so couplings of another
    teacher are refused. :meth:`load_shard` verifies each shard it reads.
    """

    def __init__(self, root: str | os.PathLike, teacher_sha256: str | None = None,
                 teacher_state_sha256: str | None = None, require_complete: bool = True):
        self.root = Path(root)
        self.manifest = man = read_manifest(self.root)
        for key, want in (("teacher_sha256", teacher_sha256), ("teacher_state_sha256", teacher_state_sha256)):
            if want is not None and man.get(key) != want:
                raise CouplingError(
                    f"couplings in {self.root} were generated by another teacher "
                    f"({key} {str(man.get(key))[:12]}…, expected {want[:12]}…); regenerate them "
                    f"with `flowdistill couple CONFIG` for this teacher")
        self.sample_shape: tuple[int, ...] = tuple(man["sample_shape"])
        self.n_pairs, self.shard_size = int(man["n_pairs"]), int(man["shard_size"])
        self.conditional, self.num_classes = bool(man["conditional"]), int(man["num_classes"])
        self.dtype = STORAGE_DTYPES[man["dtype"]]
        self.records = {int(s["index"]): s for s in man["shards"]}
        if require_complete:
            want_n = num_shards(self.n_pairs, self.shard_size)
            missing = [k for k in range(want_n) if k not in self.records]
            if missing or not man.get("complete", False):
                raise CouplingError(
                    f"coupling store {self.root} is incomplete ({want_n - len(missing)} of {want_n} shards, "
                    f"first missing {shard_name(missing[0]) if missing else 'none'}); finish it with "
                    f"`flowdistill couple CONFIG --resume`")
            for k in range(want_n):
                c, want_c = int(self.records[k]["count"]), shard_count(k, self.n_pairs, self.shard_size)
                if c != want_c:
                    raise CouplingError(f"coupling shard {self.root / shard_name(k)}: manifest lists "
                                        f"{c} pairs, expected {want_c}")

    @property
    def indices(self) -> list[int]:
        """Indices of the listed shards, ascending."""
        return sorted(self.records)

    def shard_path(self, index: int) -> Path:
        """Path of shard ``index``."""
        return self.root / shard_name(index)

    def _bad(self, index: int, msg: str) -> CouplingError:
        return CouplingError(f"coupling shard {self.shard_path(index)}: {msg}; regenerate it with "
                             f"`flowdistill couple CONFIG --resume`")

    def open_shard(self, index: int, verify: bool = True) -> Any:
        """Shard ``index`` opened with ``safe_open`` (memory-mapped, no tensor read), verified.

        Checks: the file exists; its sha256 equals the record's (``verify``); its metadata names the
        manifest's teacher and this index; ``noise`` and ``sample`` are ``[count, *sample_shape]`` of
        the store's dtype; ``cond`` is ``[count]`` int64 exactly when the store is conditional.
        Names, shapes and dtypes come from the safetensors header, so opening reads no tensor data.
        """
        if index not in self.records:
            raise CouplingError(f"coupling shard {self.shard_path(index)} is not listed in the manifest")
        rec, path = self.records[index], self.shard_path(index)
        if not path.is_file():
            raise self._bad(index, "file missing")
        if verify:
            digest = file_sha256(path)
            if digest != rec["sha256"]:
                raise self._bad(index, f"checksum mismatch (file sha256 {digest[:12]}…, "
                                       f"manifest {rec['sha256'][:12]}…)")
        try:
            f = safe_open(str(path), framework="pt")
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
            heads = {k: f.get_slice(k) for k in f.keys()}
            shapes = {k: list(h.get_shape()) for k, h in heads.items()}
            dtypes = {k: _SAFETENSORS_DTYPES.get(h.get_dtype(), h.get_dtype()) for k, h in heads.items()}
        except Exception as e:  # safetensors raises its own error types for truncated files
            first = str(e).splitlines()[0] if str(e) else ""
            raise self._bad(index, f"unreadable ({type(e).__name__}: {first})") from None
        for key in ("teacher_sha256", "teacher_state_sha256"):
            if meta.get(key) != self.manifest.get(key):
                raise self._bad(index, f"made by another teacher ({key} {str(meta.get(key))[:12]}…, "
                                       f"store {str(self.manifest.get(key))[:12]}…)")
        if meta.get("index") != str(index):
            raise self._bad(index, f"holds shard index {meta.get('index')!r}, expected {index}")
        count = int(rec["count"])
        want = {"noise": [count, *self.sample_shape], "sample": [count, *self.sample_shape]}
        if self.conditional:
            want["cond"] = [count]
        if set(shapes) != set(want):
            raise self._bad(index, f"tensors {sorted(shapes)}, expected {sorted(want)}")
        for k, shape in want.items():
            if shapes[k] != shape:
                raise self._bad(index, f"tensor {k!r} has shape {shapes[k]}, expected {shape}")
            dt = torch.int64 if k == "cond" else self.dtype
            if dtypes[k] != dt:
                raise self._bad(index, f"tensor {k!r} has dtype {dtypes[k]}, expected {dt}")
        return f

    def load_shard(self, index: int, verify: bool = True) -> dict[str, Tensor]:
        """All tensors of shard ``index`` (CPU), verified as :meth:`open_shard` describes."""
        f = self.open_shard(index, verify)
        try:
            return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise self._bad(index, f"unreadable ({type(e).__name__}: {first})") from None

    def verify(self) -> None:
        """Load and verify every listed shard."""
        for k in self.indices:
            self.load_shard(k)

    def load_all(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """All pairs concatenated in shard order: ``noise``, ``sample`` (as ``dtype``), ``cond``."""
        parts = [self.load_shard(k) for k in self.indices]
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        for k in ("noise", "sample"):
            out[k] = out[k].to(dtype)
        return out


class CouplingSource(IndexedSource):
    """Coupled pairs as a map-style source, read lazily from the store, shard by shard.

    Pair ``i`` is row ``i`` of the shards concatenated in index order (as :meth:`CouplingStore.load_all`).
    Nothing is read at construction; a batch opens only the shards its rows fall in (memory-mapped
    with ``safe_open``, each verified by :meth:`CouplingStore.open_shard` the first time this
    process opens it) and reads only those rows. Items ``{"x": sample, "noise": ε[, "cond": c]}``,
    float32 (``cond`` long). Batches are drawn by :meth:`local_batch` like any indexed source, so
    they do not depend on the number of processes or DataLoader workers.
    """

    def __init__(self, store: CouplingStore):
        self.store = store
        self.conditional = store.conditional
        self.num_classes = store.num_classes if self.conditional else 0
        self.sample_shape = tuple(store.sample_shape)
        self._shards = store.indices
        counts = torch.tensor([int(store.records[k]["count"]) for k in self._shards], dtype=torch.long)
        self._ends = torch.cumsum(counts, 0)
        self._starts = self._ends - counts
        self._open: dict[int, Any] = {}  # shard index -> verified safe_open handle (this process)

    def __len__(self) -> int:
        """Number of pairs in the listed shards."""
        return int(self._ends[-1]) if len(self._shards) else 0

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without open file handles (a DataLoader worker reopens and re-verifies)."""
        state = self.__dict__.copy()
        state["_open"] = {}
        return state

    def _handle(self, index: int) -> Any:
        if index not in self._open:
            self._open[index] = self.store.open_shard(index)
        return self._open[index]

    def _rows(self, index: int, rows: Tensor) -> dict[str, Tensor]:
        """Rows ``rows`` (sorted, unique) of shard ``index``, read as contiguous runs."""
        f = self._handle(index)
        keys = ("noise", "sample", "cond") if self.conditional else ("noise", "sample")
        breaks = (torch.nonzero(rows[1:] != rows[:-1] + 1).flatten() + 1).tolist()
        bounds = list(zip([0, *breaks], [*breaks, len(rows)], strict=True))
        out = {}
        for k in keys:
            sl = f.get_slice(k)
            out[k] = torch.cat([sl[int(rows[a]):int(rows[b - 1]) + 1] for a, b in bounds])
        return out

    def get_many(self, idx: Tensor) -> dict[str, Tensor]:
        """Pairs ``idx`` (global indices), reading each touched shard's rows once."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"coupling index out of range [0, {len(self)})")
        pos = torch.searchsorted(self._ends, idx, right=True)
        local = idx - self._starts[pos]
        x = torch.empty(len(idx), *self.sample_shape)
        noise = torch.empty(len(idx), *self.sample_shape)
        cond = torch.empty(len(idx), dtype=torch.long) if self.conditional else None
        for p in torch.unique(pos).tolist():
            sel = torch.nonzero(pos == p).flatten()
            rows, inv = torch.unique(local[sel], return_inverse=True)
            got = self._rows(self._shards[p], rows)
            x[sel] = got["sample"][inv].float()
            noise[sel] = got["noise"][inv].float()
            if cond is not None:
                cond[sel] = got["cond"][inv]
        out = {"x": x, "noise": noise}
        if cond is not None:
            out["cond"] = cond
        return out

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        """Pair ``i``."""
        return {k: v[0] for k, v in self.get_many(torch.tensor([int(i)])).items()}


class CouplingStream(torch.utils.data.IterableDataset):
    """Streams pairs shard by shard, for stores larger than memory (``torch.utils.data.DataLoader``).

    Each epoch visits the shards in an order seeded by ``(seed, epoch)``; shard ``order[i]`` goes
    to process ``i mod world`` and, within it, to DataLoader worker ``(i // world) mod workers``;
    pairs are shuffled within a shard. Every shard is verified when loaded. Yields dicts
    ``{"x", "noise"[, "cond"]}`` of single pairs (let the DataLoader batch them).
    """

    def __init__(self, store: CouplingStore, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True):
        super().__init__()
        if not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        self.store, self.rank, self.world, self.seed, self.shuffle = store, rank, world, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch``."""
        self.epoch = int(epoch)

    def _my_shards(self) -> list[int]:
        idx = self.store.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(shard_seed(self.seed, 1_000_000 + self.epoch))
            idx = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
        mine = idx[self.rank :: self.world]
        info = torch.utils.data.get_worker_info()
        if info is not None:
            mine = mine[info.id :: info.num_workers]
        return mine

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for k in self._my_shards():
            sh = self.store.load_shard(k)
            n = sh["sample"].shape[0]
            if self.shuffle:
                g = torch.Generator().manual_seed(shard_seed(self.seed + 7919 * (self.epoch + 1), k))
                order = torch.randperm(n, generator=g)
            else:
                order = torch.arange(n)
            for i in order.tolist():
                item = {"x": sh["sample"][i].float(), "noise": sh["noise"][i].float()}
                if "cond" in sh:
                    item["cond"] = sh["cond"][i]
                yield item


__all__ = ["FORMAT", "MANIFEST", "CouplingError", "CouplingSource", "CouplingStore", "CouplingStream",
           "add_shard", "write_manifest", "file_sha256", "read_manifest", "shard_count", "shard_name",
           "shard_seed", "state_sha256", "weights_file_sha256", "write_shard"]
