"""The on-disk format of a coupling store (:mod:`flowdistill.data.couplings`): its constants, shard
names, seeds and hashes, and the atomic writes of shards and of the locked manifest."""

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
from safetensors.torch import save_file
from torch import Tensor, nn

from flowdistill.atomic import atomic_file, atomic_write_json
from flowdistill.errors import FlowDistillError

FORMAT = "flowdistill-couplings/1"
MANIFEST = "manifest.json"
LOCK = "manifest.lock"
META_KEY = "flowdistill_coupling"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

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
