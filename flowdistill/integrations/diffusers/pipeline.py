"""``FlowDistillPipeline``: a diffusers pipeline around a flowdistill student and FlowDistillScheduler.

Components: ``student`` (a flowdistill net, ``flowdistill.models.*``, ModelMixin + ConfigMixin) and
``scheduler`` (:class:`~flowdistill.integrations.diffusers.scheduler.FlowDistillScheduler`).
``save_pretrained`` writes ``model_index.json`` naming each component by module and class
(``["flowdistill.models.mlp", "MLPFlowNet"]``); ``FlowDistillPipeline.from_pretrained(dir)``
loads it offline — diffusers resolves those modules from ``sys.modules``, and importing this
module imports them. Importing this module also registers ``FlowDistillPipeline`` in the
``diffusers`` namespace (:func:`register_with_diffusers`), where ``DiffusionPipeline.from_pretrained``
looks up ``model_index.json``'s ``_class_name``, so the generic loader works too (see
:mod:`flowdistill.integrations.diffusers.export` for loading without importing flowdistill).

Sampling: ``N`` steps on the scheduler's grid ``1 = σ_0 > … > σ_N = 0`` (with the scheduler's
``segment_steps``, the segment edges of a TSCD/PCM/LCM student); at each step a two-time student
(config ``two_time``) gives ``u(x, σ_i, s_i)`` with ``s_i`` the jump target of
:meth:`FlowDistillScheduler.sigma_pair` (``σ_{i+1}``, or ``(1 − γ)·σ_{i+1}`` with TCD's ``gamma``),
a one-time student ``v(x, σ_i)``, and the scheduler applies ``x ← x + (s_i − σ_i)·u`` (and, with
``gamma > 0``, re-noises to ``σ_{i+1}``). With ``guidance_scale = w ≠ 1`` and class
labels, classifier-free guidance ``u_∅ + w·(u_c − u_∅)`` uses the null label ``num_classes``.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

import flowdistill.models  # noqa: F401  (diffusers' loader finds our model classes in sys.modules)
from flowdistill import kernels
from flowdistill.integrations.diffusers.scheduler import FlowDistillScheduler

OUTPUT_TYPES = ("pt", "np", "pil")


def sample_shape_of_student(student) -> tuple[int, ...]:
    """The shape of one sample from a flowdistill student's config."""
    cfg = student.config
    if "data_dim" in cfg:
        return (int(cfg["data_dim"]),)
    if "in_channels" in cfg and "sample_size" in cfg:
        s = cfg["sample_size"]
        hw = (s, s) if isinstance(s, int) else tuple(s)
        return (int(cfg["in_channels"]), *hw)
    raise ValueError(f"cannot infer the sample shape of {type(student).__name__}: its config has neither "
                     f"data_dim nor in_channels + sample_size")


class FlowDistillPipeline(DiffusionPipeline):
    """Few-step sampling of a distilled flowdistill student (unconditional or class-conditional)."""

    model_cpu_offload_seq = "student"

    def __init__(self, student, scheduler: FlowDistillScheduler):
        super().__init__()
        if not isinstance(scheduler, FlowDistillScheduler):
            raise TypeError(f"scheduler must be a FlowDistillScheduler, got {type(scheduler).__name__}")
        self.register_modules(student=student, scheduler=scheduler)

    def _labels(self, class_labels, batch_size: int, device) -> Tensor | None:
        num_classes = int(self.student.config.get("num_classes", 0) or 0)
        if class_labels is None:
            return None
        if num_classes == 0:
            raise ValueError("class_labels given but the student is unconditional (num_classes = 0)")
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"{labels.numel()} class labels for batch_size {batch_size}")
        if (labels < 0).any() or (labels > num_classes).any():
            raise ValueError(f"class labels must be in [0, {num_classes}] ({num_classes} = unconditional)")
        return labels

    def _model_output(self, x: Tensor, t: Tensor, s: Tensor | None, labels: Tensor | None,
                      w: float) -> Tensor:
        if labels is None or w == 1.0:
            return self.student(x, t, s, cond=labels)
        null = torch.full_like(labels, int(self.student.config["num_classes"]))
        s2 = None if s is None else torch.cat([s, s])
        out = self.student(torch.cat([x, x]), torch.cat([t, t]), s2, cond=torch.cat([null, labels]))
        u_u, u_c = out.chunk(2)
        return kernels.cfg_combine(u_u, u_c, w)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 1, class_labels=None,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pt",
                 return_dict: bool = True, guidance_scale: float = 1.0, latents: Tensor | None = None,
                 sigmas: list[float] | None = None, mu: float | None = None, noise_seed: int | None = None):
        """Draw ``batch_size`` samples in ``num_inference_steps`` student evaluations.

        ``output_type``: ``"pt"`` — the raw samples as the run's own sampler returns them
        (``[B, *sample_shape]``, data range); ``"np"`` — images as NHWC float arrays in [0, 1] (data
        in [-1, 1] is mapped by ``(x + 1)/2``), vectors as raw arrays; ``"pil"`` — a list of PIL
        images (image students only). ``latents`` replaces the drawn noise at ``t = 1``.
        ``noise_seed`` seeds the re-noise of a scheduler with ``gamma > 0`` (default: the scheduler's
        seed, 0), as the ``seed`` sample option of TSCD's own sampler.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        device = self._execution_device
        dtype = self.student.dtype
        shape = sample_shape_of_student(self.student)
        if output_type == "pil" and len(shape) != 3:
            raise ValueError("output_type='pil' needs an image student ([C, H, W] samples)")
        labels = self._labels(class_labels, batch_size, device)
        if noise_seed is not None:
            self.scheduler.set_noise_seed(noise_seed)
        self.scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
        if latents is None:
            x = randn_tensor((batch_size, *shape), generator=generator, device=device, dtype=dtype)
        else:
            x = latents.to(device=device, dtype=dtype)
        two_time = bool(self.student.config.get("two_time", False))
        for ts in self.progress_bar(self.scheduler.timesteps):
            t_i, s_i = self.scheduler.sigma_pair()  # the current level and the jump's target time
            t = t_i.to(device, dtype).expand(batch_size)
            s = s_i.to(device, dtype).expand(batch_size) if two_time else None
            u = self._model_output(x, t, s, labels, float(guidance_scale))
            x = self.scheduler.step(u, ts, x).prev_sample
        self.maybe_free_model_hooks()
        images = self._postprocess(x, output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _postprocess(self, x: Tensor, output_type: str):
        if output_type == "pt":
            return x
        if x.ndim != 4:
            return x.float().cpu().numpy()
        img = ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return img
        if img.shape[-1] == 1:
            img = np.repeat(img, 3, axis=-1)
        return self.numpy_to_pil(img)


def register_with_diffusers() -> None:
    """Make ``diffusers.FlowDistillPipeline`` this class, so ``DiffusionPipeline.from_pretrained(DIR)``
    resolves an exported directory's ``_class_name`` (diffusers looks pipeline classes up by name in
    its own namespace and has no plugin registry). Idempotent; called when this module is imported."""
    import diffusers

    if getattr(diffusers, "FlowDistillPipeline", None) is not FlowDistillPipeline:
        setattr(diffusers, "FlowDistillPipeline", FlowDistillPipeline)  # noqa: B010 (lazy module attribute)


register_with_diffusers()
