"""The distiller contract (DESIGN.md §3) and the distiller registry.

A distiller is an ``nn.Module`` that owns the student (and any auxiliary trainable nets) and holds
the frozen teacher. The training loop asks it which parameter groups to optimise and when
(:meth:`Distiller.optim_groups`), for named losses (:meth:`Distiller.loss`), and for samples
(:meth:`Distiller.sample`). The loop knows nothing about any method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from flowdistill.core.registry import Registry
from flowdistill.core.rng import StepRNG

DISTILLERS: Registry = Registry("distiller")


def register_distiller(name: str):
    """Class decorator: register a :class:`Distiller` subclass under ``name``."""

    def deco(cls):
        cls.name = name
        return DISTILLERS.register(name)(cls)

    return deco


@dataclass
class OptimGroup:
    """Parameters optimised together: their own AdamW, learning rate and schedule.

    ``repeats`` updates are made every ``every`` training steps (e.g. a critic updated several
    times per student update). Groups run in list order within a step.
    """

    name: str
    params: list[nn.Parameter]
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    repeats: int = 1
    every: int = 1


@dataclass
class DistillerConfig:
    """Fields shared by every distiller config (subclasses add their own)."""

    name: str = "flow_matching"

    def validate(self) -> None:
        """Check names and values up front (before any training); raise with a clear message."""


class Distiller(nn.Module):
    """Base class. Subclasses set ``Config``, ``needs_data`` and implement the three methods."""

    name: ClassVar[str] = "base"
    Config: ClassVar[type] = DistillerConfig
    needs_data: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = True

    def __init__(self, cfg: Any, student: nn.Module, teacher: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.student = student
        if self.needs_teacher and teacher is None and not getattr(self, "_inference_only", False):
            raise ValueError(f"distiller {self.name!r} needs a teacher")
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False).eval()

    # -- the contract ------------------------------------------------------------------
    def optim_groups(self, lr: float) -> list[OptimGroup]:
        """Parameter groups; default: the student alone at the run's learning rate."""
        return [OptimGroup("student", [p for p in self.student.parameters() if p.requires_grad], lr)]

    def loss(self, batch: dict[str, Tensor], step: int, group: str, rng: StepRNG) -> dict[str, Tensor]:
        """Named scalar losses for ``group``; ``"loss"`` is minimised."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, noise: Tensor, nfe: int, cond: Tensor | None = None,
               model: nn.Module | None = None) -> Tensor:
        """The student's own few-step sampler from ``noise`` at ``t = 1`` (``model`` overrides
        the student, e.g. with its EMA copy)."""
        raise NotImplementedError

    @classmethod
    def for_inference(cls, cfg: Any, student: nn.Module) -> Distiller:
        """A distiller that only samples: no teacher, no trainable auxiliaries needed."""
        obj = cls.__new__(cls)
        object.__setattr__(obj, "_inference_only", True)
        cls.__init__(obj, cfg, student, None)
        return obj

    def after_step(self, step: int, group: str) -> None:
        """Called after each optimiser step of ``group`` at ``step`` (and each of its repeats):
        target-network updates and other post-optimiser work. Default: nothing."""

    # -- engine ------------------------------------------------------------------------
    def trainable_nets(self) -> dict[str, nn.Module]:
        """The nets the optimiser trains, by attribute name (default: the student alone).

        The loop wraps each through the engine (DDP / FSDP via ``accelerator.prepare``); every
        parameter of :meth:`optim_groups` must belong to one of them. A method with an auxiliary
        trainable net (a critic, a fake-velocity net) returns it here too.
        """
        return {"student": self.student}

    def net(self, name: str) -> nn.Module:
        """The module to call for a forward that carries gradient into trainable net ``name``:
        the engine's wrapper once the loop has attached one (DDP averages gradients only through
        its own forward), else the net itself. Stop-gradient targets and forward-mode JVPs may
        call the bare net (``self.student``); under FSDP (sharded parameters) use this for every
        call, and finite differences for derivatives."""
        wrapped = self.__dict__.get("_engine_nets", {}).get(name)
        return wrapped if wrapped is not None else getattr(self, name)

    def attach_engine(self, wrapped: dict[str, nn.Module]) -> None:
        """Called by the loop with the engine's wrappers of :meth:`trainable_nets` (kept out of the
        module tree, so state dicts and checkpoints keep their keys)."""
        self.__dict__["_engine_nets"] = dict(wrapped)

    def batch_source(self):
        """A data source of the method's own (e.g. a coupling store), or ``None``: then the loop
        uses the job's dataset when :attr:`needs_data`, else :meth:`prior_batch`."""
        return None

    # -- helpers -----------------------------------------------------------------------
    def prior_batch(self, rng: StepRNG, local_batch: int, sample_shape: tuple[int, ...]) -> dict[str, Tensor]:
        """A data-free batch: noise only (data-free methods never see a dataset)."""
        return {"noise": rng.randn(local_batch, *sample_shape)}

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """State to checkpoint: everything except the frozen teacher."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_trainable_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Inverse of :meth:`trainable_state_dict`."""
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise KeyError(f"checkpoint does not match the distiller: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")


def check_names(**names: str) -> None:
    """Raise :class:`UnknownNameError` for any name that its registry does not hold.

    Keys: ``path``, ``loss``, ``solver``, ``grid``, ``time_sampler``.
    """
    from flowdistill.core.losses import PREMETRICS
    from flowdistill.core.paths import PATHS
    from flowdistill.core.solvers import SOLVERS
    from flowdistill.core.timesteps import TIME_GRIDS, TIME_SAMPLERS

    regs = {"path": PATHS, "loss": PREMETRICS, "solver": SOLVERS, "grid": TIME_GRIDS,
            "time_sampler": TIME_SAMPLERS}
    for key, value in names.items():
        regs[key].get(value)


def build_distiller(name: str, cfg: Any, student: nn.Module, teacher: nn.Module | None) -> Distiller:
    """Instantiate a registered distiller; unknown names list what is available."""
    return DISTILLERS.get(name)(cfg, student, teacher)
