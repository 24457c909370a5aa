"""``FlowDistillVPScheduler``: the few-step flow scheduler inside DDPM-UNet pipelines
(``StableDiffusionPipeline`` and friends), whose UNet predicts ε / v / x0 on a discrete VP schedule.

The student (the UNet, e.g. with a LoRA) is trained as the linear-path velocity field of
:class:`~flowdistill.integrations.diffusers.adapters.DDPMUNetAdapter`: for a linear-path state
``x`` at noise level ``t`` the UNet is called on

    x_vp = (α + σ)·x,     α = (1 − t)/n,  σ = t/n,  n = √((1 − t)² + t²)

at the (fractional) DDPM step ``k(t)`` with ``σ_k/(α_k + σ_k) = t``, and its output becomes
``v = ε̂ − x̂0``. This scheduler makes a UNet pipeline take exactly those steps: the pipeline's
``latents`` are the linear-path state, ``timesteps`` are ``k(σ_i)`` (what the pipeline hands the
UNet), :meth:`scale_model_input` maps ``x → x_vp``, and :meth:`step` turns the (CFG-combined) UNet
output into ``v`` and jumps ``x_s = x_t + (s − t)·v`` on the FlowDistillScheduler grid (same
``shift`` / ``segment_steps`` keys). CFG in ε space equals CFG in ``v`` space because ``v`` is an
affine function of the UNet output at fixed ``x``. ``init_noise_sigma = 1``: the first state is the
noise itself, as the run's own sampler starts at ``t = 1`` (``t`` beyond the last trained level is
clamped to it, as the adapter does).

Config: the FlowDistillScheduler keys plus the DDPM schedule (``beta_start``, ``beta_end``,
``beta_schedule``, ``trained_betas``, ``prediction_type``, ``rescale_betas_zero_snr``) and
``timestep_mode`` — so ``FlowDistillVPScheduler.from_config(pipe.scheduler.config, shift=…)`` takes
the teacher's own schedule. ``num_train_timesteps`` is the DDPM table size.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config

from flowdistill.integrations.diffusers.adapters import PREDICTION_TYPES, DDPMUNetAdapter, _alphas_cumprod
from flowdistill.integrations.diffusers.scheduler import FlowDistillScheduler, FlowDistillSchedulerOutput


class FlowDistillVPScheduler(FlowDistillScheduler):
    """Flow-map / Euler steps of a linear-path student for pipelines whose UNet runs on a VP schedule
    (module docstring)."""

    _compatibles = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "EulerDiscreteScheduler"]

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0,
                 use_dynamic_shifting: bool = False, base_shift: float = 0.5, max_shift: float = 1.15,
                 base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, time_shift_type: str = "exponential", segment_steps: int = 0,
                 gamma: float = 0.0, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", rescale_betas_zero_snr: bool = False,
                 timestep_mode: str = "interpolate"):
        super().__init__(num_train_timesteps=num_train_timesteps, shift=shift,
                         use_dynamic_shifting=use_dynamic_shifting, base_shift=base_shift,
                         max_shift=max_shift,
                         base_image_seq_len=base_image_seq_len, max_image_seq_len=max_image_seq_len,
                         time_shift_type=time_shift_type, segment_steps=segment_steps, gamma=gamma)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                             f"got {prediction_type!r}")
        if timestep_mode not in ("interpolate", "round"):
            raise ValueError(f"timestep_mode must be 'interpolate' or 'round', got {timestep_mode!r}")
        ac, _ = _alphas_cumprod({"num_train_timesteps": num_train_timesteps, "beta_start": beta_start,
                                 "beta_end": beta_end, "beta_schedule": beta_schedule,
                                 "trained_betas": trained_betas, "prediction_type": prediction_type,
                                 "rescale_betas_zero_snr": rescale_betas_zero_snr})
        a, s = ac.sqrt(), (1 - ac).sqrt()
        # the attributes DDPMUNetAdapter's time conversions read (one implementation of k(t), α(t), σ(t))
        self.t_table, self.K, self.timestep_mode = s / (a + s), ac.numel(), timestep_mode
        self.timesteps = self._vp_timesteps(self.sigmas[:-1])

    def _vp_timesteps(self, sig: torch.Tensor) -> torch.Tensor:
        """The fractional DDPM steps ``k(σ)`` (float32) the UNet is called at."""
        return DDPMUNetAdapter.timestep_of_t(self, sig).to(torch.float32)

    def _coef(self, i: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(α, σ)`` of grid level ``i`` in ``like``'s dtype and device (as the adapter casts them)."""
        a, s = DDPMUNetAdapter.vp_coefficients(self, self.sigmas[i : i + 1])
        return a.to(like.device, like.dtype), s.to(like.device, like.dtype)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas=None, mu: float | None = None, timesteps=None) -> None:
        """The FlowDistillScheduler grid (``sigmas``); ``timesteps`` become the DDPM steps ``k(σ_i)``.
        Explicit ``timesteps=`` are not supported (they would be DDPM steps of another sampler)."""
        if timesteps is not None:
            raise ValueError("FlowDistillVPScheduler builds its own timesteps; pass num_inference_steps "
                             "or sigmas")
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
        self.timesteps = self._vp_timesteps(self.sigmas[:-1].cpu()).to(self.sigmas.device)

    def _index(self, timestep: float | torch.Tensor) -> int:
        """The current step's grid index (the step counter once stepping has begun)."""
        if self._step_index is not None:
            return self._step_index
        return self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)

    def scale_model_input(self, sample: torch.Tensor,
                          timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """``x_vp = (α + σ)·x`` at the current level: the UNet's input."""
        a, s = self._coef(self._index(timestep), sample)
        return sample * (a + s)

    def velocity(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        """``v = ε̂ − x̂0`` from the UNet output at grid level ``i`` and the linear-path state ``sample``
        (the formulas of :meth:`DDPMUNetAdapter.forward`)."""
        out = model_output.to(sample.dtype)
        if out.shape[1] != sample.shape[1]:  # learned-variance UNets output [ε, var]: keep ε
            out = out[:, : sample.shape[1]]
        a, sg = self._coef(i, sample)
        x_vp = sample * (a + sg)
        kind = self.config.prediction_type
        if kind == "epsilon":
            eps, x0 = out, (x_vp - sg * out) / a
        elif kind == "v_prediction":
            x0, eps = a * x_vp - sg * out, sg * x_vp + a * out
        else:  # sample
            x0, eps = out, (x_vp - a * out) / sg
        return eps - x0

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True, **kwargs) -> FlowDistillSchedulerOutput | tuple[torch.Tensor]:
        """The UNet output → ``v`` (:meth:`velocity`), then FlowDistillScheduler's ``x + (s − t)·v``."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        v = self.velocity(model_output, sample, self._step_index)
        return super().step(v, timestep, sample, return_dict=return_dict, **kwargs)
