"""Atomic checkpoints: written under a temporary name, fsynced, then renamed into place.

Layout of ``checkpoints/step-NNNNNNN/``: ``model.safetensors`` (trainable state of the
distiller, frozen teacher excluded), ``ema.safetensors`` (optional), ``optim-<group>.pt``
(optimizer state, loaded with ``weights_only=True``), ``state.json`` (step and bookkeeping: the
run's training time ``elapsed_s`` so far, which a resumed run continues from, and the precision).
A directory named ``step-*`` exists only once complete, so a kill during a write never leaves
a checkpoint that resume picks up.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from flowdistill.atomic import atomic_dir, remove_dir
from flowdistill.atomic import clean_temporaries as atomic_clean
from flowdistill.errors import CheckpointError

_STEP_RE = re.compile(r"^step-(\d{7,})$")


def step_dir_name(step: int) -> str:
    """``step-0000123``."""
    return f"step-{step:07d}"


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optim_states: dict[str, dict[str, Any]],
    ema_state: dict[str, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically; keep only the newest ``keep`` if given."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_dir_name(step)
    with atomic_dir(final) as tmp:
        _save_tensors(model_state, tmp / "model.safetensors")
        if ema_state is not None:
            _save_tensors(ema_state, tmp / "ema.safetensors")
        for name, st in optim_states.items():
            torch.save(st, tmp / f"optim-{name}.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
    if keep is not None and keep > 0:
        for old in list_checkpoints(ckpt_root)[:-keep]:
            remove_dir(old)
    return final


def clean_temporaries(ckpt_root: Path) -> list[Path]:
    """Remove the temporaries a killed checkpoint write or pruning left behind; returns them."""
    return atomic_clean(ckpt_root)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary ones are ignored)."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir()
             if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """Newest complete checkpoint, or ``None``."""
    cks = list_checkpoints(ckpt_root)
    return cks[-1] if cks else None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint directory; raise :class:`CheckpointError` naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    for required in ("state.json", "model.safetensors"):
        if not (path / required).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: missing {required}")
    try:
        state = json.loads((path / "state.json").read_text())
        model = load_file(str(path / "model.safetensors"), device=str(map_location))
        ema = None
        if (path / "ema.safetensors").exists():
            ema = load_file(str(path / "ema.safetensors"), device=str(map_location))
        optim = {
            f.name[len("optim-"):-len(".pt")]: torch.load(f, map_location=map_location, weights_only=True)
            for f in sorted(path.glob("optim-*.pt"))
        }
    except Exception as e:  # safetensors / json / torch errors on damaged files
        raise CheckpointError(f"checkpoint {path} is corrupt: {type(e).__name__}: {e}") from e
    return {"step": int(state["step"]), "state": state, "model": model, "ema": ema, "optim": optim}
