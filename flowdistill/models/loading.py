"""Load saved networks (``save_pretrained`` directories) without importing by string."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from flowdistill.core.registry import UnknownNameError
from flowdistill.errors import CheckpointError
from flowdistill.models import MODELS


def model_class_by_class_name(class_name: str) -> type:
    """The registered class whose ``__name__`` is ``class_name`` (from a saved ``config.json``)."""
    for n in MODELS.names():
        cls = MODELS.get(n)
        if cls.__name__ == class_name:
            return cls
    raise UnknownNameError(f"saved model class {class_name!r} is not a registered flowdistill model; "
                           f"available: {', '.join(MODELS.get(n).__name__ for n in MODELS.names())}")


def load_model_dir(path: str | Path) -> nn.Module:
    """Load a network saved with ``save_pretrained`` (safetensors), offline."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"no saved model at {path} (config.json missing)")
    try:
        class_name = json.loads(cfg_file.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{cfg_file} is corrupt: {e}") from None
    cls = model_class_by_class_name(class_name)
    try:
        return cls.from_pretrained(str(path), local_files_only=True).eval()
    except Exception as e:
        raise CheckpointError(f"could not load model from {path}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None


def find_model_dir(path: str | Path, what: str = "teacher") -> Path:
    """The saved model a path names — the one place that decides it: a run directory's exported
    ``student/``, or a saved model directory (``config.json``) itself.

    ``assets/NAME`` that does not exist relative to the working directory names the shipped asset
    (:func:`flowdistill.resources.asset_path`), so shipped configs work from an installed package.
    A path that does not exist, is a file, or is a run directory without an exported student is a
    :class:`~flowdistill.errors.CheckpointError` naming ``what`` (the option that gave the path).
    """
    p = Path(path)
    if not p.exists() and not p.is_absolute() and p.parts[:1] == ("assets",) and len(p.parts) > 1:
        from flowdistill.resources import asset_path

        try:
            p = asset_path(Path(*p.parts[1:]))
        except (FileNotFoundError, ValueError, KeyError):
            pass
    if not p.exists():
        raise CheckpointError(f"{what} {p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{what} {p} is a file; expected a run directory or a saved model "
                              f"directory (with config.json)")
    if (p / "student" / "config.json").is_file():
        return p / "student"
    if (p / "config.json").is_file():
        return p
    if (p / "config.yaml").is_file() or (p / "checkpoints").is_dir():
        raise CheckpointError(f"{what} {p} is a run directory without an exported student/ "
                              f"(training unfinished?)")
    raise CheckpointError(f"{what} {p} is neither a run directory nor a saved model directory "
                          f"(no config.json)")
