"""Run directories: creation rules, the saved config, and the exported student."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from flowdistill.errors import CheckpointError, ConfigError, RunDirError

RUN_MARKERS = ("config.yaml", "checkpoints", "metrics.jsonl", "student")


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` already holds (part of) a run."""
    return run_dir.is_dir() and any((run_dir / m).exists() for m in RUN_MARKERS)


def prepare_run_dir(run_dir: Path, config_yaml: str, resume: bool, overwrite: bool) -> None:
    """Create ``run_dir`` or check it may be reused; write ``config.yaml`` atomically.

    A directory holding a run is refused unless ``overwrite`` (its run files are removed) or
    ``resume`` (the saved config must match, except ``train.steps`` which may grow).
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if holds_run(run_dir):
        if overwrite:
            for m in RUN_MARKERS:
                p = run_dir / m
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        elif resume:
            saved = run_dir / "config.yaml"
            if saved.is_file():
                _check_same(OmegaConf.to_container(OmegaConf.load(saved)),
                            OmegaConf.to_container(OmegaConf.create(config_yaml)))
        else:
            raise RunDirError(f"{run_dir} already holds a run; pass --resume to continue it "
                              f"or --overwrite to replace it")
    elif resume:
        raise CheckpointError(f"--resume: {run_dir} holds no run to resume")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", config_yaml)


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


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def export_student(model, run_dir: Path, meta: dict[str, Any]) -> Path:
    """Save the student (``save_pretrained``, safetensors) and its sampling metadata atomically."""
    final = run_dir / "student"
    tmp = run_dir / f".student-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "flowdistill.json").write_text(json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def read_meta(student_dir: Path) -> dict[str, Any]:
    """The sampling metadata written by :func:`export_student` (empty for a bare model dir)."""
    f = student_dir / "flowdistill.json"
    return json.loads(f.read_text()) if f.is_file() else {}
