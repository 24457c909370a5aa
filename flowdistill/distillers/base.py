"""The distiller contract (DESIGN.md §3) and the distiller registry.

A distiller is an ``nn.Module`` that owns the student (and any auxiliary trainable nets) and holds
the frozen teacher. The training loop asks it which parameter groups to optimise and when
(:meth:`Distiller.optim_groups`), for named losses (:meth:`Distiller.loss`), and for samples
(:meth:`Distiller.sample`). The loop knows nothing about any method.
"""

from __future__ import annotations

from collections.abc import Callable
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

    @classmethod
    def trainable(cls, name: str, module: nn.Module, lr: float, **kw: Any) -> OptimGroup:
        """The group of ``module``'s parameters that require grad (frozen ones, e.g. LoRA bases, left out)."""
        return cls(name, [p for p in module.parameters() if p.requires_grad], lr, **kw)


@dataclass(frozen=True)
class BenchRow:
    """One benchmark row a method declares (:attr:`Distiller.bench_rows`).

    ``label`` names the row in tables; ``overrides`` are ``key=value`` config overrides applied on
    top of the method's config (e.g. ``"distiller.mode=prediction"`` for an ablation); ``nfe`` are
    the evaluation counts (``()``: the method's :attr:`Distiller.eval_nfe`). ``source`` names the
    shipped config the row's run comes from, per problem: ``""`` is the job config
    ``configs/<method>_<problem>.yaml``, ``"recipes/NAME"`` the recipe
    ``configs/recipes/NAME_<problem>.yaml`` (its first stage of this method is the row's run;
    ``"recipes/NAME:STAGE"`` names the stage, e.g. the last of a progressive schedule).
    """

    label: str
    overrides: tuple[str, ...] = ()
    nfe: tuple[int, ...] = ()
    source: str = ""

    def nfes(self, cls: type[Distiller]) -> tuple[int, ...]:
        """The row's NFEs, falling back to ``cls.eval_nfe``."""
        return self.nfe or tuple(cls.eval_nfe)


def no_update(out: dict[str, Tensor] | None = None,
              device: torch.device | str | None = None) -> dict[str, Tensor]:
    """The "nothing to optimise this step" loss dict: ``out`` (logged values) with ``"loss"`` a zero
    scalar that carries no gradient.

    The loop backpropagates a group's ``"loss"`` only when it ``requires_grad``; when no
    micro-batch of a group does, the group's optimiser does not step (and :meth:`Distiller.after_step`
    is not called). Return this, not a bare zeros tensor, so the intent is explicit.
    """
    out = dict(out or {})
    if device is None:
        device = next((v.device for v in out.values() if isinstance(v, Tensor)), "cpu")
    out["loss"] = torch.zeros((), device=device)
    return out


def is_no_update(out: dict[str, Tensor]) -> bool:
    """Whether a loss dict says "nothing to optimise" (its ``"loss"`` carries no gradient)."""
    return not out["loss"].requires_grad


@dataclass
class DistillerConfig:
    """Fields shared by every distiller config (subclasses add their own)."""

    name: str = "flow_matching"

    def validate(self) -> None:
        """Check names and values up front (before any training); raise with a clear message."""


