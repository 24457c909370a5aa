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
