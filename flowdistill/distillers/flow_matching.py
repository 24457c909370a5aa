"""Plain flow matching — the identity distiller, which trains teachers (METHODS.md §0).

    L = E_{x, ε, t} ‖v_θ(x_t, t, c) − (ε − x)‖²,   x_t = (1 − t)·x + t·ε

(for a general affine path the target is ``α'(t)·x + σ'(t)·ε``), with ``t`` from a registered
time sampler and condition dropout so the model also learns the unconditional field for CFG.
The trained model is a teacher: when it is sampled, the run's ``guidance:`` section (CFG
``v_∅ + w·(v_c − v_∅)``, a guidance interval, autoguidance; :mod:`flowdistill.core.guidance`)
guides it, as it would guide it as the teacher of a distillation job.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from flowdistill.core.guidance import drop_condition
from flowdistill.core.losses import premetric
from flowdistill.core.paths import PATHS
from flowdistill.core.rng import StepRNG
from flowdistill.core.sampling import sample_velocity
from flowdistill.core.timesteps import TimeSamplerConfig
from flowdistill.distillers.base import (
    BenchRow,
    Distiller,
    DistillerConfig,
    check_names,
    register_distiller,
)
from flowdistill.errors import ConfigError


@dataclass
class FlowMatchingConfig(DistillerConfig):
    """Flow-matching (teacher training) options."""

    name: str = "flow_matching"
    path: str = "linear"
    time_sampler: TimeSamplerConfig = field(default_factory=TimeSamplerConfig)
    loss: str = "l2"
    cond_dropout: float = 0.1
    sample_solver: str = "euler"
    sample_grid: str = "uniform"

    def validate(self) -> None:
        """Every named component must be registered; dropout in [0, 1]."""
        check_names(path=self.path, loss=self.loss, solver=self.sample_solver, grid=self.sample_grid)
        self.time_sampler.build()
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ConfigError(f"distiller.cond_dropout must be in [0, 1], got {self.cond_dropout}")


@register_distiller("flow_matching")
class FlowMatching(Distiller):
    """Trains ``student`` as a velocity field by conditional flow matching."""

    Config = FlowMatchingConfig
    needs_data = True
    needs_teacher = False
    sample_options = {"solver": "ODE solver (a registered name: euler, heun, ...); default sample_solver"}
    eval_nfe = (1, 2, 4, 8, 128)
    bench_rows = (BenchRow("teacher (Euler)", ("distiller.sample_solver=euler",)),)
    guided_sampling = True  # the student is a teacher: the run's guidance: section guides its samples

    def __init__(self, cfg: FlowMatchingConfig, student: nn.Module, teacher: nn.Module | None = None, *,
                 inference_only: bool = False):
        super().__init__(cfg, student, teacher, inference_only=inference_only)
        self.path = PATHS.build(cfg.path)
        self.time_sampler = cfg.time_sampler.build()
        self.premetric = premetric(cfg.loss)
        self.num_classes = int(getattr(getattr(student, "config", None), "num_classes", 0) or 0)

    def loss(self, batch: dict[str, Tensor], step: int, group: str, rng: StepRNG) -> dict[str, Tensor]:
        """Conditional flow-matching loss on a data batch."""
        x = batch["x"]
        b = x.shape[0]
        eps = rng.randn(b, *x.shape[1:]).to(x.dtype)
        t = rng.times(self.time_sampler, b).to(x.dtype)
        cond = batch.get("cond")
        u = rng.rand(b)
        if cond is not None and self.num_classes > 0:
            cond = drop_condition(cond, self.cfg.cond_dropout, self.num_classes, u)
        x_t, target = self.path.sample_and_target(x, eps, t)
        v = self.net("student")(x_t, t, cond=cond)
        loss = self.premetric(v, target).mean()
        return {"loss": loss}

    def _sample(self, noise: Tensor, nfe: int, cond: Tensor | None, model: nn.Module,
                solver: str | None = None) -> Tensor:
        """Solve the learned ODE from ``t = 1`` with ``nfe`` evaluations (``model`` comes guided by
        the run's ``guidance:`` section: :attr:`Distiller.guided_sampling`)."""
        return sample_velocity(model, noise, nfe, solver or self.cfg.sample_solver, self.cfg.sample_grid,
                               cond=cond).x
