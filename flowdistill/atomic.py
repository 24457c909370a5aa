"""Atomic writes: every file or directory flowdistill writes for keeps goes through here.

A write lands under a temporary name beside its target (``.NAME.tmp-PID``), is flushed to disk,
then renamed over the target (``os.replace``, atomic on POSIX within one file system) and the
parent directory is synced — so a reader (or a run resumed after a kill) sees the old content or
the new, never half of it. Temporaries a killed writer left behind are recognised by their prefix
and removed by :func:`clean_temporaries`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def tmp_path(path: str | os.PathLike) -> Path:
    """The temporary name a write of ``path`` goes through: ``.NAME.tmp-PID`` beside it."""
    p = Path(path)
    return p.with_name(f".{p.name}{TMP_MARK}{os.getpid()}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename inside it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_file(p) as tmp: write(tmp)`` — the file written at ``tmp`` replaces ``p`` when
    the block ends without error (synced, renamed, directory synced); on error it is removed."""
    final = Path(path)
    tmp = tmp_path(final)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kw: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (``dump_kw`` go to :func:`json.dumps`)."""
    atomic_write_text(path, json.dumps(obj, **({"indent": 2} | dump_kw)))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_dir(d) as tmp: fill(tmp)`` — the directory filled at ``tmp`` replaces ``d``
    when the block ends without error (its files synced first; an existing ``d`` is moved aside
    and removed by :func:`remove_dir`). On error the temporary directory is removed and ``d`` is
    left as it was."""
    final = Path(path)
    tmp = final.parent / f".{final.name}{TMP_MARK}{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync_file(Path(root) / name)
            fsync_dir(root)
        if final.exists():
            remove_dir(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_dir(path: str | os.PathLike) -> None:
    """Remove a directory so that a kill never leaves it half-deleted under its own name: rename it
    to a temporary name first (atomic), then delete (a kill mid-delete leaves a temporary that
    :func:`clean_temporaries` removes)."""
    p = Path(path)
    trash = p.with_name(f".{p.name}.old{TMP_MARK}{os.getpid()}")
    os.replace(p, trash)
    fsync_dir(p.parent)
    shutil.rmtree(trash, ignore_errors=True)


def clean_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporaries (files or directories) that killed writers left in ``directory``."""
    d = Path(directory)
    if not d.is_dir():
        return []
    gone = [p for p in d.iterdir() if p.name.startswith(".") and TMP_MARK in p.name]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return gone
