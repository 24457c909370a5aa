"""The Python API under the CLI: train/distil a run, load it, sample it, evaluate it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from flowdistill.config import JobConfig, load_config, to_yaml
from flowdistill.data.registry import build_dataset as build_source
from flowdistill.data.registry import sample_shape_of
from flowdistill.distillers import DISTILLERS, Distiller
from flowdistill.errors import CheckpointError, ConfigError
from flowdistill.models import build_model
from flowdistill.models.loading import load_model_dir
from flowdistill.runs import export_student, prepare_run_dir, read_meta
from flowdistill.training.loop import Trainer

# -- data: build_source (= data.registry.build_dataset) and sample_shape_of come from the dataset
# registry, the one table that train, eval and model shapes share; ``train`` calls build_source
# through this module's name.


def _default_params(cfg: JobConfig, num_classes: int, two_time: bool) -> dict[str, Any]:
    params = dict(cfg.model.params)
    shape = sample_shape_of(cfg.data)
    if cfg.model.name == "mlp":
        params.setdefault("data_dim", shape[0])
    else:
        params.setdefault("in_channels", shape[0])
        params.setdefault("sample_size", shape[-1])
    params.setdefault("num_classes", num_classes)
    params["two_time"] = two_time
    return params


# -- building -----------------------------------------------------------------------------
def build_distiller_for(cfg: JobConfig, source=None) -> Distiller:
    """Student (and teacher, when the method needs one) and the distiller around them."""
    cls = DISTILLERS.get(cfg.distiller.name)
    two_time = bool(getattr(cls, "student_two_time", False))
    torch.manual_seed(cfg.train.seed)  # same initial weights in every process and every run
    teacher = None
    if cls.needs_teacher:
        if not cfg.teacher:
            raise ConfigError(f"distiller {cls.name!r} needs a teacher: set teacher=PATH "
                              f"(a run's student/ directory)")
        teacher = load_model_dir(_model_dir(Path(cfg.teacher)))
        params = {**dict(teacher.config), **dict(cfg.model.params), "two_time": two_time}
        params = {k: v for k, v in params.items() if not k.startswith("_")}
        student = build_model(cfg.model.name, **params)
        _check_compatible(student, teacher, cfg)
        init = getattr(student, "init_from", None)
        if callable(init):
            init(teacher)
        else:
            student.load_state_dict(teacher.state_dict(), strict=False)
    else:
        num_classes = source.num_classes if source is not None else 0
        student = build_model(cfg.model.name, **_default_params(cfg, num_classes, two_time))
    return cls(cfg.distiller, student, teacher)


def _check_compatible(student: nn.Module, teacher: nn.Module, cfg: JobConfig) -> None:
    shape = sample_shape_of(cfg.data)
    for name, m in (("teacher", teacher), ("student", student)):
        x = torch.zeros(2, *shape)
        t = torch.full((2,), 0.5)
        try:
            with torch.no_grad():
                y = m(x, t)
        except Exception as e:
            raise ConfigError(f"{name} does not accept data of shape {list(shape)} "
                              f"(dataset {cfg.data.name!r}): {str(e).splitlines()[0]}") from None
        if y.shape != x.shape:
            raise ConfigError(f"{name} maps {list(x.shape)} to {list(y.shape)}; shapes must match")
    tc = getattr(teacher.config, "num_classes", 0)
    sc = getattr(student.config, "num_classes", 0)
    if tc != sc:
        raise ConfigError(f"conditioning mismatch: teacher has num_classes={tc}, student {sc}")


def _model_dir(path: Path) -> Path:
    """Accept a run directory (uses its student/) or a model directory."""
    if (path / "student" / "config.json").is_file():
        return path / "student"
    return path


# -- training -----------------------------------------------------------------------------
def train(cfg: JobConfig, resume: bool = False, overwrite: bool = False,
          on_plot: Callable | None = None) -> Path:
    """Run a training job (teacher or distillation) and export the student; returns the run dir."""
    run_dir = Path(cfg.out_dir)
    cls = DISTILLERS.get(cfg.distiller.name)
    source = build_source(cfg.data) if cls.needs_data else None
    distiller = build_distiller_for(cfg, source)
    trainer = Trainer(distiller, cfg.train, run_dir, source=source,
                      sample_shape=sample_shape_of(cfg.data), on_plot=on_plot)
    if trainer.is_main:
        prepare_run_dir(run_dir, to_yaml(cfg), resume=resume, overwrite=overwrite)
    trainer.acc.wait_for_everyone()
    if resume:
        trainer.resume()
    trainer.fit()
    if trainer.is_main:
        export_student(trainer.eval_student(), run_dir,
                       {"distiller": cfg.distiller.name, "data": cfg.data.name, "steps": trainer.step})
    trainer.acc.wait_for_everyone()
    return run_dir


# -- loading and sampling -----------------------------------------------------------------
@dataclass
class LoadedRun:
    """A trained run ready to sample: its config, student and distiller (no teacher needed)."""

    cfg: JobConfig
    student: nn.Module
    distiller: Distiller
    run_dir: Path

    @torch.no_grad()
    def sample(self, n: int, nfe: int, seed: int = 0, cond: torch.Tensor | None = None,
               solver: str | None = None, device: str = "cpu") -> torch.Tensor:
        """``n`` samples at ``nfe`` evaluations from seeded noise."""
        if n <= 0 or nfe <= 0:
            raise ConfigError(f"n and nfe must be positive, got n={n}, nfe={nfe}")
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(n, *sample_shape_of(self.cfg.data), generator=g).to(device)
        kw = {"solver": solver} if solver else {}
        return self.distiller.sample(noise, nfe, cond=cond, model=self.student.to(device), **kw)


def load_run(run_dir: str | Path) -> LoadedRun:
    """Load ``run_dir``'s config and exported student."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (config.yaml missing)")
    raw = OmegaConf.load(cfg_file)
    cfg = load_config(cfg_file) if raw else None
    student_dir = run_dir / "student"
    if not student_dir.is_dir():
        raise CheckpointError(f"{run_dir} has no exported student (training unfinished?)")
    student = load_model_dir(student_dir)
    read_meta(student_dir)
    cls = DISTILLERS.get(cfg.distiller.name)
    distiller = cls.for_inference(cfg.distiller, student)
    return LoadedRun(cfg, student, distiller, run_dir)
