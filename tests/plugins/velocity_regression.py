"""A distiller defined outside the package (tests the plugin route of DESIGN.md §3): registered
from Python with ``register_distiller`` and named from the CLI through ``--plugin``.

``velocity_regression``: the student's velocity regresses the teacher's two-Euler-step average
velocity to ``t = 0`` on the linear path, ``x_t = (1 − t)·x + t·ε`` from data, ``m = t/2``,

    x_m = x_t − (t − m)·v_T(x_t, t),   x̂_0 = x_m − m·v_T(x_m, m),
    L = E ‖v_θ(x_t, t) − sg[(x_t − x̂_0)/t]‖²

(a one-round progressive distillation toward straighter paths) — small on purpose, so the test
exercises the contract, not the maths. The student starts as the teacher, so the loss starts at the
teacher's own two-step curvature and falls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowdistill.core.sampling import sample_velocity
from flowdistill.distillers import register_distiller
from flowdistill.distillers.base import BenchRow, Distiller, DistillerConfig


@dataclass
class VelocityRegressionConfig(DistillerConfig):
    """Options: the sampler's solver."""

    name: str = "velocity_regression"
    sample_solver: str = "euler"


@register_distiller("velocity_regression")
class VelocityRegression(Distiller):
    """Student velocity ← teacher velocity on data-noise interpolants."""

    Config = VelocityRegressionConfig
    needs_data = True
    needs_teacher = True
    sample_options = {"solver": "ODE solver; default sample_solver"}
    eval_nfe = (2, 4)
    bench_rows = (BenchRow("velocity regression"),)

    def loss(self, batch, step, group, rng):
        """``‖v_θ(x_t, t) − sg[(x_t − x̂_0)/t]‖²`` (module docstring)."""
        x = batch["x"]
        eps = rng.randn(*x.shape).to(x.dtype)
        t = 0.05 + 0.95 * rng.rand(x.shape[0]).to(x.dtype)
        x_t = (1 - t)[:, None] * x + t[:, None] * eps
        with torch.no_grad():
            m = t / 2
            x_m = x_t - (t - m)[:, None] * self.teacher(x_t, t)
            x_0 = x_m - m[:, None] * self.teacher(x_m, m)
            target = (x_t - x_0) / t[:, None]
        v = self.net("student")(x_t, t)
        return {"loss": (v - target).pow(2).mean()}

    def _sample(self, noise, nfe, cond, model, solver=None):
        """Solve the student's ODE with ``nfe`` evaluations."""
        return sample_velocity(model, noise, nfe, solver or self.cfg.sample_solver, cond=cond).x
