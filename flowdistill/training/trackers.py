"""Experiment trackers through accelerate (TensorBoard by default when installed, W&B optional).

``train.trackers``: ``auto`` (TensorBoard when ``tensorboard`` is importable, else none), ``none``,
or a comma list of accelerate tracker names (``tensorboard``, ``wandb``, ...). Trackers sit beside
``metrics.jsonl``, which stays the record of a run; TensorBoard event files go to
``run_dir/trackers/``. Scalars are logged at every ``log_every``; the loop's sample plots are
logged as images.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from flowdistill.errors import ConfigError

_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
            "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(_MODULES.get(name, name)) is not None


def resolve_trackers(spec: str) -> list[str]:
    """Tracker names for ``spec``; a named tracker that is not installed is a clear error."""
    spec = (spec or "none").strip()
    if spec == "none":
        return []
    if spec == "auto":
        return ["tensorboard"] if _installed("tensorboard") else []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        if n not in _MODULES:
            raise ConfigError(f"train.trackers: unknown tracker {n!r}; available: auto, none, "
                              f"{', '.join(sorted(_MODULES))}")
        if not _installed(n):
            raise ConfigError(f"train.trackers: {n!r} is not installed (pip install {_MODULES[n]})")
    return names


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, bool | int | float | str) or v is None:
            out[key] = v
        else:
            out[key] = str(v)
    return out


class Trackers:
    """The run's trackers: started with the config, fed scalars and images, finished at the end."""

    def __init__(self, spec: str, run_dir: Path):
        self.names = resolve_trackers(spec)
        self.run_dir = Path(run_dir)
        self.started = False

    @property
    def log_with(self) -> list[str]:
        """What to pass to ``Accelerator(log_with=...)``."""
        return list(self.names)

    def start(self, acc, config: dict[str, Any]) -> None:
        """``accelerator.init_trackers`` (main process) with the flattened job config."""
        if not self.names or self.started:
            return
        acc.project_configuration.set_directories(str(self.run_dir))
        acc.project_configuration.logging_dir = str(self.run_dir / "trackers")
        acc.init_trackers("flowdistill", config=_flat(config))
        self.started = True

    def log(self, acc, record: dict[str, Any], step: int) -> None:
        """Scalars of a metrics record."""
        if self.started:
            scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
            acc.log(scalars, step=step)

    def log_image(self, acc, tag: str, image: str | Path | np.ndarray, step: int) -> None:
        """One image (a PNG path or an ``[H, W, C]`` uint8 array) to every tracker that takes images."""
        if not self.started or not acc.is_main_process:
            return
        if not isinstance(image, np.ndarray):
            from PIL import Image

            with Image.open(image) as im:
                image = np.asarray(im.convert("RGB"))
        for name in self.names:
            tracker = acc.get_tracker(name)
            if hasattr(tracker, "log_images"):
                tracker.log_images({tag: image[None]}, step=step, dataformats="NHWC") \
                    if name == "tensorboard" else tracker.log_images({tag: [image]}, step=step)

    def end(self, acc) -> None:
        """Finish every tracker (flush and close its writer). Not ``accelerator.end_training``:
        that also destroys the process group, which the export after training still needs."""
        if self.started:
            for tracker in acc.trackers:
                tracker.finish()
            self.started = False