class Distiller(nn.Module):
    """Base class of every method (DESIGN.md §3).

    A subclass sets the class attributes below, implements :meth:`loss` and :meth:`_sample`, and
    may override :meth:`optim_groups`, :meth:`after_step`, :meth:`trainable_nets`,
    :meth:`batch_source` and :meth:`prior_batch`. Its ``__init__`` takes
    ``(cfg, student, teacher=None, *, inference_only=False)`` and passes all four on.
    """

    #: Registry name (set by :func:`register_distiller`).
    name: ClassVar[str] = "base"
    #: The config dataclass (a :class:`DistillerConfig` subclass) of ``distiller:``.
    Config: ClassVar[type] = DistillerConfig
    #: Whether training batches come from the job's dataset (``False``: prior noise, or the
    #: method's own :meth:`batch_source`).
    needs_data: ClassVar[bool] = True
    #: Whether training needs a frozen teacher (``teacher=PATH``); sampling never does.
    needs_teacher: ClassVar[bool] = True
    #: Whether the student is a two-time net ``u(x, t, s)`` (a flow map) rather than a velocity field.
    student_two_time: ClassVar[bool] = False
    #: The keyword options :meth:`sample` takes, ``{name: one-line help}``; any other is an error.
    sample_options: ClassVar[dict[str, str]] = {}
    #: The NFEs at which the method's student is evaluated and benchmarked by default.
    eval_nfe: ClassVar[tuple[int, ...]] = (1, 2, 4)
    #: The rows a benchmark reports for the method (label, config overrides, NFEs).
    bench_rows: ClassVar[tuple[BenchRow, ...]] = ()
    #: Whether the job's ``guidance:`` section also guides the *student* when it is sampled. True
    #: for flow matching, whose student is a velocity teacher (sampled with CFG like any teacher);
    #: a distilled student has learned its guided teacher and is sampled as it is. The guidance
    #: comes as :attr:`sample_guidance` (set by :meth:`for_inference` and the API's builder).
    guided_sampling: ClassVar[bool] = False
    #: Whether the method draws per-sample guidance scales ``w ~ U[guidance.scale_range]`` itself
    #: (:func:`flowdistill.core.guidance.sample_guidance_scale`, passing ``w=`` to the teacher, whose
    #: ``scale_range`` attribute holds the range). A ``scale_range`` for a method that does not is a
    #: config error: nothing would draw from it.
    draws_guidance_scale: ClassVar[bool] = False

    def __init__(self, cfg: Any, student: nn.Module, teacher: nn.Module | None = None, *,
                 inference_only: bool = False):
        """``inference_only=True`` (see :meth:`for_inference`) builds a distiller that samples but
        does not train: no teacher is required, and :meth:`loss` refuses to run without one."""
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.inference_only = bool(inference_only)
        if self.needs_teacher and teacher is None and not self.inference_only:
            raise ValueError(f"distiller {self.name!r} needs a teacher")
        self.teacher = teacher  # a ready (guided, when the job asks) VelocityField: DESIGN.md §1
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        #: ``net -> guided net`` applied to the net :meth:`sample` integrates (see
        #: :attr:`guided_sampling`); ``None``: sampled as it is. Kept out of the module tree.
        self.sample_guidance: Callable[[nn.Module], nn.Module] | None = None

    def __init_subclass__(cls, **kw: Any) -> None:
        """Wrap each subclass's :meth:`loss` so an inference-only distiller refuses to train."""
        super().__init_subclass__(**kw)
        fn = cls.__dict__.get("loss")
        if fn is not None and not getattr(fn, "_checks_inference", False):

            def loss(self, *args, **kwargs):
                self._check_trainable()
                return fn(self, *args, **kwargs)

            loss.__doc__, loss.__name__, loss.__qualname__ = fn.__doc__, fn.__name__, fn.__qualname__
            loss._checks_inference = True  # type: ignore[attr-defined]
            cls.loss = loss  # type: ignore[method-assign]

    def _check_trainable(self) -> None:
        if self.inference_only and self.needs_teacher and self.teacher is None:
            raise RuntimeError(f"distiller {self.name!r} was built for inference only (no teacher); "
                               f"it samples but cannot train — build it with a teacher")

    # -- the contract ------------------------------------------------------------------
    def optim_groups(self, lr: float) -> list[OptimGroup]:
        """Parameter groups; default: the student alone at the run's learning rate."""
        return [OptimGroup.trainable("student", self.student, lr)]

    def loss(self, batch: dict[str, Tensor], step: int, group: str, rng: StepRNG) -> dict[str, Tensor]:
        """Named scalar losses for ``group``; ``"loss"`` is minimised. Nothing to optimise at this
        step: return :func:`no_update` (a ``"loss"`` without gradient), and the group does not step."""
        raise NotImplementedError

    no_update = staticmethod(no_update)

    def check_sample_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` less those set to ``None`` (the method's default); one the method does not
        take (:attr:`sample_options`) is a :class:`~flowdistill.errors.ConfigError` naming those
        it does."""
        from flowdistill.errors import ConfigError

        given = {k: v for k, v in options.items() if v is not None}
        for key in given:
            if key not in self.sample_options:
                takes = ", ".join(sorted(self.sample_options)) or "none"
                raise ConfigError(f"{self.name}'s sampler takes no option {key!r} (it takes: {takes})")
        return given

    @torch.no_grad()
    def sample(self, noise: Tensor, nfe: int, cond: Tensor | None = None, model: nn.Module | None = None,
               **options: Any) -> Tensor:
        """The student's own few-step sampler from ``noise`` at ``t = 1`` with ``nfe`` network
        evaluations (``model`` overrides the student, e.g. with its EMA copy).

        ``options`` are the method's :attr:`sample_options` (``None`` = the method's default);
        any other is a one-line error. Subclasses implement :meth:`_sample`, not this.
        """
        net = model if model is not None else self.student
        if self.sample_guidance is not None:
            guided = self.sample_guidance(net)
            net = guided if guided is net else guided.to(noise.device)  # the weaker model, if any, too
        return self._sample(noise, nfe, cond, net, **self.check_sample_options(options))

    def _sample(self, noise: Tensor, nfe: int, cond: Tensor | None, model: nn.Module,
                **options: Any) -> Tensor:
        """The method's sampler: ``model`` is the net to sample, ``options`` already checked."""
        raise NotImplementedError

    @classmethod
    def for_inference(cls, cfg: Any, student: nn.Module,
                      guidance: Callable[[nn.Module], nn.Module] | None = None) -> Distiller:
        """A distiller that only samples: built through ``__init__`` with ``teacher=None,
        inference_only=True`` (no teacher, no trainable auxiliaries); :meth:`loss` refuses.

        ``guidance`` (``net -> guided net``, built from the run's ``guidance:`` section) becomes
        :attr:`sample_guidance` when the method has :attr:`guided_sampling`, else it is ignored."""
        d = cls(cfg, student, None, inference_only=True)
        d.sample_guidance = guidance if cls.guided_sampling else None
        return d

    def scheduler_config(self) -> dict[str, Any] | None:
        """How :meth:`sample` spaces its steps, as config keys of the diffusers
        ``FlowDistillScheduler`` (``shift``, ``segment_steps``, ``gamma``, …), so that an export
        samples as this method does. ``None`` (the default): the exporter derives the schedule from
        the config's ``sample_grid`` (uniform or shifted steps, ``x ← x + (s − t)·u``). A method
        whose sampler uses other times overrides this (TSCD: the segment edges of its teacher grid)."""
        return None

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
