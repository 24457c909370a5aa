"""Job configs: omegaconf structured dataclasses, YAML files and ``key=value`` overrides.

The ``distiller`` section is typed by the config dataclass of the distiller that
``distiller.name`` selects, so an unknown key, a wrong type or a missing value is an error that
names the key. Configs name registered components only; nothing is imported from a string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowdistill.core.registry import UnknownNameError
from flowdistill.distillers import DISTILLERS
from flowdistill.errors import ConfigError
from flowdistill.training.loop import TrainConfig


@dataclass
class ModelSpec:
    """A registered network (``mlp``, ``unet``, ``dit``) and its constructor arguments."""

    name: str = "mlp"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSpec:
    """A registered dataset: a toy target (``checkerboard``, ...) or ``digits``."""

    name: str = "checkerboard"
    conditional: bool = False
    image_size: int = 16  # digits / image folders
    root: str = ""  # image folders


@dataclass
class EvalSpec:
    """What ``eval``/``demo`` measure: NFE budgets, sample count, solver."""

    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 32, 128])
    n_samples: int = 4000
    solver: str = "euler"
    seed: int = 1234


@dataclass
class JobConfig:
    """A training job (teacher training or distillation)."""

    out_dir: str = MISSING
    teacher: str = ""  # directory of a saved teacher (run_dir/student or a model dir)
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSpec = field(default_factory=EvalSpec)
    distiller: Any = None


def _err(e: Exception) -> ConfigError:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ConfigError(f"config key '{key}': {msg}" if key else f"config: {msg}")


def _schema(name: str) -> DictConfig:
    dist_cls = DISTILLERS.get(name)  # UnknownNameError lists what is available
    base = OmegaConf.structured(JobConfig)
    base.distiller = OmegaConf.structured(dist_cls.Config)
    return base


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                default_distiller: str = "flow_matching") -> JobConfig:
    """Load YAML (optional) + ``key=value`` overrides into a validated :class:`JobConfig`."""
    try:
        raw = OmegaConf.create({})
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {p} does not exist")
            raw = OmegaConf.load(p)
            if not isinstance(raw, DictConfig):
                raise ConfigError(f"config file {p} must hold a mapping")
        bad = [o for o in overrides or [] if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        over = OmegaConf.from_dotlist(list(overrides or []))
        name = OmegaConf.select(over, "distiller.name") or OmegaConf.select(raw, "distiller.name") \
            or default_distiller
        merged = OmegaConf.merge(_schema(str(name)), raw, over)
        obj = OmegaConf.to_object(merged)
    except (ConfigError, UnknownNameError):
        raise
    except OmegaConfBaseException as e:
        raise _err(e) from None
    obj.train.validate()
    try:
        obj.distiller.validate()
    except ValueError as e:
        raise ConfigError(f"distiller: {e}") from None
    return obj


def to_yaml(cfg: JobConfig) -> str:
    """The resolved config as YAML (written to ``run_dir/config.yaml``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
