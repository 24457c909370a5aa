"""Run directories: creation rules, the saved config, and the exported student."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from flowdistill.atomic import atomic_dir, atomic_write_text
from flowdistill.config import read_yaml_file
from flowdistill.errors import CheckpointError, ConfigError, RunDirError

RUN_MARKERS = ("config.yaml", "checkpoints", "metrics.jsonl", "student")


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` already holds (part of) a run."""
    return run_dir.is_dir() and any((run_dir / m).exists() for m in RUN_MARKERS)


def _not_writable(path: Path) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return f"{path} is on a read-only file system"
    except OSError:
        pass
    return f"{path} is not writable (permission denied)"


def check_output_dir(path: str | Path, what: str = "out_dir") -> None:
    """Check, without writing anything, that the directory ``path`` exists or can be created and
    written: it must not be a file, lie under a file, or sit in a directory this process cannot
    write (a read-only file system, permission bits, an immutable directory).

    Raises :class:`~flowdistill.errors.RunDirError` naming ``what`` (the option that chose the path).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{what} {path} is a file, not a directory")
    anc = path
    while not anc.exists() and anc.parent != anc:
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise RunDirError(f"{what} {path} lies under {anc}, which is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise RunDirError(f"{what} {path} cannot be written: {_not_writable(anc)}")


def _check_removable(run_dir: Path) -> None:
    """Every directory that ``--overwrite`` would empty must be writable (nothing is removed before)."""
    for m in RUN_MARKERS:
        top = run_dir / m
        dirs = [top] if top.is_dir() and not top.is_symlink() else []
        if dirs:
            dirs += [Path(d) / n for d, ns, _ in os.walk(top) for n in ns if not (Path(d) / n).is_symlink()]
        for d in dirs:
            if not os.access(d, os.W_OK | os.X_OK):
                raise RunDirError(f"--overwrite: {run_dir} cannot be replaced: {_not_writable(d)}")


def check_run_dir(run_dir: Path, config_yaml: str, resume: bool, overwrite: bool) -> None:
    """Every check of :func:`prepare_run_dir`, and nothing written: call it before any work.

    ``run_dir`` must be creatable and writable (see :func:`check_output_dir`). A directory holding
    a run is refused unless ``overwrite`` (every directory to empty must be writable) or ``resume``
    (the saved ``config.yaml`` must match ``config_yaml``, except ``train.steps`` which may grow).
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    check_output_dir(run_dir)
    if holds_run(run_dir):
        if overwrite:
            _check_removable(run_dir)
        elif resume:
            saved = run_dir / "config.yaml"
            if saved.exists():
                _check_same(_with_defaults(read_yaml_file(saved, "--resume: saved config")),
                            OmegaConf.to_container(OmegaConf.create(config_yaml)))
            ck = run_dir / "checkpoints"
            for p in (ck, run_dir / "metrics.jsonl"):
                if p.exists() and not os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0)):
                    raise RunDirError(f"--resume: {run_dir} cannot be continued: {_not_writable(p)}")
        else:
            raise RunDirError(f"{run_dir} already holds a run; pass --resume to continue it "
                              f"or --overwrite to replace it")
    elif resume:
        raise CheckpointError(f"--resume: {run_dir} holds no run to resume")


def prepare_run_dir(run_dir: Path, config_yaml: str, resume: bool, overwrite: bool) -> None:
    """Create ``run_dir`` or check it may be reused; write ``config.yaml`` atomically.

    The checks of :func:`check_run_dir` run first, so a refused directory is left as it was. With
    ``overwrite`` the run files of an existing run are removed; with ``resume`` the saved config is
    replaced (only ``train.steps`` may differ), so call this after the checkpoint to resume from has
    been loaded. An OS error while writing is a :class:`~flowdistill.errors.RunDirError`.
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir, config_yaml, resume=resume, overwrite=overwrite)
    try:
        if overwrite and holds_run(run_dir):
            for m in RUN_MARKERS:
                p = run_dir / m
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", config_yaml)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise RunDirError(f"cannot write the run directory {run_dir}: {e.strerror or e}{where}") from None


def _with_defaults(saved: Any) -> Any:
    """A saved config with every key a later version added at its default (a run saved before
    ``guidance:`` or ``init`` existed resumes), or as saved when it no longer loads."""
    from flowdistill.config import load_config_mapping, to_yaml
    from flowdistill.errors import FlowDistillError

    raw = OmegaConf.to_container(saved)
    try:
        return OmegaConf.to_container(OmegaConf.create(to_yaml(load_config_mapping(raw))))
    except (FlowDistillError, ValueError, KeyError):
        return raw


def _check_same(saved: Any, new: Any, prefix: str = "") -> None:
    if isinstance(saved, dict) and isinstance(new, dict):
        for k in sorted(set(saved) | set(new)):
            key = f"{prefix}.{k}" if prefix else str(k)
            if key in ("train.steps", "out_dir"):
                continue
            _check_same(saved.get(k), new.get(k), key)
    elif saved != new:
        raise ConfigError(f"--resume: config key '{prefix}' differs from the saved run "
                          f"({saved!r} there, {new!r} now)")


def export_student(model, run_dir: Path, meta: dict[str, Any]) -> Path:
    """Save the student (``save_pretrained``, safetensors) and its sampling metadata atomically."""
    final = run_dir / "student"
    with atomic_dir(final) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "flowdistill.json").write_text(json.dumps(meta, indent=2))
    return final


def read_meta(student_dir: Path) -> dict[str, Any]:
    """The sampling metadata written by :func:`export_student` (empty for a bare model dir)."""
    f = student_dir / "flowdistill.json"
    return json.loads(f.read_text()) if f.is_file() else {}
