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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

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
    (``"exponential"``). Whether the model is told the target time ``s`` is the pipeline's
    business (:meth:`sigma_pair` gives it); the update is the same.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMapEulerDiscreteScheduler"]
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0,
                 use_dynamic_shifting: bool = False, base_shift: float = 0.5, max_shift: float = 1.15,
                 base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, time_shift_type: str = "exponential"):
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
        self._shift = float(shift)
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

        Default: ``σ = shift(linspace(1, 0, N + 1))``. ``sigmas`` (length ``N``, the starting levels
        of each step, as pipelines pass them) are shifted and a final 0 is appended.
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
        """``(t, s)``: the current noise level and the next one (the target time of a flow-map jump).

        With ``timestep`` the pair of that grid entry, otherwise of the current step index.
        """
        if timestep is not None:
            i = self.index_for_timestep(timestep)
        elif self._step_index is not None:
            i = self._step_index
        else:
            i = self._begin_index or 0
        return self.sigmas[i], self.sigmas[i + 1]

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
        """``x_s = x_t + (s − t)·u`` from the current level ``t`` to the next ``s``.

        Extra keyword arguments of other schedulers' ``step`` (``generator``, ``s_churn``, …) are
        accepted and ignored: the update is deterministic.
        """
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ValueError("pass one of scheduler.timesteps to step(), not an integer index")
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        t, s = self.sigmas[i], self.sigmas[i + 1]
        x = sample.to(torch.float32)
        prev = x + (s - t).to(x.device) * model_output.to(torch.float32)
        prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return FlowDistillSchedulerOutput(prev_sample=prev)
