"""Teacher adapters: a diffusers model presented as a VelocityField in our convention.

Every adapter is an ``nn.Module`` with ``forward(x, t [B], s=None, cond=None) -> v`` where ``t`` is
the noise level of the linear path ``x_t = (1 − t)·x + t·ε`` and ``v ≈ E[ε − x | x_t]``
(DESIGN.md §1). ``s`` is accepted and ignored, so an adapter can also stand in for a one-time
student net.

**Flow-matching transformers** (``SD3Transformer2DModel``, ``FluxTransformer2DModel``) already
use this convention: diffusers' ``FlowMatchEulerDiscreteScheduler`` has ``sigma = t`` and the
model predicts ``noise − data``. Only the timestep scaling differs: SD3 pipelines pass
``timestep = 1000·σ``; Flux pipelines pass ``timestep = σ`` (the model multiplies by 1000 inside)
plus a guidance embedding. The adapters' ``t`` is the *actual* noise level, i.e. the scheduler's
sigma *after* its time shift; a shift is a property of the sampling grid, never of the field. Use
:func:`scheduler_sigmas` to get the (shifted) grid a diffusers scheduler would walk.

**DDPM-family UNets** (``UNet2DModel``, ``UNet2DConditionModel``) with a discrete VP schedule
``x_vp = α_k·x0 + σ_k·ε`` (``α_k = √ᾱ_k``, ``σ_k = √(1 − ᾱ_k)``) are converted to the linear path
by the change of variables

    x_lin = x_vp / (α + σ),      t = σ / (α + σ),

which maps the VP state onto ``(1 − t)·x0 + t·ε``. Conversely, for a given ``t`` the VP
coefficients with ``α² + σ² = 1`` are ``α = (1 − t)/n``, ``σ = t/n``, ``n = √((1 − t)² + t²)``, and
the UNet is called at ``x_vp = (α + σ)·x_lin``. Its output (``epsilon``, ``v_prediction`` =
``α ε − σ x0`` or ``sample`` = x0) is turned into ``(ε̂, x̂0)`` and the velocity is
``v = ε̂ − x̂0``. On the linear path a DDIM (η = 0) step is exactly an Euler step of this field, so
the adapter reproduces ``DDIMScheduler`` on the matching grid (:meth:`DDPMUNetAdapter.time_grid`).

Non-grid times: ``t_k = σ_k/(α_k + σ_k)`` increases with the step ``k``; for ``t`` between two
table entries the UNet receives the *fractional* step given by linear interpolation of the
inverse table (``timestep_mode="interpolate"``, default; fractional steps within ``1e-3`` of an
integer are snapped to it, which absorbs float32 round-off of grid times) or the nearest integer
step (``"round"``). ``t`` outside ``[t_0, t_{K−1}]`` is clamped to that range (both the network
step and ``α, σ``): the teacher never saw a noise level beyond its last step, so pure noise at
``t = 1`` is treated as the last trained level, as DDPM/DDIM samplers do.

Text conditions and their CFG (:class:`TextCondition`, :class:`TextCFGField`) live in
:mod:`.conditions` (re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flowdistill.core.registry import Registry
from flowdistill.integrations.diffusers.conditions import (  # noqa: F401  (re-exported)
    TextCFGField,
    TextCondition,
)

TEACHER_ADAPTERS: Registry = Registry("teacher adapter")

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# diffusers class name -> registered adapter name
_CLASS_TO_ADAPTER = {
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "UNet2DModel": "ddpm_unet",
    "UNet2DConditionModel": "ddpm_unet",
}


def _model_class_name(model: nn.Module) -> str:
    return type(model).__name__


def _check_class(model: nn.Module, allowed: tuple[str, ...], adapter: str) -> None:
    name = _model_class_name(model)
    if name not in allowed:
        raise ValueError(f"adapter {adapter!r} does not support {name}; it supports {', '.join(allowed)} "
                         f"(all supported classes: {', '.join(sorted(_CLASS_TO_ADAPTER))})")


class _Adapter(nn.Module):
    """Shared plumbing: holds the model, a default condition, and dtype handling."""

    def __init__(self, model: nn.Module, default_cond: TextCondition | Mapping | None = None):
        super().__init__()
        self.model = model
        self.default_cond = TextCondition.coerce(default_cond) if not isinstance(default_cond, Tensor) \
            else default_cond

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _text(self, cond: Any, x: Tensor, need_pooled: bool) -> TextCondition:
        c = TextCondition.coerce(cond) if cond is not None else self.default_cond
        if c is None:
            raise ValueError(f"{_model_class_name(self.model)} needs a text condition: pass cond="
                             f"TextCondition(prompt_embeds, pooled_prompt_embeds) or set default_cond")
        if need_pooled and c.pooled_prompt_embeds is None:
            raise ValueError(f"{_model_class_name(self.model)} needs pooled_prompt_embeds in its condition")
        return c.batched(x.shape[0]).to(x.device, self._dtype())


# -- flow-matching transformers -------------------------------------------------------------
@TEACHER_ADAPTERS.register("sd3")
class SD3Adapter(_Adapter):
    """``SD3Transformer2DModel`` as a velocity field on latents ``x [B, C, H, W]``.

    ``v = model(x, timestep = num_train_timesteps·t, prompt_embeds, pooled_prompt_embeds)``
    (the SD3 pipeline's call with ``σ = t``).
    """

    def __init__(self, model: nn.Module, default_cond: TextCondition | Mapping | None = None,
                 num_train_timesteps: int = 1000):
        _check_class(model, ("SD3Transformer2DModel",), "sd3")
        super().__init__(model, default_cond)
        self.num_train_timesteps = int(num_train_timesteps)

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, cond: Any = None) -> Tensor:
        """Velocity ``v(x, t)``; ``cond`` is a :class:`TextCondition` (or dict)."""
        c = self._text(cond, x, need_pooled=True)
        dt = self._dtype()
        timestep = (t.to(torch.float32) * self.num_train_timesteps).to(dt)
        out = self.model(hidden_states=x.to(dt), timestep=timestep, encoder_hidden_states=c.prompt_embeds,
                         pooled_projections=c.pooled_prompt_embeds, return_dict=False)[0]
        return out.to(x.dtype)


def pack_latents(x: Tensor) -> Tensor:
    """Flux packing: ``[B, C, H, W] → [B, (H/2)(W/2), 4C]`` (2×2 patches, channel-major in a patch)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need even height and width, got {h}×{w}")
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents` for latents of ``height × width``."""
    b, n, c4 = x.shape
    x = x.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def flux_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Flux ``img_ids [(H/2)(W/2), 3]``: (0, row, column) of each packed 2×2 patch."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@TEACHER_ADAPTERS.register("flux")
class FluxAdapter(_Adapter):
    """``FluxTransformer2DModel`` as a velocity field on *unpacked* latents ``x [B, C, H, W]``.

    The adapter packs ``x`` into 2×2 patches, builds ``img_ids``/``txt_ids`` as the Flux pipeline
    does, calls the model with ``timestep = t`` (the model scales by 1000 inside) and the guidance
    embedding (guidance-distilled models: ``cond.guidance`` or ``guidance_scale``), and unpacks.
    Packing is a permutation, so Euler steps commute with it.
    """

    def __init__(self, model: nn.Module, default_cond: TextCondition | Mapping | None = None,
                 guidance_scale: float = 3.5):
        _check_class(model, ("FluxTransformer2DModel",), "flux")
        super().__init__(model, default_cond)
        self.guidance_scale = float(guidance_scale)

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, cond: Any = None) -> Tensor:
        """Velocity ``v(x, t)``; ``cond`` is a :class:`TextCondition` (or dict)."""
        b, _, h, w = x.shape
        c = self._text(cond, x, need_pooled=True)
        dt = self._dtype()
        guidance = None
        if self.model.config.guidance_embeds:
            g = c.guidance if c.guidance is not None else self.guidance_scale
            guidance = torch.as_tensor(g, dtype=torch.float32, device=x.device).expand(b)
        txt_ids = torch.zeros(c.prompt_embeds.shape[1], 3, device=x.device, dtype=dt)
        out = self.model(hidden_states=pack_latents(x).to(dt), timestep=t.to(dt), guidance=guidance,
                         pooled_projections=c.pooled_prompt_embeds, encoder_hidden_states=c.prompt_embeds,
                         txt_ids=txt_ids,
                         img_ids=flux_image_ids(h, w, x.device, dt), return_dict=False)[0]
        return unpack_latents(out, h, w).to(x.dtype)


def scheduler_sigmas(scheduler, num_inference_steps: int | None = None, **kw) -> Tensor:
    """The sigma grid (float64, ``N + 1`` entries ending at 0) a flow-matching scheduler walks.

    Calls ``scheduler.set_timesteps(num_inference_steps, **kw)`` (pass ``mu=`` for dynamic
    shifting, ``sigmas=`` for custom schedules) and returns ``scheduler.sigmas``: the grid on which
    :func:`flowdistill.core.solvers.solve` reproduces the scheduler's Euler loop.
    """
    scheduler.set_timesteps(num_inference_steps, **kw)
    return scheduler.sigmas.detach().to("cpu", torch.float64)


# -- DDPM-family UNets ----------------------------------------------------------------------
def _alphas_cumprod(scheduler_config: Any) -> tuple[Tensor, dict]:
    """``ᾱ`` (float64) and the config dict from a scheduler, a scheduler config or a dict."""
    from diffusers import DDPMScheduler

    if scheduler_config is None:
        raise ValueError("DDPM UNet teachers need their scheduler config (beta schedule and prediction "
                         "type): pass scheduler_config=<the model's DDPMScheduler/DDIMScheduler or its "
                         "config dict>")
    cfg = getattr(scheduler_config, "config", scheduler_config)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"scheduler_config must be a diffusers scheduler or a config mapping, got "
                        f"{type(scheduler_config).__name__}")
    cfg = dict(cfg)
    known = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
             "prediction_type", "rescale_betas_zero_snr"}
    sched = DDPMScheduler(**{k: v for k, v in cfg.items() if k in known})
    return sched.alphas_cumprod.to(torch.float64), dict(sched.config)


@TEACHER_ADAPTERS.register("ddpm_unet")
class DDPMUNetAdapter(_Adapter):
    """``UNet2DModel`` / ``UNet2DConditionModel`` with a DDPM schedule as a linear-path velocity.

    See the module docstring for the change of variables. ``cond``: class labels ``LongTensor [B]``
    (UNets with class embeddings) or a :class:`TextCondition` (``UNet2DConditionModel``).
    """

    def __init__(self, model: nn.Module, scheduler_config: Any = None, prediction_type: str | None = None,
                 timestep_mode: str = "interpolate", default_cond: Any = None):
        _check_class(model, ("UNet2DModel", "UNet2DConditionModel"), "ddpm_unet")
        super().__init__(model, default_cond)
        ac, cfg = _alphas_cumprod(scheduler_config)
        self.prediction_type = prediction_type or cfg.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}; supported: "
                             f"{', '.join(PREDICTION_TYPES)}")
        if timestep_mode not in ("interpolate", "round"):
            raise ValueError(f"timestep_mode must be 'interpolate' or 'round', got {timestep_mode!r}")
        self.timestep_mode = timestep_mode
        a, s = ac.sqrt(), (1 - ac).sqrt()
        self.K = ac.numel()
        self.register_buffer("t_table", s / (a + s), persistent=False)  # increasing in k
        self.register_buffer("alphas_cumprod", ac, persistent=False)

    # conversions -----------------------------------------------------------------------
    def t_of_alpha_cumprod(self, ac: Tensor) -> Tensor:
        """Our time of a VP level ``ᾱ``: ``t = σ/(α + σ)``."""
        ac = torch.as_tensor(ac, dtype=torch.float64)
        a, s = ac.sqrt(), (1 - ac).sqrt()
        return s / (a + s)

    def t_of_timestep(self, k: Tensor) -> Tensor:
        """Our time of integer DDPM steps ``k`` (float64)."""
        return self.t_table[torch.as_tensor(k, device=self.t_table.device).long()]

    def timestep_of_t(self, t: Tensor) -> Tensor:
        """The (fractional or rounded) DDPM step for times ``t`` (clamped to the table range)."""
        tab = self.t_table
        tt = t.to(tab.device, torch.float64).clamp(tab[0], tab[-1])
        i = torch.searchsorted(tab, tt).clamp(1, self.K - 1)
        lo, hi = tab[i - 1], tab[i]
        k = (i - 1).double() + (tt - lo) / (hi - lo)
        near = k.round()
        if self.timestep_mode == "round":
            return near
        return torch.where((k - near).abs() < 1e-3, near, k)

    def vp_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(α, σ)`` with ``α² + σ² = 1`` and ``σ/(α + σ) = t`` (``t`` clamped to the table range)."""
        tt = t.to(torch.float64).clamp(self.t_table[0].item(), self.t_table[-1].item())
        n = ((1 - tt) ** 2 + tt**2).sqrt()
        return (1 - tt) / n, tt / n

    def to_linear(self, x_vp: Tensor, t: Tensor) -> Tensor:
        """``x_lin = x_vp / (α + σ)`` at time ``t``."""
        a, s = self.vp_coefficients(t)
        return x_vp / (a + s).to(x_vp.dtype).reshape(-1, *([1] * (x_vp.ndim - 1)))

    def from_linear(self, x_lin: Tensor, t: Tensor) -> Tensor:
        """``x_vp = (α + σ)·x_lin`` at time ``t``."""
        a, s = self.vp_coefficients(t)
        return x_lin * (a + s).to(x_lin.dtype).reshape(-1, *([1] * (x_lin.ndim - 1)))

    def time_grid(self, scheduler) -> Tensor:
        """Our time grid (float64) matching a DDIM/DDPM scheduler after ``set_timesteps``.

        ``[t(k) for k in scheduler.timesteps]`` followed by the time of the final level
        (``final_alpha_cumprod`` when the scheduler has one — 0 for ``set_alpha_to_one`` — else
        ``ᾱ_0``).
        """
        ts = self.t_of_timestep(scheduler.timesteps.cpu()).cpu()
        final = getattr(scheduler, "final_alpha_cumprod", self.alphas_cumprod[0])
        return torch.cat([ts, self.t_of_alpha_cumprod(final).reshape(1).cpu()])

    # the field ---------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, cond: Any = None) -> Tensor:
        """Linear-path velocity ``v = ε̂ − x̂0`` at ``(x, t)``."""
        a64, s64 = self.vp_coefficients(t)
        shape = (-1, *([1] * (x.ndim - 1)))
        a, sg = a64.to(x.device, x.dtype).reshape(shape), s64.to(x.device, x.dtype).reshape(shape)
        x_vp = x * (a + sg)
        dt = self._dtype()
        k = self.timestep_of_t(t).to(x.device, torch.float32)
        kwargs: dict[str, Any] = {}
        cond = cond if cond is not None else self.default_cond
        if _model_class_name(self.model) == "UNet2DConditionModel":
            c = self._text(cond, x, need_pooled=False)
            kwargs["encoder_hidden_states"] = c.prompt_embeds
        elif isinstance(cond, Tensor):
            kwargs["class_labels"] = cond.to(x.device)
        elif cond is not None:
            raise TypeError("UNet2DModel takes class labels (LongTensor [B]) as its condition")
        out = self.model(x_vp.to(dt), k, return_dict=False, **kwargs)[0].to(x.dtype)
        if out.shape[1] != x.shape[1]:  # learned-variance UNets output [ε, var]: keep ε
            out = out[:, : x.shape[1]]
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x_vp - sg * eps) / a
        elif self.prediction_type == "v_prediction":
            x0 = a * x_vp - sg * out
            eps = sg * x_vp + a * out
        else:  # sample
            x0 = out
            eps = (x_vp - a * x0) / sg
        return eps - x0


# -- construction by class ------------------------------------------------------------------
def adapter_name_for(model: nn.Module) -> str:
    """The registered adapter name for a diffusers model instance (ValueError if unsupported)."""
    name = _model_class_name(model)
    if name not in _CLASS_TO_ADAPTER:
        raise ValueError(f"no teacher adapter for {name}; supported diffusers classes: "
                         f"{', '.join(sorted(_CLASS_TO_ADAPTER))}")
    return _CLASS_TO_ADAPTER[name]


def adapt_teacher(model: nn.Module, adapter: str | None = None, **kw: Any) -> nn.Module:
    """Wrap a diffusers ``model`` as a VelocityField (adapter chosen by class unless named).

    Keyword arguments go to the adapter: ``default_cond`` (all), ``num_train_timesteps`` (sd3),
    ``guidance_scale`` (flux), ``scheduler_config``, ``prediction_type``, ``timestep_mode``
    (ddpm_unet).
    """
    name = adapter or adapter_name_for(model)
    return TEACHER_ADAPTERS.build(name, model, **kw)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux/SD3 resolution-dependent shift ``μ``: linear in the token count between the two ends."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def dynamic_shift(t: Tensor, mu: float, kind: str = "exponential") -> Tensor:
    """Dynamic time shift ``e^μ/(e^μ + (1/t − 1))`` (exponential) or ``μ/(μ + (1/t − 1))`` (linear)."""
    if kind not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {kind!r}")
    c = math.exp(mu) if kind == "exponential" else mu
    out = c / (c + (1 / t.clamp_min(1e-30) - 1))
    return torch.where(t > 0, out, torch.zeros_like(t))
