"""``FlowDistillScheduler``: few-step sampling of a flow-map or velocity student in diffusers pipelines.

The grid has ``N + 1`` noise levels ``σ_0 = 1 > σ_1 > … > σ_N = 0`` (by default the uniform grid
pushed through the time shift, exactly the grid of :func:`flowdistill.core.timesteps.build_grid`
``"uniform"``/``"shifted"``). Each step jumps from ``t = σ_i`` to ``s = σ_{i+1}``:

    x_s = x_t + (s − t)·u

where ``u`` is the model output: the average velocity ``u(x, t, s)`` of a two-time flow-map
student (``X(x, t, s)``, DESIGN.md §1) or the instantaneous velocity ``v(x, t)`` of a one-time
student (an Euler step). Timesteps are ``σ·num_train_timesteps`` as in
``FlowMatchEulerDiscreteScheduler``, so flow pipelines (SD3, Flux, …) can swap it in.

Time shift: static ``σ' = k·σ/(1 + (k − 1)·σ)`` (``shift = k``), or with
``use_dynamic_shifting`` the resolution-dependent ``σ' = e^μ/(e^μ + (1/σ − 1))`` with ``μ`` from
the pipeline (``time_shift_type="linear"``: ``μ/(μ + (1/σ − 1))``). Both live in the saved config.

**Segment edges** (``segment_steps = N > 0``; TSCD / PCM / LCM, METHODS.md §3). The students of
segmented consistency distillation jump between the *edges* of a ``k``-segment split of the
teacher's ``N``-step grid ``τ_m = shift(m/N)``, ``m = 0 … N`` (ascending), i.e. the grid points at
indices ``floor(j·N/k)``, ``j = 0 … k − 1`` (:func:`flowdistill.core.segments.segment_edges`). With
``num_inference_steps = n`` the grid is then

    σ = (1, τ_{floor((n−1)·N/n)}, …, τ_{floor(N/n)}, 0),

the edges of an ``n``-segment split with the lowest edge ``τ_0`` replaced by ``0``: exactly the
times of :meth:`flowdistill.distillers.tscd.TSCD.sample_times`. When ``n`` divides ``N`` this is the
plain shifted ``n``-step grid; otherwise the edges sit on the teacher's grid (``N = 50, n = 4``:
``m = 12, 25, 37``, not ``12.5, 25, 37.5``). ``n`` must be in ``[1, N]``. ``segment_steps = 0``
(the default, and every config saved before this key existed) is the plain grid above.

**TCD's γ** (``gamma``; Zheng et al., "Trajectory Consistency Distillation", arXiv 2402.19159).
With ``γ > 0`` a step from ``t = σ_i`` jumps to the lower time ``s' = (1 − γ)·s``, ``s = σ_{i+1}``,
and re-noises back up to ``s`` through the linear path's Gaussian transition
(:meth:`flowdistill.core.paths.AffinePath.forward_transition`)

    x_s = ((1 − s)/(1 − s'))·x_{s'} + √(s² − ((1 − s)·s'/(1 − s'))²)·z,     z ~ N(0, I),

with no re-noise on the last step (``s = 0``). ``γ = 1`` is LCM's multistep sampler (predict the
sample, re-noise it). A two-time student is told ``s'`` (:meth:`FlowDistillScheduler.sigma_pair`).
The fresh noise ``z`` comes from the scheduler's own CPU generator, re-seeded at every
``set_timesteps`` with the noise seed (:meth:`FlowDistillScheduler.set_noise_seed`, default 0), so
a rollout is reproducible and equals ``TSCD.sample(..., gamma=γ, seed=seed)`` on the same initial
noise (diffusers' SD3 and Flux pipelines pass no generator to ``step``; a ``generator=`` passed to
``step`` is used instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from flowdistill import kernels
from flowdistill.core.paths import PATHS
from flowdistill.core.segments import segment_edges
from flowdistill.integrations.diffusers.adapters import dynamic_shift


@dataclass
class FlowDistillSchedulerOutput(BaseOutput):
    """``prev_sample``: the state at the next noise level ``s``."""

    prev_sample: torch.Tensor


class FlowDistillScheduler(SchedulerMixin, ConfigMixin):
    """Few-step flow-map / Euler scheduler for distilled students (see the module docstring).

    Config: ``num_train_timesteps`` (1000; timestep = σ·this), ``shift`` (1.0),
    ``use_dynamic_shifting`` (False), ``base_shift`` (0.5), ``max_shift`` (1.15),
    ``base_image_seq_len`` (256), ``max_image_seq_len`` (4096), ``time_shift_type``
    (``"exponential"``), ``segment_steps`` (0: off; ``N``: segment edges of the teacher's
    ``N``-step grid), ``gamma`` (0.0: deterministic; TCD's γ). Whether the model is told the target
    time ``s`` is the pipeline's business (:meth:`sigma_pair` gives it); the update is the same.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMapEulerDiscreteScheduler"]
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0,
                 use_dynamic_shifting: bool = False, base_shift: float = 0.5, max_shift: float = 1.15,
                 base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, time_shift_type: str = "exponential",
                 segment_steps: int = 0, gamma: float = 0.0):
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
        if isinstance(segment_steps, bool) or not isinstance(segment_steps, int) or segment_steps < 0:
            raise ValueError(f"segment_steps must be a non-negative integer (0 = off), got {segment_steps!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        self._shift = float(shift)
        self._noise_seed = 0
        self._generator: torch.Generator | None = None
        self._path = PATHS.build("linear")  # the re-noise of gamma > 0
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self.num_inference_steps: int | None = None
        self.sigmas = torch.tensor([1.0, 0.0])
        self.timesteps = self.sigmas[:-1] * num_train_timesteps

    # -- state -------------------------------------------------------------------------
    @property
    def shift(self) -> float:
        """The static time shift in use."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        """Change the static time shift (takes effect at the next ``set_timesteps``)."""
        self._shift = float(shift)

    @property
    def step_index(self) -> int | None:
        """Index of the current step (``None`` before the first ``step``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First step index, set by pipelines that start mid-schedule (img2img)."""
        return self._begin_index

    def set_noise_seed(self, seed: int) -> None:
        """Seed of the fresh noise of ``gamma > 0`` (default 0; takes effect at the next
        ``set_timesteps``, which re-seeds the generator)."""
        self._noise_seed = int(seed)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next rollout at ``begin_index``."""
        self._begin_index = begin_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # -- schedule ----------------------------------------------------------------------
    def _apply_shift(self, sig: torch.Tensor, mu: float | None) -> torch.Tensor:
        if self.config.use_dynamic_shifting:
            return dynamic_shift(sig, mu, self.config.time_shift_type)
        k = self._shift
        return k * sig / (1 + (k - 1) * sig)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | np.ndarray | None = None, mu: float | None = None,
                      timesteps: list[float] | np.ndarray | None = None) -> None:
        """Build the ``N``-step grid.

        Default: ``σ = shift(linspace(1, 0, N + 1))``, or with ``segment_steps`` the segment edges
        of the teacher grid (module docstring). ``sigmas`` (length ``N``, the starting levels
        of each step, as pipelines pass them) are shifted and a final 0 is appended; with
        ``segment_steps``, ``sigmas = linspace(1, 1/N, N)`` — what Flux-style pipelines pass on every
        call when the user gave none — asks for the default grid, i.e. the segment edges.
        ``timesteps`` (length ``N``, in units of ``num_train_timesteps``) are used as given (no
        shift). ``mu`` is required with ``use_dynamic_shifting``.
        """
        if self.config.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed when use_dynamic_shifting is true")
        if sigmas is not None and timesteps is not None:
            raise ValueError("pass either sigmas or timesteps, not both")
        given = sigmas if sigmas is not None else timesteps
        if given is not None:
            given = torch.as_tensor(np.asarray(given, dtype=np.float64))
            if num_inference_steps is not None and num_inference_steps != given.numel():
                raise ValueError(f"{num_inference_steps} steps but {given.numel()} sigmas/timesteps given")
            num_inference_steps = given.numel()
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        n = num_inference_steps
        if timesteps is not None:
            sig = given / self.config.num_train_timesteps
        elif self.config.segment_steps and (sigmas is None or self._is_plain_request(given)):
            sig = self._segment_sigmas(n, mu)
        else:
            sig = given if sigmas is not None else torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
            sig = self._apply_shift(sig, mu)
        sig = torch.cat([sig, sig.new_zeros(1)])
        if (sig[:-1] <= sig[1:]).any() or sig[0] > 1 or sig[-2] <= 0:
            raise ValueError(f"the sigma grid must decrease within (0, 1], got {sig.tolist()}")
        self.num_inference_steps = n
        self.sigmas = sig.to(device=device, dtype=torch.float32)
        self.timesteps = (self.sigmas[:-1] * self.config.num_train_timesteps).to(device)
        self._step_index = None
        self._begin_index = None
        self._generator = torch.Generator(device="cpu").manual_seed(self._noise_seed)

    @staticmethod
    def _is_plain_request(sigmas: torch.Tensor) -> bool:
        """Whether ``sigmas`` are the unshifted uniform starting levels ``linspace(1, 1/N, N)`` that
        Flux-style pipelines pass when the user asked for no custom sigmas."""
        n = sigmas.numel()
        plain = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
        return bool(torch.allclose(sigmas.to(torch.float64), plain, rtol=0.0, atol=1e-9))

    def _segment_sigmas(self, n: int, mu: float | None) -> torch.Tensor:
        """The ``n`` starting levels ``1 > e_{n−1} > … > e_1`` on the teacher's ``segment_steps``-step
        grid, computed as the TSCD sampler computes them (float64 grid, shift, then the edges)."""
        big_n = int(self.config.segment_steps)
        if n > big_n:
            raise ValueError(f"num_inference_steps={n} exceeds segment_steps={big_n}: the segment edges "
                             f"lie on the teacher's {big_n}-step grid")
        grid = self._apply_shift(torch.linspace(1.0, 0.0, big_n + 1, dtype=torch.float64), mu)
        edges = segment_edges(grid, n)  # ascending, e_0 = the grid's lowest time (replaced by 0)
        return torch.cat([torch.ones(1, dtype=torch.float64), edges[1:].flip(0)])

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        """The grid index of ``timestep`` (nearest, within 1e-3 timestep units)."""
        tv = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        diffs = (self.timesteps.detach().cpu().double() - tv).abs()
        i = int(diffs.argmin())
        if diffs[i] > 1e-3:
            raise ValueError(f"timestep {tv} is not on the schedule {self.timesteps.tolist()}")
        return i

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        self._step_index = self._begin_index if self._begin_index is not None else \
            self.index_for_timestep(timestep)

    def sigma_pair(self, timestep: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, s')``: the current noise level and the target time of the flow-map jump, the next
        level ``s`` (``s' = (1 − γ)·s`` with TCD's ``gamma``).

        With ``timestep`` the pair of that grid entry, otherwise of the current step index.
        """
        if timestep is not None:
            i = self.index_for_timestep(timestep)
        elif self._step_index is not None:
            i = self._step_index
        else:
            i = self._begin_index or 0
        return self.sigmas[i], self._jump_target(self.sigmas[i + 1])

    def _jump_target(self, s: torch.Tensor) -> torch.Tensor:
        """``(1 − γ)·s`` in the grid's dtype (as the TSCD sampler computes it); ``s`` itself for γ = 0."""
        gamma = float(self.config.gamma)
        return s if gamma == 0.0 else (1.0 - gamma) * s

    # -- stepping ----------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor,
                          timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """Identity: flow students take the state unscaled."""
        return sample

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process ``(1 − σ)·x + σ·ε`` at ``timestep`` (img2img pipelines)."""
        ts = torch.as_tensor(timestep).reshape(-1)
        sig = torch.stack([self.sigmas[self.index_for_timestep(v)] for v in ts])
        sig = sig.to(sample.device, sample.dtype)
        sig = sig.reshape(-1, *([1] * (sample.ndim - 1)))
        return sig * noise + (1.0 - sig) * sample

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True, **kwargs) -> FlowDistillSchedulerOutput | tuple[torch.Tensor]:
        """``x_s = x_t + (s − t)·u`` from the current level ``t`` to the next ``s`` (the kernel of
        :func:`flowdistill.core.flowmap.flow_map_jump`, so the same float ops as our samplers).

        With ``gamma > 0``: the jump goes to ``s' = (1 − γ)·s`` and re-noises to ``s`` (module
        docstring) with noise from ``generator=`` when given, else the scheduler's own seeded one.
        Other keyword arguments of other schedulers' ``step`` (``s_churn``, …) are ignored.
        """
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ValueError("pass one of scheduler.timesteps to step(), not an integer index")
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        b = sample.shape[0]
        t, s = self.sigmas[i].to(sample.device), self.sigmas[i + 1].to(sample.device)
        s_jump = self._jump_target(s)
        x = sample.to(torch.float32)
        prev = kernels.flow_map_jump(x, model_output.to(torch.float32), t.expand(b), s_jump.expand(b))
        if float(self.config.gamma) > 0 and float(s) > 0:
            z = self._fresh_noise(prev, kwargs.get("generator"))
            prev = self._path.forward_transition(prev, s_jump.expand(b), s.expand(b), z)
        prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return FlowDistillSchedulerOutput(prev_sample=prev)

    def _fresh_noise(self, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``z ~ N(0, I)`` shaped like ``like``: drawn on the generator's device (the scheduler's own
        CPU generator unless one is passed), then moved to ``like``'s device."""
        if isinstance(generator, (list, tuple)):
            raise ValueError("FlowDistillScheduler.step takes one generator for the re-noise of gamma > 0, "
                             "not a list")
        gen = generator if generator is not None else self._generator
        if gen is None:
            gen = self._generator = torch.Generator(device="cpu").manual_seed(self._noise_seed)
        z = torch.randn(like.shape, generator=gen, device=gen.device, dtype=like.dtype)
        return z.to(like.device)
